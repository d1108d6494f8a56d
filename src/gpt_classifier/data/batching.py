"""Token ids to batches: truncation, padding modes, length-sorted and length-bucketed order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from gpt_classifier.data.tokenizer import PAD_TOKEN_ID

TruncationSide = Literal["right", "left"]
PADDING_MODES = ("batch", "longest_train", "context")


def truncate(ids: list[int], max_length: int, side: TruncationSide) -> tuple[list[int], bool]:
    """Cut ``ids`` to ``max_length``: ``right`` keeps the start, ``left`` keeps the end."""
    if side not in ("right", "left"):
        raise ValueError(f"truncation_side={side!r}; use 'right' (keep start) or 'left' (keep end)")
    if len(ids) <= max_length:
        return ids, False
    return (ids[:max_length] if side == "right" else ids[-max_length:]), True


def plan_batches(lengths: Sequence[int], max_size: int, max_tokens: int,
                 per_batch_cost: int = 64) -> list[list[int]]:  # fmt: skip
    """Indices of ``lengths`` grouped into batches for inference, longest first, so that
    padded tokens plus a fixed cost per batch are fewest.

    Each batch pads to its longest text: cutting a sorted list into equal-size batches
    pads random SMS messages to ~1.8x their tokens. A batch holds at most ``max_size``
    texts and ``max_tokens`` padded tokens (one text always fits); ``per_batch_cost``, in
    tokens, is what one more forward pass costs beyond its tokens (smaller matrix products
    run slower), so that the plan does not shatter into single texts.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    widths = [lengths[i] for i in order]
    n = len(order)
    # best[i]: least cost of the first i texts; start[i]: where the last batch begins.
    best, start = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i - 1, max(-1, i - 1 - max_size), -1):
            count = i - j
            if count > 1 and widths[j] * count > max_tokens:
                break  # widths[j] only grows as j falls
            cost = best[j] + widths[j] * count + per_batch_cost
            if cost < best[i]:
                best[i], start[i] = cost, j
    batches, i = [], n
    while i > 0:
        batches.append(order[start[i] : i])
        i = start[i]
    return batches[::-1]


class TokenizedTexts(Dataset):
    """Token ids (already truncated) and labels; each item is one unpadded example.

    ``pad_to`` fixes every example's padded length (the book's padding modes);
    ``None`` lets each batch pad to its own longest example.
    """

    def __init__(
        self, token_ids: Sequence[list[int]], labels: Sequence[int], pad_to: int | None = None
    ) -> None:
        if len(token_ids) != len(labels):
            raise ValueError(f"{len(token_ids)} token sequences but {len(labels)} labels")
        self.token_ids = [torch.tensor(ids, dtype=torch.long) for ids in token_ids]
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.pad_to = pad_to

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"input_ids": self.token_ids[index], "label": int(self.labels[index])}

    def lengths(self) -> list[int]:
        """Each example's length as fed to the model (its fixed padding included)."""
        if self.pad_to is not None:
            return [self.pad_to] * len(self)
        return [len(ids) for ids in self.token_ids]


class Collator:
    """Pads examples on the right with ``<|endoftext|>`` into one batch.

    A batch holds ``input_ids`` (B, T), ``lengths`` (real tokens per example, where
    pooling reads), ``example_lengths`` (tokens that belong to the example itself,
    fixed padding included, so a cache can key on them) and ``labels``.
    """

    def __init__(self, pad_to: int | None = None, pad_id: int = PAD_TOKEN_ID) -> None:
        self.pad_to = pad_to
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [e["input_ids"] for e in examples]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        width = self.pad_to if self.pad_to is not None else int(lengths.max())
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = seq
        example_lengths = torch.full_like(lengths, width) if self.pad_to is not None else lengths
        return {
            "input_ids": input_ids,
            "lengths": lengths,
            "example_lengths": example_lengths,
            "labels": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long),
        }


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
