"""The task behind ``python export.py``: a self-contained folder from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from gpt_classifier.inference import TextClassifier
from gpt_classifier.inference.classifier import check_export_folder
from gpt_classifier.tasks.errors import ConfigError
from gpt_classifier.tasks.model_card import hub_base_model, run_folder, write_model_card
from gpt_classifier.tasks.preflight import check_inference

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    """Write the export folder ``cfg.out`` (``cfg.format``: native or hf) and, with
    ``cfg.hub_repo``, upload it to the Hugging Face Hub."""
    check_inference(cfg)
    try:
        check_export_folder(Path(cfg.out))  # before the model loads
    except FileExistsError as err:
        raise ConfigError(f"out={err}") from err
    if cfg.get("hub_repo"):
        check_hub_upload(str(cfg.hub_repo))
    fmt = cfg.get("format", "native")
    classifier = TextClassifier.load(cfg.ckpt_path)
    run = run_folder(cfg.ckpt_path)
    folder = classifier.export(cfg.out, format=fmt, base_model=hub_base_model(run))
    if fmt == "hf":
        write_model_card(folder, list(classifier.settings.label_names), run)
    log.info("Exported %s to %s (format=%s)", cfg.ckpt_path, folder, fmt)
    if cfg.get("hub_repo"):
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(cfg.hub_repo, exist_ok=True)
        url = api.upload_folder(folder_path=str(folder), repo_id=cfg.hub_repo)
        log.info("Uploaded %s to %s", folder, url)
    return folder


def check_hub_upload(repo: str) -> None:
    """What ``hub_repo=`` needs, checked before the export: an ``owner/name``, the Hub not
    switched off, and a token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise ConfigError(f"hub_repo={repo}: {err} Give owner/name.") from err
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"hub_repo={repo}: HF_HUB_OFFLINE=1 forbids the upload; unset it, "
                          "or export without hub_repo")  # fmt: skip
    if get_token() is None:
        raise ConfigError(f"hub_repo={repo}: an upload needs a Hugging Face token: run `hf auth "
                          "login` (or `huggingface-cli login`), or set HF_TOKEN")  # fmt: skip
