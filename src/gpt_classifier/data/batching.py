"""Token ids to batches: truncation, padding modes, length-sorted and length-bucketed order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Sampler

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
    """Longest first, so evaluation batches are dense and memory peaks at the start."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

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

    def __iter__(self) -> Iterator[list[int]]:
        # A fresh order each epoch, reproducible from the seed.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
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
