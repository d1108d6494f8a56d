"""The native format: training checkpoints, and ``export.py``'s default export
(``model.safetensors`` + ``config.json``, read with no Lightning and no pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpt_classifier.checkpoints import complete_state_dict, read_checkpoint, upgrade_names
from gpt_classifier.files import atomic_path
from gpt_classifier.finetuning.methods import method_from_config
from gpt_classifier.inference.loading import (
    EXPORT_FORMAT,
    InferenceSettings,
    ModelLoadError,
    build_classifier,
)
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.lora import lora_layers, merged_state_dict

EXPORT_VERSION = 2  # 1: before SequenceClassifier (tensor names without "backbone.")


def load_checkpoint(path: Path) -> tuple[SequenceClassifier, InferenceSettings]:
    """A training checkpoint (a file, or a sharded folder), its frozen weights added."""
    try:
        checkpoint = read_checkpoint(path)
    except Exception as err:  # zip, pickle, unpickler and shard-reading errors
        raise ModelLoadError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); it may be "
            "truncated or corrupt, or need code to load: use a checkpoint written by train.py."
        ) from err
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "backbone_config" not in hparams or "state_dict" not in checkpoint:
        raise ModelLoadError(f"{path} is not a gpt-classifier checkpoint (no backbone_config)")
    inference = checkpoint.get("inference") or {}
    names = inference.get("label_names") or hparams.get("label_names")
    settings = InferenceSettings(
        label_names=list(names or [str(i) for i in range(hparams.get("num_classes", 2))]),
        pooling=inference.get("pooling", hparams.get("pooling", "last_token")),
        max_length=int(inference.get("max_length", hparams["backbone_config"]["context_length"])),
        truncation_side=inference.get("truncation_side", "right"),
        pad_to=inference.get("pad_to"),
    )
    try:
        complete_state_dict(checkpoint, path)
        method = method_from_config(hparams.get("finetuning"))
    except (FileNotFoundError, RuntimeError, ValueError, TypeError) as err:
        raise ModelLoadError(f"{path}: {err}") from err
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()
             if k.startswith("model.")}  # fmt: skip
    model = build_classifier(hparams["backbone_config"], len(settings.label_names),
                             settings.pooling, state, path, apply=method.apply)  # fmt: skip
    return model, settings


def load(folder: Path, config: dict[str, Any]) -> tuple[SequenceClassifier, InferenceSettings]:
    """A folder written by ``export.py`` (``format=native``)."""
    weights_path, config_path = folder / "model.safetensors", folder / "config.json"
    if not weights_path.is_file():
        raise ModelLoadError(f"export folder {folder} lacks {weights_path.name}; export it again")
    if config.get("format") != EXPORT_FORMAT:
        kind = config.get("model_type")
        fix = ("use it with transformers' pipeline, or fine-tune from its weights: python "
               f"train.py model.weights={folder}" if kind == "gpt2" else "pass a training "
               "run, a .ckpt file or a folder written by export.py")  # fmt: skip
        what = f"a 🤗 transformers {kind} model" if kind else f"not a {EXPORT_FORMAT} export"
        raise ModelLoadError(f"{config_path}: {what}, which predict, eval, export and serve do "
                             f"not read (no format: {EXPORT_FORMAT} key); {fix}")  # fmt: skip
    if int(config.get("format_version", 1)) > EXPORT_VERSION:
        raise ModelLoadError(
            f"{config_path} is format version {config['format_version']}, newer "
            f"than this gpt-classifier reads ({EXPORT_VERSION}); upgrade gpt-classifier."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = upgrade_names(load_file(str(weights_path)))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{weights_path} could not be read ({err}); export it again") from err
    settings = InferenceSettings.from_config(config)
    model = build_classifier(config["architecture"], config["num_classes"], settings.pooling,
                             state, weights_path)  # fmt: skip
    return model, settings


def export(model: SequenceClassifier, settings: InferenceSettings, folder: Path) -> Path:
    """``model.safetensors`` (LoRA adapters merged into the weights they adapt),
    ``config.json`` and a README into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in merged_state_dict(model).items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT})
    config = export_config(model, settings)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "README.md").write_text(_readme(config))
    return folder


def export_config(model: SequenceClassifier, settings: InferenceSettings) -> dict[str, Any]:
    """The ``config.json`` of an export: the architecture, the labels and the settings."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "architecture": model.cfg.to_dict(),
        "num_classes": len(settings.label_names),
        "tokenizer": "tiktoken:gpt2",
        "merged_adapters": len(lora_layers(model)),
        **asdict(settings),
    }


def _readme(config: dict[str, Any]) -> str:
    arch = config["architecture"]
    return f"""# GPT-2 text classifier (gpt-classifier export)

GPT-2 ({arch["n_layers"]} layers, {arch["emb_dim"]} dims) fine-tuned to classify text as
{", ".join(config["label_names"])}. Files: `model.safetensors` (weights, the book's tensor
names under `backbone.`: tok_emb, pos_emb, trf_blocks, final_norm, and out_head, the
classification head; any LoRA adapters are merged in) and `config.json` (architecture,
labels, tokenizer, truncation and pooling). Loading needs neither Lightning nor pickle.

```python
from gpt_classifier.inference import TextClassifier

clf = TextClassifier.load("this/folder")
print(clf.classify(["You are a winner! Call now to claim your prize."]))
```

Texts are tokenized with tiktoken's `gpt2` encoding, cut to {config["max_length"]} tokens
(truncation side: {config["truncation_side"]}), and classified from the logits of the
outputs that the `{config["pooling"]}` pooling rule picks (`gpt_classifier.model.pooling`).
"""
