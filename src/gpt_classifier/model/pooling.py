"""Pooling: which of a sequence's outputs classify it. A rule is one function.

A rule maps the real lengths of a right-padded batch (B,) and its width T to either
one position per sequence (B,) (integer) or averaging weights over positions (B, T)
(floating point). Position rules let the last block compute only those positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PoolingRule = Callable[[torch.Tensor, int], torch.Tensor]


def last_token(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The last real token, the only one that has attended to every other (default)."""
    return lengths - 1


def final_position(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The last position of the padded batch, as the book's ``model(x)[:, -1, :]``.

    Depends on how much padding a batch has."""
    return torch.full_like(lengths, width - 1)


def first_token(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The first token, which has seen nothing but itself."""
    return torch.zeros_like(lengths)


def mean(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The average over the real tokens (padding excluded)."""
    real = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    return real.float() / lengths[:, None].float()


def mean_with_padding(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The average over every position of the padded batch, padding included, as the
    book's ``--average_embeddings`` experiment. Depends on how much padding a batch has."""
    return torch.full((len(lengths), width), 1.0 / width, device=lengths.device)


POOLING_RULES: dict[str, PoolingRule] = {
    "last_token": last_token,
    "final_position": final_position,
    "first": first_token,
    "mean": mean,
    "mean_with_padding": mean_with_padding,
}


def pooling_rule(name: str) -> PoolingRule:
    """The rule called ``name``; the error lists the valid names."""
    if name not in POOLING_RULES:
        raise ValueError(f"classifier.pooling={name!r}; choose one of {list(POOLING_RULES)}")
    return POOLING_RULES[name]


def positions_read(selection: torch.Tensor, width: int, causal: bool = True) -> torch.Tensor:
    """How many leading positions each pooled output depends on (B,).

    Causal attention means an output at position p depends on positions 0..p only,
    so a cache of hidden states needs just this many per sequence; without the causal
    mask every output depends on the whole row.
    """
    if not causal:
        return torch.full((len(selection),), width, dtype=torch.long, device=selection.device)
    if not selection.is_floating_point():
        return selection + 1
    used = (selection != 0).int()
    return width - used.flip(dims=(1,)).argmax(dim=1)
