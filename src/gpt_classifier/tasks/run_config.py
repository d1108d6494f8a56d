"""A run's own config, ``run_config.yaml``, and the config a resume continues with.

Hydra rewrites ``.hydra/`` on every start, so a resume starts from ``run_config.yaml``
instead, with the plain ``key=value`` overrides of its command (``trainer.max_epochs=10``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from gpt_classifier.checkpoints import checkpoint_header
from gpt_classifier.files import atomic_path
from gpt_classifier.reporting.reports import RUN_CONFIG_FILE

log = logging.getLogger(__name__)

# Overrides a resume command always carries; they are not changes to the run.
RESUME_KEYS = ("ckpt_path",)
# What the split and the tokens depend on: a resume must not change them (the run's
# splits/ and the messages each split holds stay those its first start made).
DATA_KEYS = ("seed", "data.seed", "data.path", "data.train_frac", "data.validation_frac",
             "data.balance", "data.book_compat", "data.labels", "data.padding",
             "data.max_length", "data.truncation_side", "data.files.train",
             "data.files.validation", "data.files.test", "data.text_column",
             "data.text_separator", "data.label_column", "data.name", "data.config_name",
             "data.split_names")  # fmt: skip
# Those that name local files, kept by absolute path (absolute_paths): a resume may name
# them as first given, or name a file that has moved.
PATH_KEYS = ("data.path", "data.files.train", "data.files.validation", "data.files.test",
             "data.name")  # fmt: skip


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
    """Write ``run_config.yaml``: the config (unresolved), how it was composed, and what its
    ``auto`` settings ``resolved`` to. A resume adds the keys its command changed."""
    path = output_dir / RUN_CONFIG_FILE
    overrides, choices = _hydra_state()
    if path.exists():
        record = OmegaConf.load(path)
        if not _record_changes(record, cfg, overrides, resolved or {}):
            return
    else:
        config = OmegaConf.to_container(cfg, resolve=False)
        config["ckpt_path"] = None  # a later resume names its own checkpoint
        record = OmegaConf.create({
            "config": config,
            "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")},
            "overrides": [o.input_line for o in OverridesParser.create().parse_overrides(
                overrides) if o.key_or_group not in RESUME_KEYS],  # what made it, not whence
            "resolved": dict(resolved or {}),
        })  # fmt: skip
    with atomic_path(path) as tmp:
        OmegaConf.save(record, tmp)


def _record_changes(record: DictConfig, cfg: DictConfig, overrides: list[str],
                    resolved: Mapping[str, Any]) -> bool:  # fmt: skip
    """Put into ``record`` what a resume's overrides changed in ``cfg``; whether any did."""
    config = OmegaConf.create(OmegaConf.to_container(record.config, resolve=False))
    changed = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in RESUME_KEYS or key.startswith("hydra") or key in record.choices:
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if OmegaConf.select(config, key, throw_on_missing=False) != value:
            with open_dict(config):
                OmegaConf.update(config, key, value, force_add=True)
            changed[key] = override.input_line
    if not changed:
        return False
    parser = OverridesParser.create()
    kept = [o for o in record.overrides
            if parser.parse_override(o).key_or_group not in changed]  # fmt: skip
    with open_dict(record):
        record.config, record.overrides = config, [*kept, *changed.values()]
        for key in set(changed) & set(record.get("resolved") or {}):
            record.resolved[key] = resolved.get(key, OmegaConf.select(config, key))
    return True


def absolute_paths(cfg: DictConfig) -> None:
    """The run's local files (``data.*``, ``model.weights``) by absolute path, so that
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
        moved = key in PATH_KEYS and before is not None and not Path(before).exists() and (
            key == "data.path" or Path(before).is_absolute())  # fmt: skip
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
    """Equal values, or for a file's key two names of one file (absolute and relative)."""
    if before == after or key not in PATH_KEYS or before is None or after is None:
        return before == after
    return Path(str(before)).expanduser().resolve() == Path(str(after)).expanduser().resolve()


def _check_batches_kept(original: DictConfig, resumed: DictConfig, checkpoint: Path) -> None:
    """A checkpoint saved mid-epoch resumes with the batches that epoch had left, counted
    as they were drawn: another batching would skip other messages."""
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
    """The config groups' choices of the run in ``output_dir``, else this process's."""
    path = output_dir / RUN_CONFIG_FILE
    if path.is_file() and (choices := OmegaConf.load(path).get("choices")):
        return dict(OmegaConf.to_container(choices))
    return {k: v for k, v in _hydra_state()[1].items() if not k.startswith("hydra")}
