"""Running the entry points as a user does: ``python train.py ...`` in a process of its own."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Environment variables read when a run uses them, not when it imports its libraries: a
# run whose environment differs from the preloaded Python's in any other starts afresh.
CALL_TIME_VARIABLES = (
    "PYTEST_CURRENT_TEST", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "SLURM_", "SUBMITIT_", "MLFLOW_",
    "WANDB_", "HYDRA_FULL_ERROR", "GPT_CLASSIFIER_", "TORCHINDUCTOR_CACHE_DIR",
    "PYTORCH_NVML_BASED_CUDA_CHECK", "TOKENIZERS_PARALLELISM",
)  # fmt: skip
ENTRY_POINTS = ("train.py", "eval.py", "predict.py", "export.py", "serve.py", "baseline.py")


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
    args = tuple(map(str, args))
    fresh = os.environ.get("GPT_CLASSIFIER_TEST_FRESH") == "1"
    if not fresh and (result := PRELOADED.run(args, cwd, env, timeout, input)) is not None:
        return result
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=input,
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


class PreloadedPython:
    """This test process's ``tests/preloaded_python.py``, started at its first use (and
    again once a test has changed a variable read at import): it runs an entry point in a
    forked child, which spares the seconds a new interpreter spends importing, unless the
    run has variables of its own read at import (``GPT_CLASSIFIER_TEST_FRESH=1``: never)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.lock = threading.Lock()
        self.pending = b""

    def run(self, args: tuple[str, ...], cwd: Path, env: dict[str, str], timeout: float,
            stdin: str) -> subprocess.CompletedProcess | None:  # fmt: skip
        """The run's result, or None where it needs a new interpreter."""
        script = Path(cwd, args[0]) if args else Path()
        if script.name not in ENTRY_POINTS or script.resolve().parent != REPO:
            return None
        if not self.lock.acquire(blocking=False):  # another thread's run is in it
            return None
        try:
            base = {**os.environ, "PYTHONUNBUFFERED": "1"}  # this test process's, as it is now
            stale = self.process is None or self.process.poll() is not None
            if stale or _read_at_import(base, self.env):  # a test changed it (PYTHONPATH)
                self._stop()
                self._start(base)
            if _read_at_import(env, self.env):  # this run's own PYTHONPATH, say
                return None
            return self._run(args, cwd, env, timeout, stdin)
        finally:
            self.lock.release()

    def _stop(self) -> None:
        if self.process is not None:
            os.close(self.request_fd)  # it ends at the end of its requests
            os.close(self.reply_fd)
            self.process.kill()
            self.process.wait()
            self.log.unlink(missing_ok=True)
        self.process, self.pending = None, b""

    def _start(self, env: dict[str, str]) -> None:
        request_read, self.request_fd = os.pipe()
        self.reply_fd, reply_write = os.pipe()
        handle, log_name = tempfile.mkstemp(prefix="preloaded-python-", suffix=".log")
        os.close(handle)
        self.log = Path(log_name)
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("preloaded_python.py")),
                 str(request_read), str(reply_write)],
                pass_fds=(request_read, reply_write), env=env, cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        os.close(request_read)
        os.close(reply_write)
        self.env = env

    def _reply(self, deadline: float | None) -> dict[str, Any] | None:
        """The next reply, or None at the deadline."""
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.reply_fd], [], [], wait)[0]:
                return None
            if not (data := os.read(self.reply_fd, 1 << 16)):
                raise RuntimeError(f"tests/preloaded_python.py stopped:\n{self.log.read_text()}")
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def _run(self, args: tuple[str, ...], cwd: Path, env: dict[str, str], timeout: float,
             stdin: str) -> subprocess.CompletedProcess:  # fmt: skip
        """``subprocess.run``'s answer for the run, from a forked child."""
        folder = Path(tempfile.mkdtemp(prefix="entry-"))
        try:
            streams = {name: str(folder / name) for name in ("stdin", "stdout", "stderr")}
            Path(streams["stdin"]).write_text(stdin)
            request = {"argv": list(args), "cwd": str(cwd), "env": env, **streams}
            os.write(self.request_fd, (json.dumps(request) + "\n").encode())
            pid = self._reply(None)["pid"]
            if (reply := self._reply(time.monotonic() + timeout)) is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
            output, errors = (Path(streams[name]).read_text() for name in ("stdout", "stderr"))
            command = [sys.executable, *args]
            if reply is None:
                raise subprocess.TimeoutExpired(command, timeout, output, errors)
            return subprocess.CompletedProcess(command, reply["returncode"], output, errors)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _read_at_import(env: dict[str, str], other: dict[str, str]) -> list[str]:
    """The variables that differ between two environments, but for those read at call time."""
    return [k for k in env.keys() | other.keys()
            if env.get(k) != other.get(k) and not k.startswith(CALL_TIME_VARIABLES)]  # fmt: skip


PRELOADED = PreloadedPython()
atexit.register(PRELOADED._stop)
