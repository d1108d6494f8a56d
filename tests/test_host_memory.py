"""keep_freed_memory: a training step's freed blocks are reused, not faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from gpt_classifier.tasks.train import ConfigError, tune_host_memory

# Page faults per "step" of a step's worth of gradient-sized tensors written and freed
# (9, 9, 2.25 and 0.5 MiB), in a fresh process: with glibc's own policy each step
# faults its ~20 MiB in again (about 4,600 faults of 4 KiB here).
STEP_FAULTS = """
import resource, sys
import torch
from gpt_classifier.host_memory import keep_freed_memory
if sys.argv[1] == "tuned" and not keep_freed_memory():
    sys.exit("keep_freed_memory() did not take effect")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    held = [torch.ones(n) for n in (768 * 3072, 3072 * 768, 768 * 768, 128 * 1024)]
    del held
for _ in range(3):
    step()
start = faults()
for _ in range(20):
    step()
print((faults() - start) / 20)
"""


def step_faults(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True,
                            text=True, check=True)  # fmt: skip
    return float(result.stdout.strip())


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_freed_step_memory_is_reused_without_page_faults():
    tuned, default = step_faults("tuned"), step_faults("default")
    # A page (4 KiB) in 10 MiB: what a step's memory costs in faults once it is kept.
    assert tuned < 250, f"{tuned} page faults per step with keep_freed_memory (default {default})"


def test_keep_freed_memory_gb_is_checked():
    tune_host_memory(None)  # glibc's own policy: nothing to do
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=f"keep_freed_memory_gb={bad}; give a positive"):
            tune_host_memory(bad)
