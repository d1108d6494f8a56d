"""The training task behind ``python train.py``: data, model, trainer, fit, final evaluation."""

from __future__ import annotations

import difflib
import logging
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from gpt_classifier.checkpoints import checkpoint_header
from gpt_classifier.finetuning.methods import count_parameters
from gpt_classifier.model.pooling import pooling_rule
from gpt_classifier.reporting.plots import plt, save_confusion_matrix
from gpt_classifier.reporting.reports import results_table, write_json
from gpt_classifier.reporting.tensorboard import hparams_for_dashboard, log_final_hparams
from gpt_classifier.tasks.components import (
    build,
    build_backbone,
    build_datamodule,
    build_method,
    build_module,
    build_trainer,
    check_writable,
)
from gpt_classifier.tasks.errors import ConfigError
from gpt_classifier.tasks.run_config import (
    absolute_paths,
    config_for_resume,
    run_choices,
    save_run_config,
)
from gpt_classifier.tasks.run_folder import (
    check_new_run_folder,
    claim_run_folder,
    finished_run,
    in_multirun,
    job_metric,
    requeued_run,
    resume_checkpoint,
)
from gpt_classifier.tasks.sweep_job import run_in_own_process
from gpt_classifier.training import signals
from gpt_classifier.training.distributed import (
    KeepRandomState,
    is_rank_zero_process,
    starts_processes_by_script,
)
from gpt_classifier.training.metrics import class_keys, logged_names
from gpt_classifier.training.prefix_callback import PrefixCacheCallback
from gpt_classifier.training.resume import ResumeState
from gpt_classifier.training.timing import StartupTimer

log = logging.getLogger(__name__)
# Lightning's own, with nothing for a user to do: its model summary sizes bf16-mixed
# weights as 32-bit ones, and its pytree helper asks torch in a way torch now deprecates.
warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# And its advertisement for a cloud service, logged at every Trainer's start.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip:"))  # fmt: skip

SPLITS = ("train", "validation", "test")


def train(cfg: DictConfig) -> float:
    """Fine-tune, evaluate the best checkpoint on every split, write ``metrics.json``.

    With ``ckpt_path`` set (or a requeued SLURM job), continue a run with its own config.
    """
    timer = StartupTimer(from_process_start=not in_multirun())
    output_dir = Path(cfg.paths.output_dir)
    checkpoint, resume_step = None, None
    if ckpt_path := cfg.get("ckpt_path") or requeued_run(output_dir):
        checkpoint = resume_checkpoint(str(ckpt_path), output_dir)
        cfg = config_for_resume(cfg, checkpoint)
        header = checkpoint_header(checkpoint)
        if (metric := finished_run(cfg, output_dir, header)) is not None:
            return metric
        resume_step = header["batches_that_stepped"]
        log.info("Resuming from %s (epoch %d, step %d)", checkpoint, header["epoch"],
                 header["global_step"])  # fmt: skip
    absolute_paths(cfg)
    prefix_cache = check_settings(cfg, output_dir, new_run=checkpoint is None)
    timer.excluded = lambda: prefix_cache.seconds  # reported apart, as time/prefix_s
    stop, random_state = signals.GracefulStop(), KeepRandomState()
    callbacks = [timer, prefix_cache, ResumeState(), stop, random_state]
    trainer = build_trainer(cfg, output_dir, callbacks, resume_step)
    if in_multirun() and starts_processes_by_script(trainer):
        run_in_own_process()  # Lightning would start a sweep in every process
        return job_metric(cfg, output_dir)
    # Only the first process writes the run's files (the others are started by the
    # strategy inside fit, or by the cluster, and run this function too).
    if rank_zero := is_rank_zero_process():
        claim_run_folder(output_dir)
    try:
        L.seed_everything(cfg.seed, workers=True)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"seed={cfg.seed}: {err}") from err
    backbone = build_backbone(cfg.model)
    splits_dir = output_dir / "splits" if rank_zero else None
    datamodule = build_datamodule(cfg, backbone.cfg.context_length, splits_dir)
    datamodule.expected_processes = trainer.world_size
    datamodule.setup("fit")  # data errors (too few messages, one label) before any training
    check_monitored(cfg, datamodule.label_names)
    fsdp = isinstance(trainer.strategy, FSDPStrategy)
    module = build_module(cfg, backbone, datamodule.label_names, fsdp, class_counts(datamodule))
    if rank_zero:  # only now: a start that failed its checks leaves the folder free for a rerun
        save_run_config(cfg, output_dir, {"trainer.precision": trainer.precision})

    random_state.capture()
    start = time.perf_counter()
    signals.fit(trainer, module, datamodule, checkpoint, output_dir, stop)
    fit_seconds = time.perf_counter() - start

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if fsdp:
        # After fit, Lightning drops FSDP's root wrapper while the tensors of the root
        # unit stay flat views of its shards, so a second stage of that Trainer cannot
        # load a sharded checkpoint into them (Lightning #20373): a new module and Trainer.
        counts = module.parameter_counts
        module = build_module(cfg, build_backbone(cfg.model), datamodule.label_names, fsdp,
                              class_counts(datamodule))  # fmt: skip
        module.parameter_counts = counts
        trainer = build_trainer(cfg, output_dir, [prefix_cache, stop])
    module.test_split_names = ["train", "val", "test"]
    start = time.perf_counter()
    signals.test(trainer, module, [datamodule.eval_dataloader(s) for s in SPLITS], best,
                 output_dir)  # fmt: skip
    timings = {"time/fit_s": fit_seconds, "time/test_s": time.perf_counter() - start,
               "time/prefix_s": prefix_cache.seconds, "time/startup_s": timer.seconds}  # fmt: skip
    metrics = final_metrics(trainer, module, timings, best)
    if trainer.is_global_zero:
        write_confusion_matrices(trainer, module, output_dir)  # before the loggers close
        write_final_metrics(cfg, trainer, output_dir, metrics)
    return float(metrics[cfg.optimize_metric])


def check_settings(cfg: DictConfig, output_dir: Path, new_run: bool) -> PrefixCacheCallback:
    """Everything a user can get wrong in the config, before any weights or data are read
    (what is missing from the machine failed before, in the entry point's pre-flight);
    returns the run's prefix-cache callback."""
    build_method(cfg)
    pooling_rule(cfg.classifier.pooling)
    check_optimizer(cfg)
    prefix_cache: PrefixCacheCallback = build(cfg, "prefix_cache")
    check_writable(cfg, output_dir)
    if new_run and is_rank_zero_process():  # the others start in its folder
        check_new_run_folder(output_dir)
    return prefix_cache


def class_counts(datamodule: L.LightningDataModule) -> list[int]:
    """Training examples per class (``classifier.class_weights=auto`` weighs by them)."""
    counts = Counter(label for _, label in datamodule.load_splits().train)
    return [counts[i] for i in range(len(datamodule.label_names))]


def check_optimizer(cfg: DictConfig) -> None:
    """The optimizer's and the scheduler's settings, tried on a stand-in parameter: a bad
    value (a negative ``optimizer.lr``, ``scheduler.T_max=0``) fails now, naming the
    group, not in the middle of training."""
    try:
        optimizer = build(cfg, "optimizer")([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer: {err}") from err
    if cfg.get("scheduler"):
        try:
            scheduler = build(cfg, "scheduler")(optimizer)
            optimizer.step()  # no gradient: nothing changes, and the scheduler may step after it
            scheduler.step()
        except (ValueError, TypeError, ArithmeticError) as err:
            settings = {k: v for k, v in cfg.scheduler.items() if not k.startswith("_")}
            raise ConfigError(f"scheduler: {err} (with {settings})") from err


def check_monitored(cfg: DictConfig, label_names: list[str]) -> None:
    """``optimize_metric`` and the callbacks' ``monitor`` name a metric that validation
    logs for these labels: a typo fails now, not after the first epoch."""
    logged = [f"val/{name}" for name in logged_names(label_names)]
    monitors = {"optimize_metric": cfg.optimize_metric}
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback and callback.get("monitor") and callback.get("patience", 1) is not None:
            monitors[f"callbacks.{name}.monitor"] = callback.monitor  # early stopping: if on
    for key, metric in monitors.items():
        if metric in logged:
            continue
        close = difflib.get_close_matches(str(metric), logged, n=1, cutoff=0.72)
        per_class = "val/class/<label>/precision (recall, f1, support) with <label> one of "
        raise ConfigError(
            f"{key}={metric!r} is not a metric that validation logs"
            f"{f'; did you mean {close[0]}?' if close else ''} Choose "
            f"{', '.join(m for m in logged if '/class/' not in m)}, or {per_class}"
            f"{', '.join(class_keys(label_names))}"
        )


def final_metrics(trainer: L.Trainer, module: L.LightningModule, timings: dict[str, Any],
                  best: str | None) -> dict[str, Any]:  # fmt: skip
    """The final evaluation's metrics, parameter counts and times, as ``metrics.json``."""
    trainable, total = module.parameter_counts or count_parameters(module.model)
    final = {k.removeprefix("final/"): float(v) for k, v in trainer.callback_metrics.items()
             if k.startswith(("final/", "test/"))}  # fmt: skip
    metrics: dict[str, Any] = dict(sorted(final.items()))
    metrics.update({"params/trainable": trainable, "params/total": total})
    metrics.update({k: None if v is None else round(v, 3) for k, v in timings.items()})
    metrics["best_checkpoint"] = best
    if trainer.is_global_zero:  # the same table in every process
        log.info("Final evaluation of %s:\n%s", best or "the last weights", results_table(metrics))
    return metrics


def write_final_metrics(cfg: DictConfig, trainer: L.Trainer, output_dir: Path,
                        metrics: dict[str, Any]) -> None:  # fmt: skip
    """``metrics.json``, and the run's row in TensorBoard's HParams view."""
    write_json(output_dir / "metrics.json", metrics)
    params = hparams_for_dashboard(OmegaConf.to_container(cfg, resolve=True),
                                   run_choices(output_dir))  # fmt: skip
    for logger in trainer.loggers:
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            log_final_hparams(logger, params, metrics)
        elif isinstance(logger, L.pytorch.loggers.MLFlowLogger | L.pytorch.loggers.WandbLogger):
            logger.log_hyperparams(params)  # the run's config, beside its logged metrics


def write_confusion_matrices(trainer: L.Trainer, module: L.LightningModule,
                             output_dir: Path) -> None:  # fmt: skip
    """The final evaluation's confusion matrices on validation and test: a PNG each in the
    run folder (``confusion_matrix_val.png``), and an image in TensorBoard, MLflow or W&B."""
    for split in ("val", "test"):
        if (matrix := module.confusion_matrices.get(split)) is None:
            continue
        path = output_dir / f"confusion_matrix_{split}.png"
        figure = save_confusion_matrix(matrix, module.label_names, path)
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                logger.experiment.add_figure(f"confusion_matrix/{split}", figure,
                                             trainer.global_step, close=False)  # fmt: skip
            elif isinstance(logger, L.pytorch.loggers.MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(path))
            elif isinstance(logger, L.pytorch.loggers.WandbLogger):
                logger.log_image(f"confusion_matrix/{split}", [str(path)])
        plt.close(figure)
