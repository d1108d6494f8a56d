"""The orders batches are drawn in: length-sorted evaluation, length-bucketed or random
training batches, each process's share of them, and a loader that resumes mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler


class LengthSortedSampler(Sampler[int]):
    """Longest first, so evaluation batches are dense and memory peaks at the start.

    With ``world_size`` processes, process ``rank`` gets every ``world_size``-th example
    of that order: each example is evaluated exactly once (no padding of the split to a
    multiple of the processes, unlike ``DistributedSampler``), and all processes get
    batches of about the same lengths.
    """

    def __init__(self, lengths: Sequence[int], rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        self.order = order[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length: shuffle, sort within pools, shuffle the batches."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        drop_last: bool,
        pool_batches: int = 50,
        seed: int = 0,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.pool = batch_size * pool_batches
        self.seed = seed
        self.epoch = 0
        self.epoch_in_use = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch; the order depends on it alone."""
        self.epoch = epoch

    def order_state(self) -> dict[str, int]:
        return {"epoch": self.epoch_in_use}

    def replay(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[list[int]]:
        # A fresh order each epoch, reproducible from the seed.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch_in_use = self.epoch
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=lambda i: self.lengths[i])
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        n = len(self.lengths)
        if not self.drop_last:
            return sum(-(-min(self.pool, n - s) // self.batch_size) for s in range(0, n, self.pool))
        return sum(min(self.pool, n - s) // self.batch_size for s in range(0, n, self.pool))


class RankBatches(Sampler[list[int]]):
    """This process's share of each global batch of ``global_batches``.

    Under data parallelism with ``world_size`` processes of ``batch_size`` examples each,
    ``global_batches`` yields batches of ``batch_size * world_size`` in the order one
    process would train on them, and process ``rank`` takes the ``rank``-th slice of
    each. All processes draw the same global order (same seed, same generator), so the
    run sees what a one-process run with the global batch sees, and every process gets
    the same number of batches (DDP needs that). A last global batch shorter than
    ``world_size`` (``drop_last=false``) gives each process one example, repeating some:
    no process may get an empty batch.

    The order's state (``set_epoch``, ``order_state``, ``replay``) is the wrapped
    sampler's, so resuming mid-epoch works as with one process.
    """

    def __init__(self, global_batches: Any, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        self.global_batches = global_batches
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches:
            n = len(batch)
            if n < self.world_size:
                yield [batch[self.rank % n]]
            else:  # contiguous slices whose sizes differ by at most one
                rank, world = self.rank, self.world_size
                yield batch[rank * n // world : (rank + 1) * n // world]

    def __len__(self) -> int:
        return len(self.global_batches)

    def _order(self) -> Any:
        for candidate in (self.global_batches, getattr(self.global_batches, "sampler", None)):
            if hasattr(candidate, "order_state"):
                return candidate
        return None

    def set_epoch(self, epoch: int) -> None:
        for candidate in (self.global_batches, getattr(self.global_batches, "sampler", None)):
            if hasattr(candidate, "set_epoch"):
                candidate.set_epoch(epoch)

    def order_state(self) -> Any:
        order = self._order()
        return order.order_state() if order is not None else None

    def replay(self, state: Any) -> None:
        order = self._order()
        if order is not None and state is not None:
            order.replay(state)


class ReplayableRandomSampler(RandomSampler):
    """torch's ``RandomSampler`` (the same seed drawn from the global RNG at the same
    moment, the same order) that remembers each epoch's seed, so that an epoch
    interrupted by a crash can be replayed in the same order."""

    def __init__(self, data_source: Sized) -> None:
        super().__init__(data_source)
        self.epoch_seed: int | None = None
        self._replay_seed: int | None = None

    def order_state(self) -> dict[str, int | None]:
        return {"seed": self.epoch_seed}

    def replay(self, state: dict[str, int | None]) -> None:
        self._replay_seed = state["seed"]

    def __iter__(self) -> Iterator[int]:
        seed, self._replay_seed = self._replay_seed, None
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.epoch_seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: how many batches of the current epoch it
    has handed out, and the epoch's order. A run resumed from a checkpoint taken
    mid-epoch goes on with exactly the batches the interrupted epoch had left.

    Lightning calls ``state_dict`` when it saves and ``load_state_dict`` before it
    iterates (``lightning.fabric.utilities.types._Stateful``).
    """

    # Not torchdata's StatefulDataLoader: after an epoch cut short (limit_train_batches),
    # its state resumes the rest of that epoch, where the uninterrupted run starts the
    # next one (``end_epoch`` below).

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0
        self._epoch_over = False

    def end_epoch(self) -> None:
        """The trainer ended the epoch (maybe early, with ``limit_train_batches``): a
        checkpoint from now on resumes with the next epoch, not the rest of this one."""
        self._epoch_over = True

    def _order(self) -> Any:
        """The sampler whose order varies by epoch (shuffled or bucketed), if any."""
        for candidate in (self.batch_sampler, self.sampler):
            if hasattr(candidate, "order_state"):
                return candidate
        return None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        self._served = 0
        self._epoch_over = False
        if skip:
            # A DataLoader iterator draws a seed from the global generator when it is made;
            # the interrupted run drew it before the checkpoint, so the replay must not.
            state = torch.get_rng_state()
            batches = super().__iter__()
            torch.set_rng_state(state)
        else:
            batches = super().__iter__()
        for _ in range(skip):  # collated and dropped: cheap next to a training step
            next(batches)
            self._served += 1
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        order = self._order()
        served = None if self._epoch_over else self._served
        return {"served": served, "order": order.order_state() if order else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        served = int(state.get("served") or 0)  # None: saved after its epoch ended
        if 0 < served < len(self):  # saved mid-epoch: replay that epoch's order
            order = self._order()
            if order is not None and state.get("order") is not None:
                order.replay(state["order"])
            self._skip = served
