"""The prefix cache's files: one per fingerprint of the frozen weights and settings,
read when a run starts (or taken from a sweep's previous job), written when its pass
ends, and kept within a disk budget.

A file holds the blocks of host memory the entries view (``hidden.<n>``), written as
they are, and an index: each entry's token ids, block, first row and rows. Neither
writing nor reading makes a second copy of the hidden states: at the memory budget
(``prefix_cache.max_memory_gb``) a copy would double the run's memory."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.files import atomic_path
from gpt_classifier.sweep_reuse import reuse
from gpt_classifier.training.prefix_cache import FILE_FORMAT, PrefixCache

log = logging.getLogger(__name__)

INDEX = ("tokens", "lengths", "blocks", "starts", "extents")
Row = tuple[bytes, int, int]  # an entry's key, first row and rows in its block


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
        if load(cache, file, fingerprint, wanted):
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
        save(cache, file, fingerprint)
    except OSError as err:
        log.warning("Prefix cache not saved to %s (%s)", file, err)
        return
    for old in evict_oldest(file.parent, max_bytes, keep=file):
        log.info("Prefix cache: removed %s (least recently used; prefix_cache.max_gb=%g)",
                 old, max_bytes / 1e9)  # fmt: skip


def load(cache: PrefixCache, path: Path, fingerprint: str, wanted: set[bytes] | None = None) -> int:
    """Add to ``cache`` the entries stored at ``path`` (those with a ``wanted`` key, if
    given) if it holds ``fingerprint``'s values; returns how many were read. A damaged
    or foreign file is ignored (logged), never trusted. Blocks are read one at a time."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return 0
    found: dict[bytes, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if (stored_for := metadata.get("fingerprint")) != fingerprint:
                raise ValueError(f"it holds fingerprint {stored_for!r}, not {fingerprint!r}")
            index = {name: f.get_tensor(name) for name in INDEX}
            keys = [t.numpy().tobytes() for t in index["tokens"].split(index["lengths"].tolist())]
            if any(len(index[name]) != len(keys) for name in INDEX[2:]):
                raise ValueError("its index is inconsistent")
            rows: dict[int, list[Row]] = {}
            for key, block, start, n in zip(keys, *(index[name].tolist() for name in INDEX[2:])):
                rows.setdefault(block, []).append((key, start, n))
            digest = hashlib.sha256()
            for name in sorted(f.keys()):  # noqa: SIM118 (a safe_open has no __iter__)
                tensor = index[name] if name in index else f.get_tensor(name)
                _update(digest, name, tensor)
                if name not in index:
                    here = rows.get(int(name.removeprefix("hidden.")), [])
                    found.update(_entries_in(cache, tensor, here, wanted))
        if digest.hexdigest() != metadata.get("sha256"):
            raise ValueError("its contents do not match their checksum (damaged)")
    except (SafetensorError, OSError, KeyError, RuntimeError, ValueError) as err:
        log.warning("Ignoring prefix cache file %s (%s); recomputing", path, err)
        return 0
    for key, h in found.items():
        if key not in cache.entries or len(cache.entries[key]) < len(h):
            cache.entries[key] = h
    return len(found)


def _entries_in(cache: PrefixCache, block: torch.Tensor, here: list[Row],
                wanted: set[bytes] | None) -> dict[bytes, torch.Tensor]:  # fmt: skip
    """The entries ``here`` of a block: views of it where every one is wanted, else
    copies of those wanted (a view would keep the whole block in memory)."""
    if block.ndim != 2 or block.shape[1] != cache.model.cfg.emb_dim:
        raise ValueError(f"hidden states of shape {tuple(block.shape)}")
    if any(start < 0 or start + n > len(block) for _, start, n in here):
        raise ValueError("its index does not match its hidden states")
    block = block.to(cache.dtype)
    kept = [row for row in here if wanted is None or row[0] in wanted]
    if len(kept) < len(here):
        parts = [block[start : start + n] for _, start, n in kept]
        starts = itertools.accumulate((len(p) for p in parts), initial=0)
        block = torch.cat(parts) if parts else block[:0]
        kept = [(key, start, n) for (key, _, n), start in zip(kept, starts)]
    return {key: block[start : start + n] for key, start, n in kept}


def save(cache: PrefixCache, path: Path, fingerprint: str) -> None:
    """Merge ``cache``'s entries into the file at ``path`` under a lock and replace it
    atomically: concurrent jobs never see half a file, and none loses another's rows."""
    from filelock import FileLock
    from safetensors.torch import save_file

    if not cache.entries:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    own = cache.entries
    with FileLock(str(path.with_name(path.name + ".lock"))):
        # What other jobs added since this one read it goes into the file, not into
        # this run's memory.
        cache.entries = dict(own)
        try:
            load(cache, path, fingerprint)
            tensors = _as_tensors(cache.entries)
        finally:
            cache.entries = own
        metadata = {"fingerprint": fingerprint, "format": str(FILE_FORMAT),
                    "sha256": checksum(tensors)}  # fmt: skip
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)


def _as_tensors(entries: dict[bytes, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors: the index, and each block of host memory the entries view."""
    blocks: dict[int, tuple[int, torch.Tensor]] = {}  # by the address of their memory
    where = []
    for key, h in entries.items():
        width = h.shape[1]
        if not h.is_contiguous() or h.storage_offset() % width:
            entries[key] = h = h.clone()  # not whole rows of a block: a block of its own
        memory = h.untyped_storage()
        if memory.data_ptr() not in blocks:
            flat = torch.empty(0, dtype=h.dtype).set_(memory)
            block = flat[: len(flat) // width * width].view(-1, width)
            blocks[memory.data_ptr()] = (len(blocks), block)
        where.append((blocks[memory.data_ptr()][0], h.storage_offset() // width))
    tokens = [torch.frombuffer(bytearray(k), dtype=torch.int64) for k in entries]
    return {
        "tokens": torch.cat(tokens),
        "lengths": torch.tensor([len(t) for t in tokens], dtype=torch.int64),
        "blocks": torch.tensor([b for b, _ in where], dtype=torch.int64),
        "starts": torch.tensor([s for _, s in where], dtype=torch.int64),
        "extents": torch.tensor([len(h) for h in entries.values()], dtype=torch.int64),
        **{f"hidden.{number}": block for number, block in blocks.values()},
    }


def _update(digest: Any, name: str, tensor: torch.Tensor) -> None:
    digest.update(name.encode())
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes, by name: what a cache file stores of its contents."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        _update(digest, name, tensors[name])
    return digest.hexdigest()
