"""The training task behind ``python train.py``: data, model, trainer, fit, final evaluation."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gpt_classifier.data.datamodule import SMSSpamDataModule
from gpt_classifier.finetuning.methods import FineTuningMethod, count_parameters
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.config import PRESETS
from gpt_classifier.model.gpt import GPT
from gpt_classifier.model.pooling import pooling_rule
from gpt_classifier.reporting.reports import write_json
from gpt_classifier.reporting.tensorboard import (
    hparams_for_dashboard,
    log_final_hparams,
    skip_tensorflow_import,
)
from gpt_classifier.tasks.run_config import config_for_resume, run_choices, save_run_config
from gpt_classifier.tasks.sweep_job import run_in_own_process
from gpt_classifier.training.distributed import (
    KeepRandomState,
    is_rank_zero_process,
    starts_processes_by_script,
)
from gpt_classifier.training.module import ClassifierModule
from gpt_classifier.training.precision import PRECISION_RECORD, resolve_precision
from gpt_classifier.training.prefix_cache import PrefixCacheCallback
from gpt_classifier.training.resume import (
    PREEMPTION_SIGNALS,
    AtomicCheckpointIO,
    GracefulStop,
    ResumeState,
    TrainingInterrupted,
    checkpoint_header,
    find_checkpoint,
)
from gpt_classifier.training.timing import StartupTimer

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to set."""


def build(cfg: DictConfig, key: str) -> Any:
    """``instantiate`` the node at ``key`` (dotted), with the constructor's own message on
    bad values."""
    try:
        return instantiate(OmegaConf.select(cfg, key), _convert_="all")
    except InstantiationException as err:
        raise ConfigError(f"{key}: {err.__cause__ or err}") from err


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
        return GPT.from_preset(model_cfg.name, **overrides)
    if not model_cfg.weights:
        raise ConfigError(
            f"model={model_cfg.name} has no pretrained weights: set model.weights=<Hub name or "
            "local folder>, or model.pretrained=false for random initialisation."
        )
    return GPT.from_pretrained(model_cfg.weights, **overrides)


def tokenizer_folder(model_cfg: DictConfig) -> str | None:
    """A weights folder that ships GPT-2's BPE files (OpenAI's checkpoint does)."""
    weights = model_cfg.get("weights")
    if model_cfg.pretrained and weights and (Path(weights) / "encoder.json").is_file():
        return str(weights)
    return None


def build_datamodule(
    cfg: DictConfig, context_length: int, splits_dir: Path | None
) -> SMSSpamDataModule:
    """The data module of ``cfg.data``, sized to the model's context."""
    return instantiate(
        cfg.data,
        context_length=context_length,
        splits_dir=str(splits_dir) if splits_dir else None,
        tokenizer_dir=tokenizer_folder(cfg.model),
        _convert_="all",
    )


def precision_record(cfg: DictConfig) -> Path | None:
    """Where ``precision=auto`` keeps this machine's CPU measurement (the cache folder)."""
    cache_dir = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    return Path(cache_dir) / PRECISION_RECORD if cache_dir else None


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer's arguments: the accelerator group's device and precision, then the
    trainer group's (devices, num_nodes, strategy, loop settings)."""
    settings: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(settings.get("strategy"), dict):
        settings["strategy"] = build(cfg, "trainer.strategy")
    return {
        "accelerator": cfg.accelerator.accelerator,
        "precision": resolve_precision(
            cfg.accelerator.accelerator, cfg.accelerator.precision, precision_record(cfg)
        ),
        **settings,
        # The data module gives each process its share itself (data.datamodule).
        "use_distributed_sampler": False,
    }


def probe_trainer(cfg: DictConfig) -> L.Trainer:
    """A Trainer with the run's accelerator, precision, devices and strategy alone: it
    checks them before any weights or data are read, and tells how the run's processes
    start."""
    settings = trainer_settings(cfg)
    keys = ("accelerator", "precision", "devices", "num_nodes", "strategy")
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the real Trainer reports the devices
    try:
        return L.Trainer(**{k: settings[k] for k in keys if k in settings}, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    except (ValueError, RuntimeError, TypeError) as err:
        trainer = run_choices_now().get("trainer", "?")
        raise ConfigError(
            f"trainer={trainer} with accelerator={cfg.accelerator.accelerator}, "
            f"trainer.devices={cfg.trainer.devices}: {err}"
        ) from err
    finally:
        quiet.setLevel(level)


def run_choices_now() -> dict[str, str]:
    """This process's config group choices (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def in_multirun() -> bool:
    """Whether this is a job of a Hydra sweep (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build_trainer(
    cfg: DictConfig,
    output_dir: Path,
    callbacks: list[L.Callback],
    resume_step: int | None = None,
    atomic_saves: bool = True,
) -> L.Trainer:
    """A Lightning Trainer with the configured accelerator, strategy, loggers and callbacks.

    ``resume_step``: the logging step a resumed run continues from; TensorBoard hides what
    the interrupted run logged from there on, so no step appears twice. ``atomic_saves``:
    checkpoints through :class:`AtomicCheckpointIO` (FSDP writes its own, without one).
    """
    skip_tensorflow_import()
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if not logger_cfg:
            continue
        extra = {}
        if resume_step is not None and str(logger_cfg.get("_target_", "")).endswith(
            "TensorBoardLogger"
        ):
            extra["purge_step"] = resume_step
        loggers.append(instantiate(logger_cfg, **extra))
    # A callback set to null (e.g. callbacks.step_checkpoint=null) is turned off.
    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    plugins: list[Any] = [AtomicCheckpointIO()] if atomic_saves else []
    if SLURMEnvironment.detect():
        # One preemption mechanism: submitit's (SIGUSR2, then requeue; GracefulStop and
        # requeued_run), not also Lightning's own SIGUSR1 requeue.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        logger=loggers or False,
        callbacks=[*configured, *callbacks],
        default_root_dir=str(output_dir),
        plugins=plugins or None,
        **trainer_settings(cfg),
    )


def resume_checkpoint(ckpt_path: str, output_dir: Path) -> Path:
    """The checkpoint ``ckpt_path`` names: ``last`` (this run folder's furthest), a run
    folder, or a ``.ckpt`` file."""
    where = output_dir if ckpt_path == "last" else Path(ckpt_path)
    if ckpt_path != "last" and not where.exists():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    try:
        return find_checkpoint(where)
    except FileNotFoundError as err:
        raise ConfigError(f"ckpt_path={ckpt_path}: {err}") from err


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


def finished_run(cfg: DictConfig, output_dir: Path, header: dict[str, Any]) -> float | None:
    """The final metric of a run that ``header``'s checkpoint shows complete, else None."""
    metrics_file = output_dir / "metrics.json"
    done, wanted = header.get("epochs_done"), cfg.trainer.get("max_epochs")
    if done is None or wanted is None or wanted < 0:  # no epoch limit: never finished
        return None
    if done < wanted or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    log.info(
        "Run %s already finished: %d of trainer.max_epochs=%d epochs trained and %s written. "
        "Nothing to resume; to train further, add trainer.max_epochs=<more> to the command.",
        output_dir, done, cfg.trainer.max_epochs, metrics_file,
    )  # fmt: skip
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


def train(cfg: DictConfig) -> float:
    """Fine-tune, evaluate the best checkpoint on every split, write ``metrics.json``.

    With ``ckpt_path`` set, continue a run from a checkpoint with that run's config.
    """
    timer = StartupTimer(from_process_start=not in_multirun())
    output_dir = Path(cfg.paths.output_dir)
    probe = probe_trainer(cfg)
    if in_multirun() and starts_processes_by_script(probe):
        run_in_own_process()
        return job_metric(cfg, output_dir)
    # FSDP shards the blocks itself, and checkpoints them by its own rules (below).
    fsdp = isinstance(probe.strategy, FSDPStrategy)
    # Only the first process writes the run's files (the others are started by the
    # strategy inside fit, or by the cluster, and run this function too).
    rank_zero = is_rank_zero_process()
    checkpoint: Path | None = None
    resume_step = None
    ckpt_path = cfg.get("ckpt_path") or requeued_run(output_dir)
    if ckpt_path:
        checkpoint = resume_checkpoint(str(ckpt_path), output_dir)
        cfg = config_for_resume(cfg, checkpoint)
        header = checkpoint_header(checkpoint)
        if (metric := finished_run(cfg, output_dir, header)) is not None:
            return metric
        resume_step = header["batches_that_stepped"]
        log.info("Resuming from %s (epoch %d, step %d)", checkpoint, header["epoch"],
                 header["global_step"])  # fmt: skip
    check_writable(cfg, output_dir)
    if rank_zero:
        save_run_config(cfg, output_dir, {"accelerator.precision": probe.precision})
    # Everything a user can get wrong fails here, before any weights or data are read.
    method = build_method(cfg)
    pooling_rule(cfg.classifier.pooling)
    optimizer = build(cfg, "optimizer")
    scheduler = build(cfg, "scheduler") if cfg.get("scheduler") else None
    prefix_cache: PrefixCacheCallback = build(cfg, "prefix_cache")
    timer.excluded = lambda: prefix_cache.seconds  # reported apart, as time/prefix_s

    L.seed_everything(cfg.seed, workers=True)
    backbone = build_backbone(cfg.model)
    method.check(backbone.cfg)
    splits_dir = output_dir / "splits" if rank_zero else None
    datamodule = build_datamodule(cfg, backbone.cfg.context_length, splits_dir)
    datamodule.expected_processes = probe.world_size
    datamodule.setup("fit")  # data errors (too few messages, one label) before the Trainer
    model = SequenceClassifier(
        backbone, cfg.classifier.num_classes, cfg.classifier.pooling, cfg.classifier.head_seed
    )
    # Under FSDP the strategy wraps the blocks for it (trainer.strategy.activation_checkpointing).
    model.activation_checkpointing = bool(cfg.model.get("activation_checkpointing")) and not fsdp
    module = ClassifierModule(
        model, method, optimizer, scheduler, label_names=datamodule.label_names
    )
    stop = GracefulStop()
    callbacks = [timer, prefix_cache, ResumeState(), stop, KeepRandomState()]
    trainer = build_trainer(cfg, output_dir, callbacks, resume_step, atomic_saves=not fsdp)

    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    except TrainingInterrupted as stop:
        log.warning(
            "Training stopped by %s at epoch %d, step %d; checkpoint: %s. Resume with:\n"
            "  python train.py ckpt_path=last hydra.run.dir=%s",
            signal.Signals(stop.signum).name, trainer.current_epoch, trainer.global_step,
            stop.checkpoint, output_dir,
        )  # fmt: skip
        if stop.then is not None:  # submitit: requeue this job (it resumes from there)
            stop.then(stop.signum, None)
        # What a shell reports for a process ended by that signal (130 for Ctrl-C).
        raise SystemExit(128 + stop.signum) from None
    except SIGTERMException:
        # Lightning's own SIGTERM check came first: the signal arrived outside a training
        # step (in a validation or at an epoch's end), so there is no checkpoint of this
        # moment; resuming continues from the furthest one. Its exception exits with 0.
        log.warning(
            "Training stopped by SIGTERM outside a training step (in a validation or at an "
            "epoch's end), at epoch %d, step %d. Resume from the furthest checkpoint with:\n"
            "  python train.py ckpt_path=last hydra.run.dir=%s",
            trainer.current_epoch, trainer.global_step, output_dir,
        )  # fmt: skip
        raise SystemExit(128 + signal.SIGTERM) from None
    fit_seconds = time.perf_counter() - start
    # A signal after the last training step (during the last validation): every process
    # skips the final test, as one alone would wait for the others there.
    if trainer.strategy.reduce_boolean_decision(stop.signum is not None, all=False):
        signum = stop.signum or signal.SIGTERM
        log.warning(
            "%s received after the last training step: training is complete, the final "
            "evaluation is skipped. Run it with:\n  python train.py ckpt_path=last "
            "hydra.run.dir=%s", signal.Signals(signum).name, output_dir,
        )  # fmt: skip
        handler = signal.getsignal(signum)  # restored: submitit's requeue for SIGUSR2
        if signum in PREEMPTION_SIGNALS and callable(handler):
            handler(signum, None)
        raise SystemExit(128 + signum)

    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if fsdp:
        # After fit, Lightning drops FSDP's root wrapper while the tensors of the root
        # unit (embeddings, final norm, head) stay flat views of its shards, so a second
        # stage of that Trainer cannot load a sharded checkpoint into them (Lightning
        # #20373). The final test runs a new module, wrapped afresh, in a new Trainer.
        counts = module.parameter_counts
        model = SequenceClassifier(
            build_backbone(cfg.model), cfg.classifier.num_classes, cfg.classifier.pooling,
            cfg.classifier.head_seed,
        )  # fmt: skip
        module = ClassifierModule(
            model, build_method(cfg), optimizer, scheduler, label_names=datamodule.label_names
        )
        module.parameter_counts = counts
        trainer = build_trainer(cfg, output_dir, [prefix_cache, stop], atomic_saves=False)
    module.test_split_names = ["train", "val", "test"]
    loaders = [datamodule.eval_dataloader(s) for s in ("train", "validation", "test")]
    start = time.perf_counter()
    try:
        trainer.test(
            module, dataloaders=loaders, ckpt_path=checkpoint, weights_only=True, verbose=False
        )
    except SIGTERMException:
        log.warning(
            "Stopped by SIGTERM during the final evaluation: training is complete, "
            "metrics.json is not written. Evaluate with:\n  python train.py ckpt_path=last "
            "hydra.run.dir=%s", output_dir,
        )  # fmt: skip
        raise SystemExit(128 + signal.SIGTERM) from None
    test_seconds = time.perf_counter() - start

    trainable, total = module.parameter_counts or count_parameters(module.model)
    final = {k.removeprefix("final/"): v for k, v in trainer.callback_metrics.items()
             if k.startswith(("final/", "test/"))}  # fmt: skip
    metrics: dict[str, Any] = {k: float(v) for k, v in sorted(final.items())}
    metrics.update({
        "params/trainable": trainable,
        "params/total": total,
        "time/fit_s": round(fit_seconds, 3),
        "time/test_s": round(test_seconds, 3),
        "time/prefix_s": round(prefix_cache.seconds, 3),
        "time/startup_s": round(timer.seconds, 3) if timer.seconds is not None else None,
        "best_checkpoint": checkpoint,
    })  # fmt: skip
    log.info("Final metrics: %s", {k: v for k, v in metrics.items() if k.endswith("acc")})
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                config = OmegaConf.to_container(cfg, resolve=True)
                log_final_hparams(logger, hparams_for_dashboard(config,
                                  run_choices(output_dir)), metrics)  # fmt: skip
    if cfg.optimize_metric not in metrics:
        raise ConfigError(
            f"optimize_metric={cfg.optimize_metric!r} is not among the final metrics "
            f"{sorted(k for k in metrics if '/' in k)}"
        )
    return float(metrics[cfg.optimize_metric])
