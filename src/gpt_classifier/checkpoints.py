"""Training checkpoints, found and read the same way by training and inference.

:func:`find_checkpoint` is the one rule for what a ``ckpt_path`` names. A checkpoint
keeps what trains; the frozen weights are written once per run into
``frozen.safetensors`` beside it (a gpt2-small ``last_block`` checkpoint is ~85 MB
instead of 554 MB), and :func:`complete_state_dict` adds them back. No Lightning here:
inference reads checkpoints without it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.model.weight_names import split_fused_qkv

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


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one checkpoint: a file, or a sharded checkpoint folder."""
    return path.is_file() or is_sharded_checkpoint(path)


def find_checkpoint(where: Path, best: bool = False) -> Path:
    """The checkpoint ``where`` names: itself when it is one; in a run folder (or its
    ``checkpoints/``) the one that trained furthest, or with ``best`` the run's best: the
    one its ``metrics.json`` names, or until it has one, its furthest checkpoint (looked for
    in this folder first: it may have been moved since). Raises FileNotFoundError saying
    what to pass instead."""
    where = Path(where).expanduser()
    if is_checkpoint(where):
        return where
    if not where.exists():
        raise FileNotFoundError(
            f"checkpoint {where} does not exist; pass a .ckpt file or a run folder"
        )
    run = where.parent if where.name == "checkpoints" else where
    folder = run / "checkpoints"
    metrics = run / "metrics.json"
    recorded = None
    if best and metrics.is_file():  # a finished run: the checkpoint its final evaluation took
        recorded = json.loads(metrics.read_text()).get("best_checkpoint")
    if named := _named(folder, recorded):
        return named
    found = [p for p in folder.glob("*.ckpt") if is_checkpoint(p)] if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no checkpoint (*.ckpt) in {folder}: point at a training run's folder (the one "
            "holding checkpoints/; to resume it, hydra.run.dir=<that folder>), or give a "
            ".ckpt file."
        )
    # Ties (a best checkpoint and last.ckpt saved at one step) go to last.ckpt.
    furthest = max(found, key=lambda p: (checkpoint_header(p)["global_step"], p.stat().st_mtime,
                                         p.name == "last.ckpt"))  # fmt: skip
    # A run that has not finished (no metrics.json): its furthest checkpoint knows its best.
    named = _named(folder, checkpoint_header(furthest)["best_model_path"]) if best else None
    return named or furthest


def _named(folder: Path, recorded: str | None) -> Path | None:
    """The checkpoint a run recorded as its best: in ``folder`` by name (the run may have
    moved since), else where it was written (a run continued from another folder)."""
    candidates = (folder / Path(recorded).name, Path(recorded)) if recorded else ()
    return next((candidate for candidate in candidates if is_checkpoint(candidate)), None)


def data_settings(ckpt_path: str | Path) -> dict[str, Any]:
    """The data settings of the run ``ckpt_path`` names (its best checkpoint's); empty
    for an export folder, which keeps none, and for checkpoints older than them."""
    path = Path(ckpt_path).expanduser()
    if (path / "config.json").is_file():  # an export folder
        return {}
    stored = torch.load(settings_file(find_checkpoint(path, best=True)), map_location="cpu",
                        weights_only=True, mmap=True)  # fmt: skip
    return dict(stored.get("datamodule_hyper_parameters") or {})


def checkpoint_header(path: Path) -> dict[str, Any]:
    """A checkpoint's progress fields, read without loading its tensors (of a sharded
    checkpoint folder: from its metadata file, beside the shards)."""
    try:
        stored = torch.load(settings_file(Path(path)), map_location="cpu", weights_only=True,
                            mmap=True)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise RuntimeError(f"{path} is not a readable checkpoint ({err})") from err
    loop = stored.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    best = [
        state.get("best_model_path")
        for state in (stored.get("callbacks") or {}).values()
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_path")
    ]
    stopped = [state["wait_count"] for state in (stored.get("callbacks") or {}).values()
               if isinstance(state, dict) and "wait_count" in state
               and (state.get("stopped_epoch") or state.get("stopping_reason"))]  # fmt: skip
    return {"global_step": int(stored.get("global_step", 0)),
            # Early stopping ended the run: how many validations it had waited then.
            "early_stopping_wait": stopped[0] if stopped else None,
            # The best checkpoint so far by the monitored metric (ModelCheckpoint's state).
            "best_model_path": best[0] if best else None,
            "epoch": int(stored.get("epoch", 0)),
            "epochs_done": stored.get("epochs_done"),
            # The step Lightning's loggers were at (TensorBoard continues from it).
            "batches_that_stepped": int(loop.get("_batches_that_stepped",
                                                 stored.get("global_step", 0)))}  # fmt: skip


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint as one dict, from one file or from a sharded checkpoint folder.

    A sharded folder's model shards are put back together in this process (its
    optimizer states are left on disk): the state dict is whole, as in a file.
    """
    if not is_sharded_checkpoint(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    import torch.distributed.checkpoint as dcp

    # The model's tensors, allocated whole from the folder's metadata, then filled from
    # every shard by this one process.
    reader = dcp.FileSystemReader(path)
    model: dict[str, torch.Tensor] = {}
    for name, meta in reader.read_metadata().state_dict_metadata.items():
        if name.startswith("model.") and isinstance(meta, dcp.TensorStorageMetadata):
            model[name.removeprefix("model.")] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # that it loads in one process, as asked
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    checkpoint = torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = model
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


# safetensors' dtype names, for reading a file straight into tensors.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64, "I64": torch.int64}  # fmt: skip


def load_frozen_weights_in_place(
    checkpoint: dict[str, Any], checkpoint_path: str | Path | None, state: dict[str, torch.Tensor]
) -> bool:
    """Read a checkpoint's frozen weights straight into the tensors of ``state`` (a
    module's state dict, ``keep_vars``), so that no second copy of the model is held,
    not even as mapped pages of the file; False (nothing read) where the file's names
    are not all in ``state`` (a checkpoint of an earlier version: use
    :func:`complete_state_dict`)."""
    recorded = checkpoint.get("frozen_weights")
    if not recorded:
        return False
    path = locate_frozen_weights(checkpoint_path, str(recorded))
    try:
        with path.open("rb") as f:
            # The safetensors layout: an 8-byte header size, a JSON header, the data.
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            start = f.tell()
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            if not set(entries) <= set(state):
                return False
            with torch.no_grad():
                for name, entry in entries.items():
                    target = state[name]
                    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                    begin, end = entry["data_offsets"]
                    if dtype != target.dtype or list(entry["shape"]) != list(target.shape):
                        raise ValueError(f"tensor {name} is {entry['dtype']} {entry['shape']}")
                    if end - begin != target.numel() * target.element_size():
                        raise ValueError(f"tensor {name} has {end - begin} bytes")
                    f.seek(start + begin)
                    if not target.is_contiguous() or target.device.type != "cpu":
                        target.copy_(torch.frombuffer(bytearray(f.read(end - begin)), dtype=dtype)
                                     .view(target.shape))  # fmt: skip
                    elif f.readinto(target.detach().view(-1).view(torch.uint8).numpy()) != (
                        end - begin
                    ):
                        raise ValueError(f"the file ends inside tensor {name}")
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(
            f"{path} could not be read ({err}); the run's files are damaged"
        ) from err
    missing = set(state) - set(entries) - set(checkpoint["state_dict"])
    if missing:
        raise RuntimeError(f"{checkpoint_path} and {path} lack {sorted(missing)[:5]}")
    return True


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
