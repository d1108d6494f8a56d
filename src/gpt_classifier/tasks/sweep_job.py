"""A sweep job whose strategy starts more processes runs as its own ``python train.py``.

Lightning's ``ddp``/``fsdp`` start their other processes by re-running the script with
``sys.argv``. Under ``python train.py -m`` that would start a second sweep in every
process (Lightning's changelog, #15737), and under a submitit launcher ``sys.argv`` is
not ``train.py`` at all. So such a job runs ``python train.py <the job's overrides>`` in
its own folder, where Lightning starts its processes as in any single run, and the
sweep reads the job's ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpt_classifier.training.distributed import RANK_VARIABLES

log = logging.getLogger(__name__)


def entry_script() -> Path:
    """``train.py`` beside the config folder Hydra read this job's config from."""
    from hydra.core.hydra_config import HydraConfig

    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            script = Path(source.path).parent / "train.py"
            if script.is_file():
                return script
    raise FileNotFoundError(
        "this sweep job must run as its own `python train.py` (its strategy starts more "
        "processes), but no train.py was found beside the config folder"
    )


def run_in_own_process() -> None:
    """Run this sweep job as ``python train.py <the job's overrides>`` in its own
    folder and wait for it; the job's processes are then started by Lightning as in
    any single run. Raises when the job fails."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    command = [
        sys.executable, str(entry_script()), *hydra_cfg.overrides.task,
        f"hydra.run.dir={output_dir}",
        # The sweep already wrote this job's .hydra/ (its overrides feed the summary).
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}",
    ]  # fmt: skip
    log.info("Sweep job %s runs in its own process (its strategy starts more processes): %s",
             hydra_cfg.job.num, " ".join(command))  # fmt: skip
    # Outside this sweep's process: no rank variables of any launcher.
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    process = subprocess.Popen(command, cwd=hydra_cfg.runtime.cwd, env=env)
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: Any) -> None:
        process.send_signal(signum)  # it checkpoints and stops; the sweep stops with it

    signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = process.wait()
                break
            except KeyboardInterrupt:  # the job got the same Ctrl-C: let it checkpoint
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped, checkpointed
        raise SystemExit(code)
    if code != 0:
        raise RuntimeError(
            f"sweep job {hydra_cfg.job.num} failed (exit code {code}); its log: "
            f"{output_dir / (hydra_cfg.job.name + '.log')}"
        )
