"""Token ids to batches: truncation, padding modes, the dataset, collation, and the
inference batches that pad least. The orders batches are drawn in: ``data.samplers``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

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


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int,
                 per_batch_cost: int = 64) -> list[list[int]]:  # fmt: skip
    """Indices of ``lengths`` grouped into batches for inference, longest first, so that
    padded tokens plus a fixed cost per batch are fewest.

    Each batch pads to its longest text: cutting a sorted list into equal-size batches
    pads random SMS messages to ~1.8x their tokens. A batch holds at most ``batch_size``
    texts and ``max_tokens`` padded tokens (one text always fits); ``per_batch_cost``, in
    tokens, is what one more forward pass costs beyond its tokens (smaller matrix products
    run slower), so that the plan does not shatter into single texts.
    """
    if batch_size < 1:  # else every text would go into one batch, however many
        raise ValueError(f"batch_size={batch_size}: give a whole number, 1 or more")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    widths = [lengths[i] for i in order]
    n = len(order)
    # best[i]: least cost of the first i texts; start[i]: where the last batch begins.
    best, start = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i - 1, max(-1, i - 1 - batch_size), -1):
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

    The ids of all examples are kept in one flat tensor (a tensor per example costs
    more than tokenizing it, at a million rows). ``pad_to`` fixes every example's padded
    length (the book's padding modes); ``None`` lets each batch pad to its own longest.
    """

    def __init__(
        self, token_ids: Sequence[list[int]], labels: Sequence[int], pad_to: int | None = None
    ) -> None:
        if len(token_ids) != len(labels):
            raise ValueError(f"{len(token_ids)} token sequences but {len(labels)} labels")
        sizes = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
        flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int32,
                           count=int(sizes.sum()))  # fmt: skip
        self.flat = torch.from_numpy(flat)
        self.sizes = torch.from_numpy(sizes)
        self._starts = [0, *np.cumsum(sizes).tolist()]
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.pad_to = pad_to

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        ids = self.flat[self._starts[index] : self._starts[index + 1]]
        return {"input_ids": ids, "label": int(self.labels[index])}

    @property
    def token_ids(self) -> list[torch.Tensor]:
        """Each example's ids (views of the flat tensor)."""
        return list(self.flat.split(self.sizes.tolist()))

    def lengths(self) -> list[int]:
        """Each example's length as fed to the model (its fixed padding included)."""
        if self.pad_to is not None:
            return [self.pad_to] * len(self)
        return self.sizes.tolist()


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
