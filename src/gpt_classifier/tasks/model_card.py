"""The model card (``README.md``) of a ``format=hf`` export: what the model says, what it
was made from and how, and how well it did, read by ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gpt_classifier.files import write_text_atomically
from gpt_classifier.model.weights import HUB_MODELS, HUB_PREFIX
from gpt_classifier.tasks.run_config import RUN_CONFIG_FILE

SPLIT_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}


def run_folder(ckpt_path: str | Path) -> Path | None:
    """The training run a ``ckpt_path`` belongs to (a run folder, or a checkpoint in its
    ``checkpoints/``), or None for an export folder."""
    path = Path(ckpt_path).expanduser()
    for candidate in (path, path.parent.parent):
        if (candidate / RUN_CONFIG_FILE).is_file():
            return candidate
    return None


def hub_base_model(run: Path | None) -> str | None:
    """The Hub id of the weights a run started from (None: random, local or unknown)."""
    if run is None:
        return None
    model = OmegaConf.load(run / RUN_CONFIG_FILE).config.model
    weights = str(model.get("weights"))
    if not model.get("pretrained", True):
        return None
    return weights[len(HUB_PREFIX) :] if weights.startswith(HUB_PREFIX) else HUB_MODELS.get(weights)


def write_model_card(folder: Path, label_names: list[str], run: Path | None) -> Path:
    """``folder/README.md``: the labels, and with the run's folder, the base weights, the
    fine-tuning method, the data file, the split sizes, the test metrics and the command."""
    from huggingface_hub import ModelCard, ModelCardData

    facts = _run_facts(run) if run is not None else {}
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["gpt2", "text-classification", "gpt-classifier"],
        base_model=facts.get("base_model"),
    )
    lines = [
        "# GPT-2 text classifier",
        "",
        "GPT-2 fine-tuned as a sequence classifier with "
        "gpt-classifier (the method of chapter 6 of *Build a Large "
        "Language Model (From Scratch)*): the logits of each text's last token classify it.",
        "",
        f"- **Labels**: {', '.join(f'`{name}`' for name in label_names)}",
    ]
    if facts:
        lines += [
            f"- **Base weights**: {facts['weights']}",
            f"- **Fine-tuning**: {facts['method']}",
            f"- **Data**: {facts['data']}",
            f"- **Splits**: {facts['splits']}",
            "",
            "## Test metrics",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in facts["metrics"].items()),
            "",
            "## Trained with",
            "",
            "```bash",
            facts["command"],
            "```",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classify = pipeline("text-classification", model="path/to/this/folder", top_k=None)',
        'classify("You are a winner! Call now to claim your prize.")',
        "```",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = folder / "README.md"
    write_text_atomically(path, str(card))
    return path


def _run_facts(run: Path) -> dict[str, Any]:
    record = OmegaConf.to_container(OmegaConf.load(run / RUN_CONFIG_FILE))
    config, choices = record["config"], record.get("choices") or {}
    model = config["model"]
    base = hub_base_model(run)
    if not model.get("pretrained", True):
        weights_said = f"none (random initialisation, `model={model['name']}`)"
    else:
        weights_said = (
            f"`{base}`" if base else f"`{Path(str(model['weights'])).name}` (a local folder)"
        )
    freeze = {k: v for k, v in (config.get("freeze") or {}).items() if not k.startswith("_")}
    method = f"`freeze={choices.get('freeze', '?')}`" + (
        f" ({', '.join(f'{k}={v}' for k, v in freeze.items())})" if freeze else "")  # fmt: skip
    data_path = (config.get("data") or {}).get("path")
    data_file = Path(data_path) if data_path else None
    if data_file is not None and data_file.is_file():
        data_said = f"`{data_file.name}` ({data_file.stat().st_size:,} bytes)"
    else:
        named = f", `{data_file.name}`" if data_file else ""
        data_said = f"`data={choices.get('data', '?')}`{named}"
    counts = {}
    for split, name in SPLIT_FILES.items():
        path = run / "splits" / name
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as f:
                counts[split] = sum(1 for _ in csv.reader(f)) - 1  # less the header
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    test = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
    shown = {k: (str(int(v)) if k == "examples" else f"{v:.4f}") for k, v in sorted(test.items())}
    overrides = " ".join(shlex.quote(o) for o in record.get("overrides") or [])
    return {
        "base_model": base,
        "weights": weights_said,
        "method": method,
        "data": data_said,
        "splits": ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "not kept",
        "metrics": shown or {"(none)": "the run did not finish its final evaluation"},
        "command": f"python train.py {overrides}".rstrip(),
    }
