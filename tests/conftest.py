"""Shared test fixtures: the real SMS file and tokenizer from ../shared, found or failed loudly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (pyproject's addopts: one worker per core), each worker and the
# train.py processes it starts use one thread: workers with a thread per core each would
# oversubscribe the cores (OpenMP threads spin while waiting for each other).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
SHARED = REPO_ROOT.parent / "shared"
SMS_ENV = "GPT_CLASSIFIER_SMS_FILE"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require(path: Path, what: str, how: str) -> Path:
    if path.exists():
        return path
    message = f"{what} not found at {path}; {how}"
    if _in_ci():  # in CI these must run, never skip
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def _offline_tokenizer() -> None:
    """Point tiktoken at ../shared's copy of GPT-2's BPE files when no cache is set."""
    cache = SHARED / "tiktoken_cache"
    if "TIKTOKEN_CACHE_DIR" not in os.environ and cache.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


@pytest.fixture(scope="session")
def sms_file() -> Path:
    """The real UCI SMSSpamCollection file: GPT_CLASSIFIER_SMS_FILE, else ../shared's
    copy, else the project's own verified download into data/ (once, kept there)."""
    if SMS_ENV in os.environ:
        path = Path(os.environ[SMS_ENV])
        return _require(path, "the SMS Spam Collection file", f"fix {SMS_ENV}")
    shared = SHARED / "data" / "sms_spam_collection" / "SMSSpamCollection"
    if shared.is_file():
        return shared
    from gpt_classifier.data.download import DownloadError
    from gpt_classifier.data.sms import ensure_sms_file

    try:
        return ensure_sms_file(None, REPO_ROOT / "data" / "sms_spam_collection")
    except DownloadError as err:
        first_line = str(err).splitlines()[0]
        return _require(
            shared, "the SMS Spam Collection file",
            f"no network to download it ({first_line}); set {SMS_ENV} to a copy",
        )  # fmt: skip


@pytest.fixture(scope="session")
def tiktoken_files() -> Path:
    """The folder of tiktoken's cached GPT-2 BPE files."""
    folder = Path(os.environ.get("TIKTOKEN_CACHE_DIR", SHARED / "tiktoken_cache"))
    return _require(folder, "tiktoken's cache", "set TIKTOKEN_CACHE_DIR")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory) -> None:
    """Runs persist their prefix cache (the default): into a folder of this session,
    not the repository's .cache, unless a test names its own."""
    os.environ["GPT_CLASSIFIER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sms_file) -> Path:
    """A briefly trained gpt2-tiny run (two epochs), shared by the tests that only read it."""
    from entry_points import ok, run_entry

    out = tmp_path_factory.mktemp("trained") / "run"
    here = out.parent / "data"  # a relative data.path: eval.py from elsewhere must find it
    here.mkdir()
    shutil.copy(sms_file, here / "SMSSpamCollection")
    # float32, as inference runs: the tests compare eval.py with the run's metrics.
    ok(run_entry(REPO_ROOT / "train.py", "model=gpt2-tiny", "accelerator=cpu",
                 "trainer.precision=32-true", "data.path=SMSSpamCollection", "trainer.max_epochs=2",
                 f"hydra.run.dir={out}", "callbacks.progress_bar.refresh_rate=0",
                 cwd=here))  # fmt: skip
    return out
