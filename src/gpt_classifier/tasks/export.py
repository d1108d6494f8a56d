"""The task behind ``python export.py``: a self-contained folder from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from gpt_classifier.inference import TextClassifier

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` into ``cfg.out``."""
    folder = TextClassifier.load(cfg.ckpt_path).export(cfg.out)
    log.info("Exported %s to %s", cfg.ckpt_path, folder)
    return folder
