"""A run's folder: its own config, the checkpoint to continue from, whether it finished.

Hydra rewrites ``.hydra/`` on every start, so ``python train.py ckpt_path=last
hydra.run.dir=<run>`` would otherwise train with the defaults instead of the run's
settings. Each run writes ``run_config.yaml`` once; a resume starts from it and
applies only the plain ``key=value`` overrides of the resume command (e.g.
``trainer.max_epochs=10`` to train further).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from gpt_classifier.checkpoints import checkpoint_header, find_checkpoint
from gpt_classifier.files import atomic_path
from gpt_classifier.reporting.reports import RUN_CONFIG_FILE
from gpt_classifier.tasks.errors import ConfigError

log = logging.getLogger(__name__)

# Overrides a resume command always carries; they are not changes to the run.
RESUME_KEYS = ("ckpt_path",)
# What the split and the tokens depend on: a resume must not change them (the run's
# splits/ and the messages each split holds stay those its first start made).
DATA_KEYS = ("seed", "data.seed", "data.path", "data.train_frac", "data.validation_frac",
             "data.balance", "data.book_compat", "data.labels", "data.padding",
             "data.max_length", "data.truncation_side")  # fmt: skip


# How the training batches are drawn: kept within an epoch that a resume finishes.
BATCH_KEYS = ("data.batch_size", "data.shuffle", "data.drop_last", "data.bucket_by_length")


class ResumeConfigError(ValueError):
    """A resume command asks for something the run cannot continue with."""


def _hydra_state() -> tuple[list[str], dict[str, Any]]:
    """The command line's overrides and the config groups' choices, when under Hydra."""
    if not HydraConfig.initialized():
        return [], {}
    hydra = HydraConfig.get()
    return list(hydra.overrides.task), dict(hydra.runtime.choices)


def save_run_config(
    cfg: DictConfig, output_dir: Path, resolved: Mapping[str, Any] | None = None
) -> None:
    """Write ``run_config.yaml`` (the composed config, unresolved, how it was composed,
    and what its ``auto`` settings ``resolved`` to on this start, by key) unless the
    folder has one: a resumed run keeps its first."""
    path = output_dir / RUN_CONFIG_FILE
    if path.exists():
        return
    overrides, choices = _hydra_state()
    config = OmegaConf.to_container(cfg, resolve=False)
    config["ckpt_path"] = None  # a later resume names its own checkpoint
    record = OmegaConf.create({
        "config": config,
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")},
        "overrides": overrides,
        "resolved": dict(resolved or {}),
    })  # fmt: skip
    with atomic_path(path) as tmp:
        OmegaConf.save(record, tmp)


def absolute_paths(cfg: DictConfig) -> None:
    """The run's local files and folders (``data.path``, ``data.files.*``, a ``data.name`` or
    ``model.weights`` folder) named by absolute path in its config and checkpoints, so that
    ``eval.py`` and a resume find them from any working directory."""
    files = [f"data.files.{split}" for split in cfg.data.get("files") or {}]
    for key in ("data.path", "data.name", *files, "model.weights"):
        given = OmegaConf.select(cfg, key, default=None)
        path = Path(str(given)).expanduser()
        if given is not None and not Path(str(given)).is_absolute() and path.exists():
            OmegaConf.update(cfg, key, str(path.resolve()))
            log.info("%s=%s: the run keeps it as %s", key, given, path.resolve())


def config_for_resume(cfg: DictConfig, checkpoint: Path) -> DictConfig:
    """The config of the run ``checkpoint`` belongs to, with the resume command's plain
    ``key=value`` overrides applied; ``cfg`` as it is when the run kept none."""
    path = checkpoint.parent.parent / RUN_CONFIG_FILE
    if not path.is_file():
        log.warning("%s not found: resuming with this command's config, not the run's", path)
        return cfg
    record = _moved_accelerator_keys(OmegaConf.load(path))
    resumed = OmegaConf.create(OmegaConf.to_container(record.config, resolve=False))
    original = resumed.copy()
    overrides, choices = _hydra_state()
    changed = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in RESUME_KEYS or key.startswith("hydra"):
            continue
        if override.is_delete():
            raise ResumeConfigError(f"~{key}: a resume cannot remove keys of the run")
        if key in record.choices:  # a config group: its choice made the run what it is
            if str(choices.get(key)) != str(record.choices[key]):
                raise ResumeConfigError(
                    f"{key}={choices.get(key)}: the run in {checkpoint.parent.parent} was "
                    f"trained with {key}={record.choices[key]}; a resume keeps it. Start a new "
                    f"run (without ckpt_path) to train with {key}={choices.get(key)}."
                )
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        before = OmegaConf.select(resumed, key, throw_on_missing=False)
        with open_dict(resumed):
            OmegaConf.update(resumed, key, value, force_add=True)
        if before != value and key.startswith("optimizer.") and resumed.get("scheduler"):
            raise ResumeConfigError(
                f"{key}={value}: the run in {checkpoint.parent.parent} has a learning-rate "
                "scheduler, whose state sets the optimizer's values as the run goes on; a "
                f"resume continues it. Resume without {key}=, or start a new run (without "
                "ckpt_path) to train with it."
            )
        if not _same(key, before, value):
            changed.append(f"{key}: {before} -> {value}")
    for key in DATA_KEYS:
        before, after = (OmegaConf.select(c, key, default=None) for c in (original, resumed))
        moved = key == "data.path" and before is not None and not Path(before).exists()
        if not _same(key, before, after) and not moved:
            raise ResumeConfigError(
                f"{key}={after}: the run in {checkpoint.parent.parent} was trained with "
                f"{key}={before}, and changing it within the run would change its data split "
                f"(its splits/ and what each split holds). Resume without {key}=, or start a "
                f"new run (without ckpt_path and hydra.run.dir) to train with {key}={after}."
            )
    _check_batches_kept(original, resumed, checkpoint)
    # An ``auto`` setting continues as it resolved when the run started (precision=auto
    # measures the CPU: a resume must not train on in another precision), unless this
    # command sets the key itself.
    given = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}
    for key, value in (record.get("resolved") or {}).items():
        if key not in given and OmegaConf.select(resumed, key) != value:
            with open_dict(resumed):
                OmegaConf.update(resumed, key, value, force_add=True)
            log.info("Resuming with %s=%s, as the run resolved it", key, value)
    with open_dict(resumed):
        resumed.ckpt_path = str(checkpoint)
    if changed:
        log.info("Resuming with the run's config, changed by this command: %s", "; ".join(changed))
    return resumed


def _same(key: str, before: Any, after: Any) -> bool:
    """Equal values, or for ``data.path`` two names of one file (absolute and relative)."""
    if before == after or key != "data.path" or before is None or after is None:
        return before == after
    return Path(str(before)).expanduser().resolve() == Path(str(after)).expanduser().resolve()


def _check_batches_kept(original: DictConfig, resumed: DictConfig, checkpoint: Path) -> None:
    """A checkpoint saved mid-epoch resumes with the batches that epoch had left, counted
    in batches as they were drawn: another batching there would skip other messages."""
    for key in BATCH_KEYS:
        before, after = (OmegaConf.select(c, key, default=None) for c in (original, resumed))
        header = checkpoint_header(checkpoint) if before != after else {}
        if header and header.get("epochs_done") == header["epoch"]:
            raise ResumeConfigError(
                f"{key}={after}: {checkpoint} was saved in the middle of epoch "
                f"{header['epoch'] + 1}, which goes on with the batches it had left (with "
                f"{key}={before}). Resume without {key}=, or from the end of the last whole "
                f"epoch with ckpt_path={checkpoint.parent / 'last.ckpt'}."
            )


def _moved_accelerator_keys(record: DictConfig) -> DictConfig:
    """A run started before the accelerator group wrote ``trainer.accelerator`` and
    ``trainer.precision`` kept them as ``accelerator.*``: moved, so that it resumes."""
    old = record.config.get("accelerator")
    if isinstance(old, DictConfig):
        with open_dict(record):
            record.config.trainer.update(old)
            del record.config["accelerator"]
            resolved = record.get("resolved") or {}
            record.resolved = {k.replace("accelerator.", "trainer.", 1): v
                               for k, v in resolved.items()}  # fmt: skip
    return record


def run_choices(output_dir: Path) -> dict[str, Any]:
    """The config groups' choices the run in ``output_dir`` was composed with (its first
    start's, which a resume keeps), or this process's when it kept none."""
    path = output_dir / RUN_CONFIG_FILE
    if path.is_file() and (choices := OmegaConf.load(path).get("choices")):
        return dict(OmegaConf.to_container(choices))
    return {k: v for k, v in _hydra_state()[1].items() if not k.startswith("hydra")}


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
    """``last`` when SLURM has requeued this job (preempted or timed out, then started
    again with the same command) and its folder holds checkpoints: it continues from
    them, as ``ckpt_path=last`` would."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts == 0 or not any((output_dir / "checkpoints").glob("*.ckpt")):
        return None
    log.info("SLURM requeued this job (restart %d): resuming from its last checkpoint in %s",
             restarts, output_dir)  # fmt: skip
    return "last"


def check_new_run_folder(output_dir: Path) -> None:
    """A new run (no ``ckpt_path``) starts in a folder that holds no run yet: in an earlier
    run's folder it would mix its checkpoints with that run's, under that run's config."""
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
    """Hold a lock on the run folder while this process trains in it (the operating system
    lets go when the process ends, however): a second process there, such as a run
    started in the same second (one dated folder) or a resume of a run still training,
    is refused instead of mixing its checkpoints with the first one's."""
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
