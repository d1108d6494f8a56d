"""A training run's parts, built from its Hydra config: every user mistake fails here,
with the key to change, before any weights or data are read."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, ListConfig, OmegaConf

from gpt_classifier.data.datamodule import SMSSpamDataModule
from gpt_classifier.finetuning.methods import FineTuningMethod
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.config import PRESETS
from gpt_classifier.model.gpt import GPT
from gpt_classifier.reporting.tensorboard import skip_tensorflow_import
from gpt_classifier.sweep_reuse import reuse
from gpt_classifier.tasks.errors import ConfigError
from gpt_classifier.training.module import ClassifierModule
from gpt_classifier.training.precision import PRECISION_RECORD, resolve_precision
from gpt_classifier.training.resume import AtomicCheckpointIO, RunCheckpoint, RunEarlyStopping

log = logging.getLogger(__name__)


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` the node at ``key`` (dotted); a bad value's error names ``key``."""
    try:
        return instantiate(OmegaConf.select(cfg, key), _convert_="all", **kwargs)
    except InstantiationException as err:
        said = str(err.__cause__ or err)  # our own messages name their key already
        if "SMSSpamDataModule.__init__() got an unexpected keyword" in said:
            said += " (the keys of your own data need data=files or data=hf)"
        raise ConfigError(said if said.startswith(f"{key}.") else f"{key}: {said}") from err


def build_method(cfg: DictConfig) -> FineTuningMethod:
    """The fine-tuning method of the ``freeze`` group, checked against the preset's
    architecture before any weights are loaded."""
    method = build(cfg, "freeze")
    if cfg.model.name in PRESETS:
        try:
            method.check(PRESETS[cfg.model.name])
        except ValueError as err:
            raise ConfigError(f"{err} (model={cfg.model.name})") from err
    return method


def build_backbone(model_cfg: DictConfig) -> GPT:
    """The GPT-2 backbone the ``model`` config names: pretrained weights or a random
    preset."""
    overrides = {
        "drop_rate": float(model_cfg.drop_rate),
        "causal_mask": bool(model_cfg.get("causal_mask", True)),
    }
    if not model_cfg.pretrained:
        # A random initialisation is the preset's and the RNG state's.
        rng = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()
        key = ("preset", model_cfg.name, tuple(sorted(overrides.items())), rng)
        return _shared(key, lambda: GPT.from_preset(model_cfg.name, **overrides))
    if not model_cfg.weights:
        raise ConfigError(
            f"model={model_cfg.name} has no pretrained weights: set model.weights=<Hub name or "
            "local folder>, or model.pretrained=false for random initialisation."
        )
    key = ("weights", _source_signature(model_cfg.weights), tuple(sorted(overrides.items())))
    return _shared(key, lambda: GPT.from_pretrained(model_cfg.weights, **overrides))


def _shared(key: tuple[Any, ...], build: Callable[[], GPT]) -> GPT:
    """A new :class:`GPT` over the tensors a sweep's previous job built with the same key
    (ClassifierModule.setup gives what trains its own copy), the torch RNG left as
    ``build()`` would leave it; else ``build()``."""

    def held() -> tuple[Any, ...]:
        model = build()
        state = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
        head = getattr(model, "pretrained_head", None)
        return model.cfg, state, torch.random.get_rng_state(), head

    cfg, state, rng_after, head = reuse("backbone", key, held)
    torch.random.set_rng_state(rng_after)
    model = GPT.from_state_dict(cfg, state)
    if head is not None:
        model.pretrained_head = head
    return model


def _source_signature(source: str) -> tuple[Any, ...]:
    """What identifies a weights source's content: each local file's name, size and
    modification time; a Hub name as it is (its download cache pins the files)."""
    path = Path(source).expanduser()
    if not path.exists():
        return ("hub", str(source))
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return ("local", str(path.resolve()),
            tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))  # fmt: skip


def build_module(
    cfg: DictConfig, backbone: GPT, label_names: list[str], fsdp: bool,
    class_counts: Sequence[int] | None = None,
) -> ClassifierModule:  # fmt: skip
    """The LightningModule: the backbone with its head, the method, the optimizer;
    ``class_counts`` (the training split's, by class) for ``class_weights: auto``."""
    method = build_method(cfg)
    try:
        method.check(backbone.cfg)  # the weights' own architecture
    except ValueError as err:
        raise ConfigError(str(err)) from err
    num_classes = cfg.classifier.num_classes
    if num_classes == "auto":
        num_classes = len(label_names)
    elif num_classes != len(label_names):
        raise ConfigError(
            f"classifier.num_classes={num_classes}, but the data has {len(label_names)} labels "
            f"{label_names}: leave it as auto, or give data.labels the classes to keep"
        )
    model = SequenceClassifier(backbone, num_classes, cfg.classifier.pooling,
                               cfg.classifier.head_seed)  # fmt: skip
    # Under FSDP the strategy wraps the blocks for it (trainer.strategy.activation_checkpointing).
    model.activation_checkpointing = bool(cfg.model.get("activation_checkpointing")) and not fsdp
    scheduler = build(cfg, "scheduler") if cfg.get("scheduler") else None
    weights = cfg.classifier.get("class_weights")
    if weights == "auto":
        weights = inverse_frequency(class_counts or [], label_names)
    elif isinstance(weights, ListConfig):
        weights = list(weights)
    try:
        return ClassifierModule(model, method, build(cfg, "optimizer"), scheduler,
                                label_names=label_names, class_weights=weights)  # fmt: skip
    except ValueError as err:
        raise ConfigError(str(err)) from err


def inverse_frequency(counts: Sequence[int], label_names: Sequence[str]) -> list[float]:
    """Each class's weight, inversely proportional to its training examples, with the
    mean over the examples 1 (the loss keeps its scale)."""
    if len(counts) != len(label_names) or min(counts, default=0) < 1:
        raise ConfigError(f"classifier.class_weights=auto needs training examples of every "
                          f"class; the counts are {dict(zip(label_names, counts))}")  # fmt: skip
    total = sum(counts)
    return [total / (len(counts) * count) for count in counts]


def build_datamodule(
    cfg: DictConfig, context_length: int, splits_dir: Path | None
) -> SMSSpamDataModule:
    """The data module of ``cfg.data``, sized to the model's context."""
    weights = cfg.model.get("weights")
    # OpenAI's checkpoint folder ships GPT-2's BPE files: nothing to download.
    ships_bpe = cfg.model.pretrained and weights and (Path(weights) / "encoder.json").is_file()
    return build(cfg, "data", context_length=context_length,
                 splits_dir=str(splits_dir) if splits_dir else None,
                 tokenizer_dir=str(weights) if ships_bpe else None)  # fmt: skip


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer's arguments (``trainer.*``; the accelerator group sets ``accelerator``
    and ``precision`` there), with ``precision: auto`` resolved for the device."""
    settings: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(settings.get("strategy"), dict):
        settings["strategy"] = build(cfg, "trainer.strategy")
    cache_dir = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    record = Path(cache_dir) / PRECISION_RECORD if cache_dir else None
    return {
        **settings,
        "precision": resolve_precision(settings["accelerator"], settings["precision"], record),
        # The data module gives each process its share itself (data.datamodule).
        "use_distributed_sampler": False,
    }


def build_trainer(
    cfg: DictConfig, output_dir: Path, callbacks: list[L.Callback], resume_step: int | None = None
) -> L.Trainer:
    """A Lightning Trainer with the configured accelerator, strategy, loggers and callbacks.

    ``resume_step``: the logging step a resumed run continues from; TensorBoard hides what
    the interrupted run logged from there on, so no step appears twice.
    """
    skip_tensorflow_import()
    _one_console_line_each()
    settings = trainer_settings(cfg)
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg:
            target = str(logger_cfg.get("_target_", ""))
            tensorboard = target.endswith("TensorBoardLogger")
            extra = {"purge_step": resume_step} if tensorboard and resume_step is not None else {}
            if target.endswith("MLFlowLogger") and str(logger_cfg.tracking_uri).startswith("file:"):
                # MLflow 3 refuses its file store (kept, in maintenance) unless asked for.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            loggers.append(instantiate(logger_cfg, **extra))
    # A callback set to null (e.g. callbacks.step_checkpoint=null) is turned off, and so
    # is one whose factory returns None (early_stopping without a patience).
    built = (build(cfg, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c)
    configured = [callback for callback in built if callback is not None]
    # FSDP writes its sharded checkpoints its own way.
    fsdp = isinstance(settings.get("strategy"), FSDPStrategy)
    plugins: list[Any] = [] if fsdp else [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # One preemption mechanism: submitit's (SIGUSR2, then requeue; GracefulStop and
        # requeued_run), not also Lightning's own SIGUSR1 requeue.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        return L.Trainer(logger=loggers or False, callbacks=[*configured, *callbacks],
                         default_root_dir=str(output_dir), plugins=plugins or None,
                         **settings)  # fmt: skip
    except (ValueError, RuntimeError, TypeError) as err:
        trainer = run_choices_now().get("trainer", "?")
        raise ConfigError(
            f"trainer={trainer} with trainer.accelerator={cfg.trainer.accelerator}, "
            f"trainer.devices={cfg.trainer.devices}: {err}"
        ) from err


def _monitor_mode(monitor: str, mode: str | None, key: str) -> str:
    """``mode`` for a validation metric, or by default ``min`` for a loss, else ``max``."""
    if not str(monitor).startswith("val/"):
        raise ConfigError(f"{key}={monitor!r}: choose a validation metric of metrics.json, "
                          "e.g. optimize_metric=val/acc, val/f1_macro or val/loss")  # fmt: skip
    return mode or ("min" if monitor.endswith("loss") else "max")


def best_checkpoint(monitor: str = "val/acc", mode: str | None = None,
                    **kwargs: Any) -> RunCheckpoint:  # fmt: skip
    """The best checkpoint by ``monitor`` (``optimize_metric``); ``mode`` null: ``min``
    for a loss, else ``max``."""
    mode = _monitor_mode(monitor, mode, "optimize_metric")
    return RunCheckpoint(monitor=monitor, mode=mode, **kwargs)


def early_stopping(
    patience: int | None, monitor: str = "val/acc", mode: str | None = None,
    min_delta: float = 0.0,
) -> RunEarlyStopping | None:  # fmt: skip
    """Lightning's ``EarlyStopping`` on ``monitor``, or None (off) while ``patience`` is
    null; ``mode`` null: ``min`` for a loss, else ``max``."""
    if patience is None:
        return None
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ConfigError(f"callbacks.early_stopping.patience={patience!r}: give a whole "
                          "number of epochs (1 or more), or null to turn it off")  # fmt: skip
    mode = _monitor_mode(monitor, mode, "callbacks.early_stopping.monitor")
    return RunEarlyStopping(monitor=monitor, patience=patience, mode=mode, min_delta=min_delta,
                         verbose=True)  # fmt: skip


def _one_console_line_each() -> None:
    """The ``lightning`` package logger prints to the console itself and passes each
    record on to the root logger as well, which Hydra has set up: every line came twice."""
    if logging.getLogger().hasHandlers():
        lightning_log = logging.getLogger("lightning")
        for handler in list(lightning_log.handlers):
            lightning_log.removeHandler(handler)


def run_choices_now() -> dict[str, str]:
    """This process's config group choices (empty outside a Hydra app)."""
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def check_writable(cfg: DictConfig, output_dir: Path) -> None:
    """Fail before any work when the run's folders cannot be written."""
    folders = {"hydra.run.dir (the output folder)": output_dir}
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback and callback.get("dirpath"):
            folders[f"callbacks.{name}.dirpath"] = Path(callback.dirpath)
    for what, folder in folders.items():
        probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"{what}={folder} cannot be written ({err.strerror or err}); point it at a "
                "folder you can write, or free space there"
            ) from err
