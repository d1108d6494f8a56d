"""What the jobs of one process (a Hydra multirun) share: the loaded backbone weights.

Loading gpt2-xl takes seconds to minutes; a sweep over the learning rate loads the
same weights in every job. :func:`shared_backbone` keeps the last backbone built and
hands each later job with the same key a new :class:`GPT` over the same tensors. That
is safe because :class:`~gpt_classifier.training.module.ClassifierModule` gives every
parameter that trains its own copy before the first step (frozen ones are never
written), and because the key covers everything the weights depend on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.model.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)

# key -> (config, tensors by name, the torch RNG state right after building, the
# pretrained classifier head if the weights had one)
_HELD: dict[
    tuple[Any, ...], tuple[GPTConfig, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]
] = {}


def source_signature(source: str | Path) -> tuple[Any, ...]:
    """What identifies a weights source's content: for a local file or folder, each
    file's name, size and modification time (a changed file is a new source); for a
    Hub name, the name (its download cache already pins the files)."""
    path = Path(source).expanduser()
    if not path.exists():
        return ("hub", str(source))
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return ("local", str(path.resolve()),
            tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))  # fmt: skip


def rng_signature() -> str:
    """A digest of the torch RNG state: a random initialisation depends on it."""
    state = torch.random.get_rng_state().numpy().tobytes()
    return hashlib.blake2b(state, digest_size=16).hexdigest()


def shared_backbone(key: tuple[Any, ...], build: Callable[[], GPT]) -> GPT:
    """``build()``, or, when the last call had the same ``key``, a new model over the
    tensors that call built, with the torch RNG left as ``build()`` would leave it
    (later random draws, e.g. the data order, stay those of a fresh process)."""
    held = _HELD.get(key)
    if held is None:
        _HELD.clear()  # one backbone at a time: memory stays that of one model
        model = build()
        state = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
        head = getattr(model, "pretrained_head", None)
        _HELD[key] = (model.cfg, state, torch.random.get_rng_state(), head)
        return model
    cfg, state, rng_after, head = held
    torch.random.set_rng_state(rng_after)
    log.info("Backbone weights reused from this process's previous job")
    model = GPT.from_state_dict(cfg, state)
    if head is not None:
        model.pretrained_head = head
    return model


def clear() -> None:
    """Forget the held backbone (its memory is freed once no model uses it)."""
    _HELD.clear()
