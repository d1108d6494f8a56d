"""What a sweep's jobs (``python train.py -m``, one process) hand on to the next job.

The loaded backbone, the tokenized splits, the frozen prefix's fingerprint and entries,
and the frozen-weights file each go through :func:`reuse`: a job gets what the previous
job built when it asks with an equal key, else builds anew. One entry per kind, so
memory stays that of one job. Every key covers all that the value depends on, so a job's
results are bit-identical to the same job run alone (tests/test_reuse.py); the rent this
pays on a 10-job sweep is in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_LAST: dict[str, tuple[Hashable, Any]] = {}


def reuse(kind: str, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, or the value the previous call for ``kind`` built, if its key equals
    ``key``."""
    held = _LAST.get(kind)
    if held is not None and held[0] == key:
        log.info("Sweep: %s reused from this process's previous job", kind)
        return held[1]
    _LAST.pop(kind, None)  # the old value's memory goes before the new one is built
    value = build()
    _LAST[kind] = (key, value)
    return value


def forget() -> None:
    """Drop everything held (tests, or a process that wants its memory back)."""
    _LAST.clear()
