"""Freeze policies: which parts of the classifier train."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt_classifier.backbone import GPT

FREEZE_POLICIES = ("last_block", "last_layer", "all", "last_n_blocks")
FROZEN_WEIGHTS_FILE = "frozen.safetensors"


def read_frozen_weights(path: Path) -> dict[str, torch.Tensor]:
    """The frozen parameters a checkpoint refers to (names as in its state dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint beside it keeps its frozen weights there. "
            "Copy the whole checkpoints/ folder, or export the model with export.py."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RuntimeError(
            f"{path} could not be read ({err}); the run's files are damaged"
        ) from err


def apply_freeze(model: GPT, policy: str, n: int = 1) -> None:
    """Freeze every parameter, then unfreeze what ``policy`` names.

    ``last_block``: the last transformer block, the final LayerNorm and the head (the
    book's choice); ``last_n_blocks``: the same with the last ``n`` blocks;
    ``last_layer``: the head only; ``all``: nothing stays frozen.
    """
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze.policy={policy!r}; choose one of {list(FREEZE_POLICIES)}")
    model.requires_grad_(policy == "all")
    if policy == "all":
        return
    model.out_head.requires_grad_(True)
    if policy == "last_layer":
        return
    blocks = 1 if policy == "last_block" else n
    if not 1 <= blocks <= len(model.trf_blocks):
        raise ValueError(
            f"freeze.n={n} must be between 1 and the model's {len(model.trf_blocks)} blocks"
        )
    for block in model.trf_blocks[-blocks:]:
        block.requires_grad_(True)
    model.final_norm.requires_grad_(True)


def frozen_prefix_depth(model: GPT) -> int:
    """How many leading blocks (after the embeddings) hold no trainable parameter.

    0 when the embeddings train: then nothing before the first block is fixed.
    """
    embeddings = [*model.tok_emb.parameters(), *model.pos_emb.parameters()]
    if any(p.requires_grad for p in embeddings):
        return 0
    for index, block in enumerate(model.trf_blocks):
        if any(p.requires_grad for p in block.parameters()):
            return index
    return len(model.trf_blocks)


def count_parameters(model: GPT) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
