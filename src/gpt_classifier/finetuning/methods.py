"""Fine-tuning methods: what trains, what stays frozen, and what a checkpoint keeps.

Each method is a small object that the ``freeze`` config group builds with
``_target_``. Its constructor rejects bad values, and :meth:`~FineTuningMethod.check`
rejects a method that does not fit the architecture, both before any weights or
data are touched. Then it

- :meth:`~FineTuningMethod.apply`: marks parameters trainable, and wraps layers
  (LoRA); safe to call again;
- :meth:`~FineTuningMethod.frozen_depth`: says how many leading blocks, after the
  frozen embeddings, hold nothing that trains (what a prefix cache may compute once);
- :meth:`~FineTuningMethod.checkpoint_names`: says which tensors a checkpoint keeps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.config import GPTConfig
from gpt_classifier.model.lora import LoRALinear, add_lora

# Every linear layer of a block, by its path inside the block.
LORA_TARGETS = ("att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.fc", "ff.proj")
LORA_HEAD_MODES = ("full", "lora", "both")


class FineTuningMethod(ABC):
    """What of a :class:`SequenceClassifier` trains; built from the ``freeze`` config."""

    name: ClassVar[str]

    def check(self, cfg: GPTConfig) -> None:  # noqa: B027 (most methods fit every size)
        """Raise ``ValueError`` if the method cannot apply to this architecture."""

    @abstractmethod
    def apply(self, model: SequenceClassifier) -> None:
        """Freeze every parameter, then make trainable (or add) what this method trains."""

    @abstractmethod
    def frozen_depth(self, cfg: GPTConfig) -> int:
        """Leading blocks that hold nothing trainable; 0 when the embeddings train."""

    def checkpoint_names(self, model: SequenceClassifier) -> set[str]:
        """Names (in ``model.state_dict()``) that a checkpoint must keep: what trains."""
        return {name for name, p in model.named_parameters() if p.requires_grad}

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The constructor's arguments, as plain values."""

    def to_config(self) -> dict[str, Any]:
        """Plain values that :func:`method_from_config` turns back into this method."""
        return {"method": self.name, **self.settings()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class TrainLastBlocks(FineTuningMethod):
    """The last ``n`` transformer blocks, the final LayerNorm and the head train.

    ``n=1`` is the book's choice (``freeze=last_block``).
    """

    name = "last_blocks"

    def __init__(self, n: int = 1) -> None:
        self.n = _positive_int(n, "freeze.n")

    def check(self, cfg: GPTConfig) -> None:
        if self.n > cfg.n_layers:
            raise ValueError(
                f"freeze.n={self.n} must be between 1 and the model's {cfg.n_layers} blocks"
            )

    def apply(self, model: SequenceClassifier) -> None:
        self.check(model.cfg)
        gpt = model.backbone
        gpt.requires_grad_(False)
        for module in (*gpt.trf_blocks[-self.n :], gpt.final_norm, gpt.out_head):
            module.requires_grad_(True)

    def frozen_depth(self, cfg: GPTConfig) -> int:
        return cfg.n_layers - self.n

    def settings(self) -> dict[str, Any]:
        return {"n": self.n}


class TrainHead(FineTuningMethod):
    """Only the classification head trains (``freeze=last_layer``)."""

    name = "head"

    def apply(self, model: SequenceClassifier) -> None:
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(True)

    def frozen_depth(self, cfg: GPTConfig) -> int:
        return cfg.n_layers

    def settings(self) -> dict[str, Any]:
        return {}


class TrainAll(FineTuningMethod):
    """Every parameter trains (``freeze=all``)."""

    name = "all"

    def apply(self, model: SequenceClassifier) -> None:
        model.requires_grad_(True)

    def frozen_depth(self, cfg: GPTConfig) -> int:
        return 0

    def settings(self) -> dict[str, Any]:
        return {}


class LoRA(FineTuningMethod):
    """Low-rank adapters on the blocks' linear layers; their base weights stay frozen.

    ``targets`` names the layers of a block that get adapters (default: all six),
    ``blocks=k`` adapts only the last ``k`` blocks (default: every block), and
    ``head`` says how the classification head trains: ``full`` (no adapter, every
    weight trains), ``lora`` (frozen, with an adapter: the book's appendix E) or
    ``both`` (trains fully and has an adapter: the book's additional-experiments
    script). The final LayerNorm stays frozen.
    """

    name = "lora"

    def __init__(
        self,
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: Sequence[str] = LORA_TARGETS,
        blocks: int | None = None,
        head: str = "full",
    ) -> None:
        self.rank = _positive_int(rank, "freeze.rank")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
            raise ValueError(f"freeze.alpha={alpha!r} must be a positive number")
        self.alpha = float(alpha)
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise ValueError(f"freeze.dropout={dropout!r} must be a number in [0, 1)")
        if not 0 <= dropout < 1:
            raise ValueError(f"freeze.dropout={dropout} must be in [0, 1)")
        self.dropout = float(dropout)
        if isinstance(targets, str):
            targets = [targets]
        self.targets = tuple(str(t) for t in targets)
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"freeze.targets={list(self.targets)}: give each of these at most once, "
                f"at least one: {list(LORA_TARGETS)}" + (f" ({unknown} unknown)" if unknown else "")
            )
        self.blocks = None if blocks is None else _positive_int(blocks, "freeze.blocks")
        if head not in LORA_HEAD_MODES:
            raise ValueError(f"freeze.head={head!r}; choose one of {list(LORA_HEAD_MODES)}")
        self.head = head

    def check(self, cfg: GPTConfig) -> None:
        if self.blocks is not None and self.blocks > cfg.n_layers:
            raise ValueError(
                f"freeze.blocks={self.blocks} must be between 1 and the model's "
                f"{cfg.n_layers} blocks (or null for all of them)"
            )

    def adapted_blocks(self, cfg: GPTConfig) -> int:
        """How many of the last blocks get adapters."""
        return cfg.n_layers if self.blocks is None else self.blocks

    def apply(self, model: SequenceClassifier) -> None:
        self.check(model.cfg)
        gpt = model.backbone
        for block in gpt.trf_blocks[-self.adapted_blocks(model.cfg) :]:
            for target in self.targets:
                add_lora(block, target, self.rank, self.alpha, self.dropout)
        if self.head in ("lora", "both"):
            add_lora(gpt, "out_head", self.rank, self.alpha, self.dropout)
        model.requires_grad_(False)
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
        if self.head in ("full", "both"):
            for p in _own_parameters(model.head):
                p.requires_grad_(True)

    def frozen_depth(self, cfg: GPTConfig) -> int:
        return cfg.n_layers - self.adapted_blocks(cfg)

    def settings(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "blocks": self.blocks,
            "head": self.head,
        }


METHODS: dict[str, type[FineTuningMethod]] = {
    cls.name: cls for cls in (TrainLastBlocks, TrainHead, TrainAll, LoRA)
}


def method_from_config(config: Mapping[str, Any] | None) -> FineTuningMethod:
    """The method that :meth:`FineTuningMethod.to_config` described (None: the book's)."""
    if not config:
        return TrainLastBlocks(1)
    values = dict(config)
    name = values.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](**values)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _own_parameters(layer: nn.Module) -> Iterable[nn.Parameter]:
    """A layer's own parameters, not its adapters'."""
    return layer.parameters(recurse=False)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer")
    return value
