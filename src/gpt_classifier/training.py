"""The training task behind ``python train.py``: data, model, trainer, fit, final evaluation."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpt_classifier.backbone import GPT
from gpt_classifier.classifier import GPTClassifier
from gpt_classifier.datamodule import SMSSpamDataModule
from gpt_classifier.freeze import count_parameters
from gpt_classifier.precision import resolve_precision
from gpt_classifier.reports import flatten, write_json
from gpt_classifier.tensorboard_writer import skip_tensorflow_import

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to set."""


def build_backbone(model_cfg: DictConfig) -> GPT:
    """The GPT-2 backbone the ``model`` config names: pretrained weights or a random preset."""
    overrides = {"drop_rate": float(model_cfg.drop_rate)}
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


def build_classifier(cfg: DictConfig, backbone: GPT, label_names: list[str]) -> GPTClassifier:
    """The LightningModule of the ``classifier``, ``freeze``, ``optimizer`` and cache configs."""
    cache = cfg.prefix_cache
    return GPTClassifier(
        backbone_config=backbone.cfg.to_dict(),
        num_classes=cfg.classifier.num_classes,
        label_names=label_names,
        freeze=cfg.freeze.policy,
        freeze_n=cfg.freeze.get("n", 1),
        pooling=cfg.classifier.pooling,
        lr=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        head_seed=cfg.classifier.head_seed,
        prefix_cache=cache.enabled,
        cache_dtype=cache.cache_dtype,
        cache_file=str(Path(cache.dir) / "prefix") if cache.persist else None,
        backbone=backbone,
    )


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    """A Lightning Trainer with the configured accelerator, loggers and callbacks."""
    skip_tensorflow_import()
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    return L.Trainer(
        accelerator=cfg.accelerator.accelerator,
        devices=cfg.accelerator.devices,
        precision=resolve_precision(cfg.accelerator.accelerator, cfg.accelerator.precision),
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
        **trainer_kwargs,
    )


def train(cfg: DictConfig) -> float:
    """Fine-tune, evaluate the best checkpoint on every split, write ``metrics.json``."""
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    backbone = build_backbone(cfg.model)
    datamodule = build_datamodule(cfg, backbone.cfg.context_length, output_dir / "splits")
    classifier = build_classifier(cfg, backbone, datamodule.label_names)
    trainer = build_trainer(cfg, output_dir)

    start = time.perf_counter()
    trainer.fit(classifier, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start

    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    classifier.test_split_names = ["train", "val", "test"]
    loaders = [datamodule.eval_dataloader(s) for s in ("train", "validation", "test")]
    start = time.perf_counter()
    trainer.test(
        classifier, dataloaders=loaders, ckpt_path=checkpoint, weights_only=True, verbose=False
    )
    test_seconds = time.perf_counter() - start

    trainable, total = count_parameters(classifier.model)
    final = {k.removeprefix("final/"): v for k, v in trainer.callback_metrics.items()
             if k.startswith(("final/", "test/"))}  # fmt: skip
    metrics: dict[str, Any] = {k: float(v) for k, v in sorted(final.items())}
    metrics.update({
        "params/trainable": trainable,
        "params/total": total,
        "time/fit_s": round(fit_seconds, 3),
        "time/test_s": round(test_seconds, 3),
        "time/prefix_s": round(classifier.prefix_seconds, 3),
        "best_checkpoint": checkpoint,
    })  # fmt: skip
    write_json(output_dir / "metrics.json", metrics)
    log.info("Final metrics: %s", {k: v for k, v in metrics.items() if k.endswith("acc")})
    for logger in trainer.loggers:
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            numbers = {f"hparams/{k}": v for k, v in metrics.items() if isinstance(v, float | int)}
            logger.log_hyperparams(flatten(OmegaConf.to_container(cfg, resolve=True)), numbers)
    if cfg.optimize_metric not in metrics:
        raise ConfigError(
            f"optimize_metric={cfg.optimize_metric!r} is not among the final metrics "
            f"{sorted(k for k in metrics if '/' in k)}"
        )
    return float(metrics[cfg.optimize_metric])
