"""``ClassifierModule``: the LightningModule that trains a ``SequenceClassifier``.

It keeps what Lightning is for: the fine-tuning method applied in ``setup()``, the
steps (cross-entropy on the pooled logits), torchmetrics per split, the optimizer.
The prefix cache, the frozen-weights file and the training curves are Callbacks.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from gpt_classifier.checkpoints import (
    complete_state_dict,
    find_checkpoint,
    is_checkpoint,
    load_frozen_weights_in_place,
    read_checkpoint,
)
from gpt_classifier.finetuning.methods import (
    FineTuningMethod,
    TrainLastBlocks,
    count_parameters,
    method_from_config,
)
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.config import GPTConfig
from gpt_classifier.model.gpt import GPT
from gpt_classifier.training.metrics import SplitMetrics

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
# Where each split's metrics are logged; the final evaluation of train and val with the
# best weights gets its own names, like the book's closing "Training accuracy".
LOG_PREFIX = {"train": "train", "val": "val", "test": "test",
              "final_train": "final/train", "final_val": "final/val"}  # fmt: skip


class ClassifierModule(L.LightningModule):
    """Trains a :class:`SequenceClassifier` with a fine-tuning method and an optimizer.

    ``optimizer`` builds the optimizer from the trainable parameters (a
    ``functools.partial``, e.g. from a ``_partial_`` config); ``scheduler``, if
    given, builds a learning-rate scheduler from the optimizer, stepped per epoch.
    """

    def __init__(
        self,
        model: SequenceClassifier,
        method: FineTuningMethod | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_names: Sequence[str] | None = None,
        positive_class: int = 1,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        names = list(label_names or [str(i) for i in range(model.num_classes)])
        if len(names) != model.num_classes:
            raise ValueError(
                f"{len(names)} label names {names} for classifier.num_classes={model.num_classes}"
            )
        if not 0 <= positive_class < model.num_classes:
            raise ValueError(f"positive class {positive_class} is not one of the classes")
        if class_weights is not None:
            given = class_weights  # a list of numbers; a string, e.g. a typo of auto, is not
            numbers = not isinstance(given, str) and all(isinstance(w, int | float) for w in given)
            class_weights = [float(w) for w in given] if numbers else []
            if len(class_weights) != model.num_classes or min(class_weights, default=0) <= 0:
                raise ValueError(f"classifier.class_weights={given}: give "
                                 f"{model.num_classes} positive numbers, one per class "
                                 f"({', '.join(names)}), or auto")  # fmt: skip
        self.model = model
        self.method = method or TrainLastBlocks(1)
        self.optimizer_factory = optimizer or functools.partial(
            torch.optim.AdamW, lr=5e-5, weight_decay=0.1
        )
        self.scheduler_factory = scheduler
        self.label_names = names
        # Plain values only: checkpoints are read with weights_only=True.
        self.save_hyperparameters({
            "backbone_config": model.cfg.to_dict(),
            "num_classes": model.num_classes,
            "label_names": names,
            "pooling": model.pooling,
            "positive_class": positive_class,
            "finetuning": self.method.to_config(),
            "optimizer": _describe(self.optimizer_factory),
            "class_weights": class_weights,
        })  # fmt: skip
        # The training loss's weight per class (None: each example counts the same).
        # Not in the state dict: it is a setting, kept in the hyperparameters.
        weight = None if class_weights is None else torch.tensor(class_weights)
        self.register_buffer("class_weights", weight, persistent=False)
        # Keyed "split_<name>": a ModuleDict key may not shadow a Module attribute ("train").
        self.metrics = nn.ModuleDict(
            {f"split_{s}": SplitMetrics(names, positive_class) for s in LOG_PREFIX}
        )
        # The final evaluation's confusion matrices by split, drawn by train.py.
        self.confusion_matrices: dict[str, list[list[int]]] = {}
        # What the dataloaders of trainer.test() hold, in order ("train" and "val"
        # are logged as final/train/... and final/val/...).
        self.test_split_names: list[str] = ["test"]
        # (trainable, total) parameters once the fine-tuning method is applied (setup()).
        self.parameter_counts: tuple[int, int] | None = None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: str | torch.device | None = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> ClassifierModule:
        """The module of a ``train.py`` checkpoint (a ``.ckpt``, a sharded folder or a run
        folder: its best), frozen weights from ``frozen.safetensors``; ``kwargs`` go to
        ``__init__``. (Lightning's own calls ``__init__`` with the hyperparameters, which
        describe the model rather than hold it.)"""
        if hparams_file is not None or strict is False:
            raise ValueError("hparams_file and strict=False do not apply: a checkpoint of "
                             "train.py holds its whole description and loads strictly")  # fmt: skip
        path = Path(checkpoint_path)
        if path.is_dir() and not is_checkpoint(path):
            path = find_checkpoint(path, best=True)
        checkpoint = read_checkpoint(path)
        hparams = checkpoint.get("hyper_parameters") or {}
        if "backbone_config" not in hparams:
            raise ValueError(f"{path} is not a checkpoint of train.py (no backbone_config)")
        complete_state_dict(checkpoint, path)
        with torch.device("meta"):  # no time spent on weights about to be replaced
            backbone = GPT(GPTConfig.from_dict(hparams["backbone_config"]))
            model = SequenceClassifier(backbone, hparams["num_classes"], hparams["pooling"])
        method = method_from_config(hparams.get("finetuning"))
        method.apply(model)  # the layers it adds (LoRA) are in the state dict
        module = cls(model, method, label_names=hparams.get("label_names"),
                     positive_class=hparams.get("positive_class", 1),
                     class_weights=hparams.get("class_weights"), **kwargs)  # fmt: skip
        module.load_state_dict(checkpoint["state_dict"], strict=True, assign=True)
        return module if map_location is None else module.to(map_location)

    def setup(self, stage: str) -> None:
        self.method.apply(self.model)
        # The optimizer writes what trains in place; a sweep's later jobs share the
        # loaded weights (gpt_classifier.sweep_reuse), which must not see that.
        for p in self.model.parameters():
            if p.requires_grad and not getattr(p, "_owns_storage", False):
                p.data = p.data.clone()
                p._owns_storage = True  # type: ignore[attr-defined]
        if self.parameter_counts is None:
            # Counted once, before a strategy wraps the model: under FSDP a later stage
            # would count each process's shards.
            self.parameter_counts = count_parameters(self.model)
            trainable, total = self.parameter_counts
            log.info("Fine-tuning %r: %s trainable of %s parameters", self.method,
                     f"{trainable:,}", f"{total:,}")  # fmt: skip

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits (B, num_classes) of a batch made by ``data.batching.Collator``;
        ``batch["prefix"]``, where a prefix cache put it, replaces the frozen blocks."""
        return self.model(batch["input_ids"], batch["lengths"], prefix=batch.get("prefix"))

    # ------------------------------------------------------------------ steps

    def _step(self, batch: dict[str, Any], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch)
        # Weighted in training only: validation and test losses stay comparable across runs.
        weight = self.class_weights if split == "train" else None
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=weight)
        self.metrics[f"split_{split}"].update(logits, batch["labels"], loss)
        return loss, logits

    def _log_split(self, split: str) -> None:
        """Log a split's metrics over all its batches, and start it afresh (once per
        epoch: logging torchmetrics objects every step moves them to the device)."""
        metrics = self.metrics[f"split_{split}"]
        examples = metrics.examples()
        if not examples:
            return
        # compute() gathers every process's counts; the values are then the same in all
        # processes, and sync_dist only tells Lightning so (the mean of equal values).
        distributed = self.trainer.world_size > 1
        for name, value in metrics.compute().items():
            self.log(f"{LOG_PREFIX[split]}/{name}", value, prog_bar=name == "acc",
                     add_dataloader_idx=False, sync_dist=distributed)  # fmt: skip
        if split in ("test", "final_train", "final_val"):
            self.confusion_matrices[split.removeprefix("final_")] = metrics.matrix().tolist()
        # Each example once, whatever the processes (a check on the data's sharding).
        self.log(f"{LOG_PREFIX[split]}/examples", float(examples), add_dataloader_idx=False,
                 sync_dist=distributed)  # fmt: skip
        metrics.reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logits = self._step(batch, "train")
        self.log("train/loss_step", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def epoch_values(self, split: str) -> dict[str, float]:
        """A split's loss and accuracy so far this epoch, under their logged names (the
        training curves read the train split's before this module logs and resets it)."""
        values = self.metrics[f"split_{split}"].values(("loss", "acc"))
        return {f"{LOG_PREFIX[split]}/{name}": value for name, value in values.items()}

    def on_train_epoch_start(self) -> None:
        # Not called when a run resumes mid-epoch: the restored partial epoch counts.
        self.metrics["split_train"].reset()

    def on_train_epoch_end(self) -> None:
        # The train split's metrics are kept in the module (and in mid-epoch checkpoints),
        # not in Lightning's epoch aggregation, so a resumed epoch reports all its batches.
        self._log_split("train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = self.test_split_names[dataloader_idx]
        self._step(batch, split if split == "test" else f"final_{split}")

    def on_test_epoch_end(self) -> None:
        for split in self.test_split_names:
            self._log_split(split if split == "test" else f"final_{split}")

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What inference needs to see texts exactly as training did.
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["inference"] = {
            "label_names": self.label_names,
            "pooling": self.model.pooling,
            "max_length": getattr(dm, "max_length", self.model.cfg.context_length),
            "truncation_side": dm.hparams.truncation_side if dm is not None else "right",
            "pad_to": getattr(dm, "pad_to", None),
        }
        checkpoint["train_metrics"] = self.metrics["split_train"].accumulated()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen weights live beside the checkpoint (see training.frozen_weights).
        path = self._trainer.ckpt_path if self._trainer is not None else None
        self.strict_loading = True
        # A sharded checkpoint (FSDP) has no state_dict here: the strategy loads the
        # shards into the wrapped model itself.
        if "state_dict" in checkpoint:
            state = {f"model.{k}": v for k, v in self.model.state_dict(keep_vars=True).items()}
            if load_frozen_weights_in_place(checkpoint, path, state):
                self.strict_loading = False  # the frozen names are loaded already (checked)
            else:
                complete_state_dict(checkpoint, path)
        if "train_metrics" in checkpoint:
            self.metrics["split_train"].restore(checkpoint["train_metrics"])

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params, **self._fused_default())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}  # fmt: skip

    def _fused_default(self) -> dict[str, Any]:
        """``fused=True`` where the optimizer has a fused kernel for this device and the
        config leaves it open: it updates all parameters in one pass (3x faster steps
        on a CPU)."""
        func = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        keywords = getattr(self.optimizer_factory, "keywords", {})
        try:
            accepts = "fused" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            return {}
        if not accepts or keywords.get("fused") is not None:
            return {}
        return {"fused": True} if self.device.type in ("cpu", "cuda") else {}


def _describe(factory: Callable[..., Any]) -> dict[str, Any]:
    """An optimizer factory as plain values, for the hyperparameters."""
    func = getattr(factory, "func", factory)
    plain = (bool, int, float, str)
    keywords = {k: v if isinstance(v, plain) else repr(v)
                for k, v in getattr(factory, "keywords", {}).items()}  # fmt: skip
    return {"name": getattr(func, "__name__", repr(func)), **keywords}
