"""A run's folder: who may train in it, the checkpoint to continue from, whether it finished."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt_classifier.checkpoints import find_checkpoint
from gpt_classifier.reporting.reports import RUN_CONFIG_FILE
from gpt_classifier.tasks.errors import ConfigError

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    """Whether this is a job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_started(output_dir: Path) -> bool:
    """Whether a job of the sweep that ``output_dir`` (a job's folder) belongs to has run."""
    return any(output_dir.parent.glob(f"*/{RUN_CONFIG_FILE}"))


def resume_checkpoint(ckpt_path: str, output_dir: Path) -> Path:
    """The checkpoint ``ckpt_path`` names: ``last`` (this run folder's furthest), a run
    folder, or a ``.ckpt`` file."""
    try:
        return find_checkpoint(output_dir if ckpt_path == "last" else Path(ckpt_path))
    except FileNotFoundError as err:
        weights = (Path(ckpt_path) / "config.json").is_file()  # an export or a Hub folder
        hint = f" To train from its weights, give model.weights={ckpt_path}." if weights else ""
        raise ConfigError(f"ckpt_path={ckpt_path}: {err}{hint}") from err


def requeued_run(output_dir: Path) -> str | None:
    """``last`` when SLURM has requeued this job and its folder holds checkpoints."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts == 0 or not any((output_dir / "checkpoints").glob("*.ckpt")):
        return None
    log.info("SLURM requeued this job (restart %d): resuming from its last checkpoint in %s",
             restarts, output_dir)  # fmt: skip
    return "last"


def check_new_run_folder(output_dir: Path) -> None:
    """A new run (no ``ckpt_path``) must not mix its checkpoints with an earlier run's."""
    checkpoints = [f"checkpoints/{p.name}" for p in sorted(output_dir.glob("checkpoints/*.ckpt"))]
    found = [name for name in (RUN_CONFIG_FILE, "metrics.json") if (output_dir / name).exists()]
    if found or checkpoints:
        earlier = (f"resume it with ckpt_path=last hydra.run.dir={output_dir}" if checkpoints
                   else f"it saved no checkpoint to resume from: delete {output_dir} to start "
                   "over there")  # fmt: skip
        raise ConfigError(
            f"the output folder {output_dir} holds a run already "
            f"({', '.join([*found, *checkpoints][:4])}): {earlier}, or start this run in "
            "a new folder (another hydra.run.dir or hydra.sweep.dir, or none: a new dated one)"
        )


_CLAIMED: list[Any] = []  # the lock of the run folder this process trains in


def claim_run_folder(output_dir: Path) -> None:
    """Lock the run folder while this process trains in it (the lock goes with the process):
    a run started in the same second, or a resume of a run still training, is refused."""
    from filelock import FileLock, Timeout

    while _CLAIMED:  # a sweep's earlier job in this process is done with its folder
        _CLAIMED.pop().release()
    # A requeued SLURM job waits: after a node failure, a network file system may hold
    # the lost job's lock until its lock recovery ends (90 s by default on NFS).
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    lock = FileLock(str(output_dir / ".train.lock"), timeout=180 if requeued else 0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"another process is training in {output_dir} now (runs started in the same second "
            "share a dated folder): give this run its own hydra.run.dir, or resume that run "
            "with ckpt_path=last once it has stopped"
        ) from None
    except (OSError, NotImplementedError) as err:  # a file system without locks (Lustre)
        log.warning("%s cannot be locked (%s): nothing keeps a second run out of it", output_dir,
                    err)  # fmt: skip
        return
    _CLAIMED.append(lock)


def finished_run(cfg: DictConfig, output_dir: Path, header: dict[str, Any]) -> float | None:
    """The final metric of a run that ``header``'s checkpoint shows complete, else None."""
    metrics_file = output_dir / "metrics.json"
    done, wanted = header.get("epochs_done"), cfg.trainer.get("max_epochs")
    waited = header.get("early_stopping_wait")
    patience = OmegaConf.select(cfg, "callbacks.early_stopping.patience", default=None)
    stopped = waited is not None and patience is not None and waited >= patience
    trained = done is not None and wanted is not None and 0 <= wanted <= done  # -1: no limit
    if not (trained or stopped) or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    how = (f"early stopping ended it (callbacks.early_stopping.patience={patience}); to train "
           "further, raise the patience" if stopped else f"{done} of trainer.max_epochs={wanted}"
           " epochs trained; to train further, add trainer.max_epochs=<more>")  # fmt: skip
    log.info("Run %s already finished: %s. Its %s is written; nothing to resume.",
             output_dir, how, metrics_file.name)  # fmt: skip
    return float(metrics.get(cfg.optimize_metric, float("nan")))


def job_metric(cfg: DictConfig, output_dir: Path) -> float:
    """``optimize_metric`` from the ``metrics.json`` a finished run wrote."""
    metrics = json.loads((output_dir / "metrics.json").read_text())
    if cfg.optimize_metric not in metrics:
        raise ConfigError(
            f"optimize_metric={cfg.optimize_metric!r} is not among the final metrics "
            f"{sorted(k for k in metrics if '/' in k)}"
        )
    return float(metrics[cfg.optimize_metric])


def remove_unused_run_folder(output_dir: Path) -> None:
    """The run folder Hydra made, when it holds only Hydra's files and a failed start's lock."""
    if not output_dir.is_dir():
        return
    hydras = {".hydra", ".train.lock"} | {p.name for p in output_dir.glob("*.log")}
    if {p.name for p in output_dir.iterdir()} <= hydras:
        shutil.rmtree(output_dir, ignore_errors=True)
