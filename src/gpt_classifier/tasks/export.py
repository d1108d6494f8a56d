"""The task behind ``python export.py``: a self-contained folder from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from gpt_classifier.inference import TextClassifier
from gpt_classifier.inference.classifier import check_export_folder
from gpt_classifier.tasks.model_card import hub_base_model, run_folder, write_model_card
from gpt_classifier.tasks.preflight import ConfigError, check_inference

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    """Write the export folder ``cfg.out`` (``cfg.format``: native or hf) and, with
    ``cfg.hub_repo``, upload it to the Hugging Face Hub."""
    check_inference(cfg)
    try:
        check_export_folder(Path(cfg.out))  # before the model loads
    except FileExistsError as err:
        raise ConfigError(f"out={err}") from err
    fmt = cfg.get("format", "native")
    classifier = TextClassifier.load(cfg.ckpt_path)
    run = run_folder(cfg.ckpt_path)
    folder = classifier.export(cfg.out, format=fmt, base_model=hub_base_model(run))
    if fmt == "hf":
        write_model_card(folder, list(classifier.settings.label_names), run)
    log.info("Exported %s to %s (format=%s)", cfg.ckpt_path, folder, fmt)
    if cfg.get("hub_repo"):
        from huggingface_hub import HfApi

        # Needs a token (huggingface-cli login or HF_TOKEN) and the network.
        api = HfApi()
        api.create_repo(cfg.hub_repo, exist_ok=True)
        url = api.upload_folder(folder_path=str(folder), repo_id=cfg.hub_repo)
        log.info("Uploaded %s to %s", folder, url)
    return folder
