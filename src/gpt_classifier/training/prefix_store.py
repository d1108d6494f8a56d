"""The prefix cache's files: one per fingerprint of the frozen weights and settings,
read when a run starts (or taken from a sweep's previous job), written when its pass
ends, and kept within a disk budget."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from gpt_classifier.sweep_reuse import reuse
from gpt_classifier.training.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


def open_store(cache: PrefixCache, folder: Path, precision: str,
               wanted: set[bytes] | None = None) -> tuple[Path, str, str]:  # fmt: skip
    """Fill ``cache`` from its file in ``folder`` (the ``wanted`` keys; or, in a sweep,
    from the previous job's entries of the same fingerprint); its file, fingerprint, and
    where entries came from ("" if nowhere)."""
    # Weights are known by identity and version counter (an in-place update bumps it);
    # the held value keeps them, so that no other tensor can take their memory.
    params = [p for _, p in cache.prefix_parameters()]
    ident = (precision, cache.depth, cache.dtype, cache.pad_id, cache.model.cfg.causal_mask,
             tuple((p.data_ptr(), p._version, tuple(p.shape), p.dtype, str(p.device))
                   for p in params))  # fmt: skip
    fingerprint, _ = reuse("prefix fingerprint", ident,
                           lambda: (cache.fingerprint(precision), params))  # fmt: skip
    file = folder / f"prefix-{fingerprint}.safetensors"
    own, came_from = cache.entries, ""

    def read() -> dict[bytes, torch.Tensor]:
        nonlocal came_from
        if cache.load(file, fingerprint, wanted):
            came_from = str(file)
            touch(file)  # recently used: evicted last
        return cache.entries

    cache.entries = reuse("prefix entries", fingerprint, read)
    if cache.entries is not own:
        came_from = "this process's previous job"
    return file, fingerprint, came_from


def touch(file: Path) -> None:
    """Mark ``file`` recently used (evicted last)."""
    with contextlib.suppress(OSError):  # read-only folder: only the eviction order suffers
        os.utime(file)


def evict_oldest(directory: Path, max_bytes: int, keep: Path) -> list[Path]:
    """Delete the least recently used cache files of ``directory`` until the rest fit in
    ``max_bytes`` (``keep`` is never deleted); returns what was deleted."""
    files = []
    for file in directory.glob("prefix-*.safetensors"):
        try:
            stat = file.stat()
        except OSError:  # removed by a concurrent job meanwhile
            continue
        files.append((stat.st_mtime, stat.st_size, file))
    total = sum(size for _, size, _ in files)
    deleted = []
    for _, size, file in sorted(files):
        if total <= max_bytes:
            break
        if file == keep:
            continue
        file.unlink(missing_ok=True)
        file.with_name(file.name + ".lock").unlink(missing_ok=True)
        total -= size
        deleted.append(file)
    return deleted


def save_within_budget(cache: PrefixCache, file: Path, fingerprint: str, max_bytes: int) -> None:
    """Write ``cache`` to ``file``, then keep its folder within ``max_bytes``; a cache
    over the budget, or a disk that cannot take it, costs reuse, not the run."""
    if cache.nbytes > max_bytes:
        log.warning("Prefix cache not saved: its %.2f GB exceed prefix_cache.max_gb=%.2f",
                    cache.nbytes / 1e9, max_bytes / 1e9)  # fmt: skip
        return
    try:
        cache.save(file, fingerprint)
    except OSError as err:
        log.warning("Prefix cache not saved to %s (%s)", file, err)
        return
    for old in evict_oldest(file.parent, max_bytes, keep=file):
        log.info("Prefix cache: removed %s (least recently used; prefix_cache.max_gb=%g)",
                 old, max_bytes / 1e9)  # fmt: skip
