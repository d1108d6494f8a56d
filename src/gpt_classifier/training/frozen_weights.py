"""Checkpoints that keep only what trains; frozen weights written once per run."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from gpt_classifier.checkpoints import FROZEN_WEIGHTS_FILE

log = logging.getLogger(__name__)

TensorKey = tuple[int, tuple[int, ...], torch.dtype, int]
# The file this process wrote last, and the tensors it holds as they were then: storage,
# shape, dtype and version counter (every in-place write, copy_ too, bumps it). The
# tensors are held too, so that no later tensor can take their memory and pass for them.
_WRITTEN: tuple[Path, dict[str, TensorKey], list[torch.Tensor], tuple[int, int]] | None = None


def tensor_keys(state: Mapping[str, torch.Tensor]) -> dict[str, TensorKey]:
    """What identifies each tensor's current contents without reading them."""
    return {name: (t.data_ptr(), tuple(t.shape), t.dtype, t._version) for name, t in state.items()}


def held_unchanged(path: Path, state: Mapping[str, torch.Tensor]) -> set[str]:
    """The names of ``state`` whose tensors ``path`` holds because this process wrote it
    from those very tensors, untouched since (empty if it did not)."""
    if _WRITTEN is None or _WRITTEN[0] != path.resolve():
        return set()
    written, now = _WRITTEN[1], tensor_keys({k: state[k] for k in _WRITTEN[1] if k in state})
    return set(written) if now == written else set()


class FrozenWeightsFile(L.Callback):
    """Writes the frozen parameters once, to ``frozen.safetensors`` beside the
    checkpoints, which then keep only what the fine-tuning method trains.

    A gpt2-small ``last_block`` checkpoint shrinks from 554 MB to 85 MB (gpt2-xl's
    from 6 GB), and each save takes a fraction of the time. Loading completes a
    checkpoint from the file beside it (:func:`gpt_classifier.checkpoints.complete_state_dict`).
    """

    def __init__(self) -> None:
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            # Each process holds shards only, and a state_dict() of the inner model would
            # make FSDP take a transformer block for the root of the wrapped model (the
            # first step then fails). FSDP's checkpoints keep every tensor, in shards.
            log.info("Frozen weights stay in FSDP's checkpoints, sharded like the rest")
            return
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        keep = pl_module.method.checkpoint_names(pl_module.model)
        frozen = {f"model.{name}": t for name, t in pl_module.model.state_dict().items()
                  if name not in keep}  # fmt: skip
        if not dirpath or not frozen:
            return
        path = Path(dirpath) / FROZEN_WEIGHTS_FILE
        if trainer.ckpt_path and path.is_file():
            # Resuming in the run's folder: the file holds these very weights (the
            # checkpoint was completed from it), so a gpt2-xl run skips rewriting 6 GB.
            self.path = path
            return
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            keys = tensor_keys(frozen)
            if _WRITTEN is not None and _WRITTEN[1] == keys and _link_unchanged(_WRITTEN, tmp):
                # A sweep's earlier job wrote these very tensors: the same bytes.
                how = f"in {path}: a hard link to {_WRITTEN[0]} (the same tensors)"
            else:
                from safetensors.torch import save_file

                save_file({k: t.detach().cpu().contiguous() for k, t in frozen.items()}, str(tmp))
                how = f"written once to {path}"
            os.replace(tmp, path)
            _remember(path, keys, list(frozen.values()))
            log.info("Frozen weights (%d tensors) %s", len(frozen), how)
        trainer.strategy.barrier("frozen_weights")  # other processes read it on resume
        self.path = path

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.path is None:
            return
        keep = {f"model.{name}" for name in pl_module.method.checkpoint_names(pl_module.model)}
        state = checkpoint["state_dict"]
        for name in [n for n in state if n.startswith("model.") and n not in keep]:
            del state[name]
        checkpoint["frozen_weights"] = str(self.path.resolve())


def _file_state(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _remember(path: Path, keys: dict[str, TensorKey], tensors: list[torch.Tensor]) -> None:
    global _WRITTEN
    _WRITTEN = (path.resolve(), keys, tensors, _file_state(path))


def _link_unchanged(written: tuple[Path, Any, Any, tuple[int, int]], target: Path) -> bool:
    """Hard-link ``target`` to the file written last, if it is as this process left it;
    False where it is not, or links cannot be made (another file system, none at all),
    and the caller writes instead."""
    source, _, _, state = written
    try:
        if _file_state(source) != state:
            return False
        os.link(source, target)
    except OSError:
        return False
    return True
