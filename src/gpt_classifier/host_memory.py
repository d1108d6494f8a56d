"""Host memory: keep freed blocks for reuse instead of faulting them in again each step.

glibc's ``malloc`` hands large freed blocks back to the kernel (blocks over its mmap
threshold are unmapped, and free memory at the heap's top is trimmed). A CPU training
step allocates and frees the same tens of megabytes every time (the last block's
gradients, bfloat16 copies of its weights under autocast), so every step faults those
pages in again, zero-filled by the kernel: on a cached gpt2-small ``last_block`` step
thousands of page faults, half of a bf16-mixed step. Raising the two thresholds keeps
the memory in the process, where the next step's allocations find it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
# Larger blocks (gpt2-xl's MLP gradients, 39 MiB) are still mapped afresh each time.
MAX_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory(keep_bytes: int = 2**30) -> bool:
    """Have glibc serve allocations up to 32 MiB from its heap and keep up to
    ``keep_bytes`` of freed memory there; True where that took effect.

    A no-op that returns False outside Linux with glibc (macOS, musl), where the
    allocator is another and has its own policy. It changes no values, only where
    memory comes from; the process's peak memory stays what the work needs.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt too)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The trim threshold is an int here: clamp to what mallopt can take.
    keep = max(0, min(int(keep_bytes), 2**31 - 1))
    # Fixing the mmap threshold also ends glibc's adaptive one, which otherwise rises
    # and falls with the block sizes freed and keeps trimming the heap behind them.
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, keep)
    )
    if applied:
        log.debug("glibc malloc: blocks up to 32 MiB from the heap, %d bytes of free memory kept",
                  keep)  # fmt: skip
    return applied
