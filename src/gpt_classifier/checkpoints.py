"""What a training checkpoint holds, read the same way by training and inference.

A checkpoint keeps what trains; the frozen weights are written once per run into
``frozen.safetensors`` beside it (a gpt2-small ``last_block`` checkpoint is ~85 MB
instead of 554 MB). This module finds that file and completes a checkpoint's state.
No Lightning here: inference reads checkpoints without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt_classifier.model.weights import split_fused_qkv

FROZEN_WEIGHTS_FILE = "frozen.safetensors"
# In a sharded checkpoint folder (FSDP with state_dict_type=sharded, as Lightning writes
# it): everything but the tensors, beside torch.distributed.checkpoint's shard files.
SHARDED_METADATA_FILE = "meta.pt"


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder of shards (``trainer=fsdp``)."""
    return path.is_dir() and (path / SHARDED_METADATA_FILE).is_file()


def settings_file(path: Path) -> Path:
    """The file of a checkpoint that holds everything but the model's tensors (progress,
    hyperparameters, data settings): the checkpoint itself, or a sharded folder's
    ``meta.pt``."""
    return path / SHARDED_METADATA_FILE if is_sharded_checkpoint(path) else path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint as one dict, from one file or from a sharded checkpoint folder.

    A sharded folder's model shards are put back together in this process (its
    optimizer states are left on disk): the state dict is whole, as in a file.
    """
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # What torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, in memory
    # and for the model alone.
    shards: dict[str, Any] = {}
    _load_state_dict(shards, storage_reader=FileSystemReader(path),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)  # fmt: skip
    checkpoint = torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = shards["model"]
    return checkpoint


def read_frozen_weights(path: Path) -> dict[str, torch.Tensor]:
    """The frozen parameters a checkpoint refers to (names as in its state dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RuntimeError(
            f"{path} could not be read ({err}); the run's files are damaged"
        ) from err


def locate_frozen_weights(checkpoint_path: str | Path | None, recorded: str) -> Path:
    """The frozen-weights file of a checkpoint: beside it first (the run folder may have
    moved or been copied since training), else where training wrote it."""
    candidates = []
    if checkpoint_path is not None:
        candidates.append(Path(checkpoint_path).parent / Path(recorded).name)
    candidates.append(Path(recorded))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{candidates[0]} is missing: the checkpoint beside it keeps its frozen weights there. "
        "Copy the whole checkpoints/ folder, or export the model with export.py."
    )


def complete_state_dict(checkpoint: dict[str, Any], checkpoint_path: str | Path | None) -> None:
    """Add a checkpoint's frozen weights to its ``state_dict`` and bring tensor names
    written by earlier versions up to date; in place."""
    recorded = checkpoint.get("frozen_weights")
    if recorded:
        frozen = read_frozen_weights(locate_frozen_weights(checkpoint_path, str(recorded)))
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
    checkpoint["state_dict"] = upgrade_names(checkpoint["state_dict"], prefix="model.")


def upgrade_names(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensor names of checkpoints and exports written before ``SequenceClassifier``
    (``tok_emb...`` rather than ``backbone.tok_emb...``, fused ``att.qkv``)."""
    if not any(name.startswith(f"{prefix}tok_emb.") for name in state):
        return state
    moved = {
        f"{prefix}backbone.{name.removeprefix(prefix)}" if name.startswith(prefix) else name: t
        for name, t in state.items()
    }
    return split_fused_qkv(moved)
