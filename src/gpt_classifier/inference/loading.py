"""What every model format shares: the inference settings, the load error, and building
a classifier from an architecture and its tensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from gpt_classifier.data.tokenizer import PAD_TOKEN_ID
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.config import GPTConfig
from gpt_classifier.model.gpt import GPT

EXPORT_FORMAT = "gpt-classifier"


class ModelLoadError(RuntimeError):
    """A checkpoint or export folder is missing, corrupt or incompatible."""


@dataclass
class InferenceSettings:
    """How texts become model inputs; stored with every export."""

    label_names: list[str]
    pooling: str = "last_token"
    max_length: int = 1024
    truncation_side: str = "right"
    pad_to: int | None = None  # fixed padded length (book-style models), else per batch
    pad_token_id: int = PAD_TOKEN_ID

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> InferenceSettings:
        """The settings among an export's ``config.json`` values."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def read_config(path: Path) -> dict[str, Any]:
    """An export's ``config.json``."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path} could not be read ({err}); export it again") from err


def build_classifier(
    arch: dict[str, Any],
    num_classes: int,
    pooling: str,
    state: dict[str, torch.Tensor],
    origin: Path,
    apply: Callable[[SequenceClassifier], None] | None = None,
) -> SequenceClassifier:
    """The classifier of ``arch`` with the tensors of ``state``; ``apply`` adds the
    layers its fine-tuning method added (LoRA adapters) before they are filled."""
    try:
        with torch.device("meta"):  # no memory or time spent on weights about to be replaced
            model = SequenceClassifier(GPT(GPTConfig.from_dict(dict(arch))), num_classes, pooling)
            if apply is not None:
                apply(model)
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, ValueError) as err:
        raise ModelLoadError(
            f"{origin} does not fit its own config (architecture {arch}, {num_classes} "
            f"classes, pooling {pooling!r}): {err}"
        ) from err
    return model.requires_grad_(False)
