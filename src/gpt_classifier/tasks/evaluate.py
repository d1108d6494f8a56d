"""The task behind ``python eval.py``: a checkpoint's metrics on a split or a labelled file."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gpt_classifier.checkpoints import data_settings, find_checkpoint
from gpt_classifier.data.sms import DataFormatError, Message, parse_messages
from gpt_classifier.files import read_user_text, user_file, write_text_atomically
from gpt_classifier.inference import ModelLoadError, TextClassifier
from gpt_classifier.reporting.plots import confusion_figure
from gpt_classifier.reporting.reports import write_json
from gpt_classifier.reporting.tensorboard import skip_tensorflow_import
from gpt_classifier.tasks.preflight import check_inference
from gpt_classifier.training.metrics import class_keys, rates

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"val": "validation", "valid": "validation"}
TABLE_COLUMNS = {"text_column": "text", "label_column": "label", "text_separator": " "}


def classification_report(
    labels: list[int], probs: torch.Tensor, names: list[str]
) -> tuple[dict[str, Any], list[list[int]]]:
    """Accuracy, loss, precision/recall/F1 (per class, macro, micro: the names train.py
    logs) and the confusion matrix (rows: true class, columns: predicted)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    target = torch.tensor(labels)
    matrix = multiclass_confusion_matrix(probs.argmax(dim=1), target, len(names))
    picked = probs[torch.arange(len(labels)), target]
    metrics: dict[str, Any] = {"examples": len(labels)}
    for key, value in rates(matrix, names).items():
        metrics[key] = int(value) if key.endswith("/support") else float(value)
    metrics["loss"] = float(-picked.clamp_min(1e-12).log().mean())
    return metrics, matrix.tolist()


def read_labelled_file(path: Path, names: list[str], columns: dict[str, Any] | None = None
                       ) -> tuple[list[str], list[int]]:  # fmt: skip
    """``label<TAB>text`` lines (the SMS format); a run's ``splits/*.csv`` (``Label,Text``);
    or a table (CSV/TSV with a header row, JSONL/JSON, Parquet) of the ``columns``
    (``text_column``, ``label_column``, ``text_separator``)."""
    path = user_file(path, "labelled_file")
    columns = columns or TABLE_COLUMNS
    mapping = {name: i for i, name in enumerate(names)}
    suffix, label_column = path.suffix.lower(), str(columns["label_column"])
    header = _header(path) if suffix in (".csv", ".tsv") else []
    if suffix == ".csv" and {"Label", "Text"} <= set(header) and label_column not in header:
        return _read_split_file(path, names)
    if suffix in (".csv", ".jsonl", ".json", ".parquet") or label_column in header:
        messages = _read_table_file(path, names, columns)
    else:  # a .tsv without a header row naming the label column, or any other suffix
        messages = parse_messages(path, None)
        for line, message in enumerate(messages, start=1):
            if message.label not in mapping:
                raise DataFormatError(f"labelled_file={path}, line {line}: label "
                                      f"{message.label!r} is not one of the model's "
                                      f"{names}")  # fmt: skip
    return [m.text for m in messages], [mapping[m.label] for m in messages]


def _read_table_file(path: Path, names: list[str], columns: dict[str, Any]) -> list[Message]:
    from gpt_classifier.data.tables import read_rows, read_table

    text_columns = columns["text_column"]
    text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    messages = read_rows(read_table(path, "labelled_file"), f"labelled_file={path}",
                         text_columns, columns["label_column"], columns["text_separator"],
                         keys="")  # fmt: skip
    for row, message in enumerate(messages, start=1):
        if message.label not in names:
            raise DataFormatError(f"labelled_file={path}, row {row} (data rows counted from "
                                  f"1): label {message.label!r} is not one of the model's "
                                  f"{names}")  # fmt: skip
    return messages


def _header(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        return next(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])


def _read_split_file(path: Path, names: list[str]) -> tuple[list[str], list[int]]:
    """A run's ``splits/*.csv``: ``Label,Text`` rows, labels as class indices (or names)."""
    texts, labels = [], []
    with io.StringIO(read_user_text(path, "labelled_file"), newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            label = row["Label"]
            if label in names:
                labels.append(names.index(label))
            elif label.isdigit() and int(label) < len(names):
                labels.append(int(label))
            else:
                raise ValueError(f"{path}, line {line}: unknown label {label!r}; expected {names}")
            texts.append(row["Text"])
    return texts, labels


def table_columns(cfg: DictConfig) -> dict[str, Any]:
    """The columns of a labelled table: as given, else the run's (data=files), else
    ``text`` and ``label``."""
    run = data_settings(cfg.ckpt_path)
    return {key: cfg.get(key) or run.get(key) or value for key, value in TABLE_COLUMNS.items()}


def split_token_ids(
    cfg: DictConfig, checkpoint: Path, split: str
) -> tuple[list[list[int]], list[int]]:
    """The split exactly as the checkpoint's training run made and tokenized it."""
    from gpt_classifier.data.datamodule import SMSSpamDataModule
    from gpt_classifier.data.files import FilesDataModule, HubDataModule

    data_hparams = data_settings(checkpoint)
    if not data_hparams:
        raise ModelLoadError(f"{checkpoint} holds no data settings; pass labelled_file=<file>")
    if (path := data_path(cfg)) is not None:
        data_hparams["path"] = path
    # The run's split files: the split made now must be the one they hold.
    run_splits = checkpoint.parent.parent / "splits"
    data_hparams["splits_dir"] = (
        str(run_splits) if (run_splits / f"{split}.csv").is_file() else None
    )
    # The run's data module, known by the settings only it has (data=hf, data=files).
    kind = HubDataModule if "split_names" in data_hparams else (
        FilesDataModule if "files" in data_hparams else SMSSpamDataModule)  # fmt: skip
    dm = kind(**data_hparams)
    try:
        dm.prepare_data()
        dm.setup("test")
    except FileNotFoundError as err:  # the run's data file has moved, or is gone
        given = any((data_hparams.get("files") or {}).values())  # data.files.*: no data.path
        fixes = [] if given else ["data.path=<where the file is now>"]
        if (made := run_splits / f"{split}.csv").is_file():
            fixes.append(f"labelled_file={made} (the split the run made)")
        raise FileNotFoundError(f"{err}; give eval.py {' or '.join(fixes)}") from err
    dataset = dm.datasets[split]
    return [ids.tolist() for ids in dataset.token_ids], dataset.labels.tolist()


def data_path(cfg: DictConfig) -> str | None:
    """``data.path`` (as train.py takes it), or its old name ``data_path``."""
    new, old = cfg.get("data", {}).get("path"), cfg.get("data_path")
    if new is not None and old is not None and str(new) != str(old):
        raise ValueError(
            f"data.path={new} and data_path={old} disagree; data_path is the old name of "
            "data.path: give only data.path."
        )
    value = new if new is not None else old
    return str(value) if value is not None else None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Write ``metrics.json``, the confusion matrix and a per-class report."""
    check_inference(cfg)
    output_dir = Path(cfg.paths.output_dir)
    classifier = TextClassifier.load(cfg.ckpt_path, device=cfg.device)
    names = classifier.settings.label_names
    if cfg.labelled_file:
        texts, labels = read_labelled_file(Path(cfg.labelled_file), names, table_columns(cfg))
        ids, _ = classifier.encode(texts)
        source = str(cfg.labelled_file)
    else:
        split = SPLIT_ALIASES.get(cfg.split, cfg.split)
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split={cfg.split!r}; choose train, validation (val) or test")
        if (Path(cfg.ckpt_path) / "config.json").is_file():
            raise ModelLoadError(
                f"{cfg.ckpt_path} is an export folder, which keeps no data split; "
                "evaluate it on labelled_file=<file>."
            )
        checkpoint = find_checkpoint(Path(cfg.ckpt_path), best=True)
        ids, labels = split_token_ids(cfg, checkpoint, split)
        source = f"{split} split"
    start = time.perf_counter()
    with torch.no_grad():
        probs = classifier.probabilities_from_ids(ids, cfg.batch_size, progress=True)
    seconds = time.perf_counter() - start
    metrics, matrix = classification_report(labels, probs, names)
    metrics["source"] = source
    metrics["time/classify_s"] = round(seconds, 3)
    write_json(output_dir / "metrics.json", metrics)
    _write_report(metrics, names, output_dir / "classification_report.txt")
    figure = confusion_figure(matrix, names)
    figure.savefig(output_dir / "confusion_matrix.png", dpi=120)
    skip_tensorflow_import()
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(output_dir / "tensorboard")) as writer:
        writer.add_figure("eval/confusion_matrix", figure)
        for key, value in metrics.items():
            if isinstance(value, float) and math.isfinite(value):
                writer.add_scalar(f"eval/{key}", value)
    log.info("%s: accuracy %.4f on %d examples; report in %s", source, metrics["acc"],
             metrics["examples"], output_dir)  # fmt: skip
    return metrics


def _write_report(metrics: dict[str, Any], names: list[str], path: Path) -> None:
    width = max(12, *(len(name) for name in names))
    lines = [f"{'class':>{width}} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8}"]
    for name, key in zip(names, class_keys(names)):
        row = [metrics[f"class/{key}/{kind}"] for kind in ("precision", "recall", "f1")]
        lines.append(f"{name:>{width}} " + " ".join(f"{v:>10.4f}" for v in row)
                     + f" {metrics[f'class/{key}/support']:>8d}")  # fmt: skip
    lines.append(f"\naccuracy {metrics['acc']:.4f}  loss {metrics['loss']:.4f}  "
                 f"macro F1 {metrics['f1_macro']:.4f}  micro F1 {metrics['f1_micro']:.4f}  "
                 f"examples {metrics['examples']}")  # fmt: skip
    write_text_atomically(path, "\n".join(lines) + "\n")
