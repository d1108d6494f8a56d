"""Running the entry points as a user does: ``python train.py ...`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_entry(
    *args: str | Path,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    input: str = "",  # noqa: A002 (subprocess.run's name)
) -> subprocess.CompletedProcess:
    """``python <args>`` (an entry point or script and its arguments), its output
    captured; ``input`` is its standard input (empty: predict.py reads texts from a pipe)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def start_entry(*args: str | Path, env: dict[str, str] | None = None,
                **popen: Any) -> subprocess.Popen:  # fmt: skip
    """``python <args>`` started in the background (``popen``: its streams, its session)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, **popen)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result``, asserting it succeeded (else its output's end is the message)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_train(tmp_path: Path, sms_file: Path, *overrides: str, multirun: bool = False):
    """``python train.py`` with gpt2-tiny on the real SMS data, outputs under ``tmp_path``."""
    where = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else [
        f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    return run_entry(
        "train.py", *where, "model=gpt2-tiny", "accelerator=cpu", f"data.path={sms_file}",
        f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=2",
        "callbacks.progress_bar.refresh_rate=0", *overrides,
    )  # fmt: skip
