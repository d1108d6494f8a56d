"""The task behind ``python predict.py``: label one text or a file of texts."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from gpt_classifier.checkpoints import data_settings
from gpt_classifier.data.sms import parse_messages
from gpt_classifier.data.tables import check_header, check_quoting
from gpt_classifier.files import read_user_text, user_file
from gpt_classifier.inference import Prediction, TextClassifier
from gpt_classifier.tasks.preflight import check_inference

log = logging.getLogger(__name__)


def read_input(path: Path, column: str | Sequence[str] = "text", separator: str = " "
               ) -> tuple[list[str], list[dict[str, Any]]]:  # fmt: skip
    """The texts of ``path``, and each row's other columns (a table's: an id, a label) to be
    written beside its prediction: from a column of a CSV/TSV (with a header), JSONL/JSON or
    Parquet file (several columns joined with ``separator``, as training joined them), or
    from a file of one text per line."""
    columns = [column] if isinstance(column, str) else list(column)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        if suffix in (".csv", ".tsv"):  # read here, without 🤗 datasets
            text, delimiter = read_user_text(path, "input"), "\t" if suffix == ".tsv" else ","
            check_quoting(io.StringIO(text, newline=""), delimiter, str(path))
            with io.StringIO(text, newline="") as f:
                reader = csv.DictReader(f, delimiter=delimiter)
                records, found = list(reader), list(reader.fieldnames or [])
            check_header(found, str(path))
            table = {c: [record.get(c) for record in records] for c in found}
        else:
            from gpt_classifier.data.tables import column_values, read_table

            data = read_table(user_file(path, "input"), "input")
            found = data.column_names
            table = {c: column_values(data, c) for c in found}
        if absent := [c for c in columns if c not in found]:
            raise ValueError(f"{path} has no column {', '.join(map(repr, absent))}; its "
                             f"columns are {found}. Set column=<name>.")  # fmt: skip
        rows = list(zip(*(table[c] for c in columns)))
        if not rows:
            raise ValueError(f"{path} has no rows: nothing to classify")
        texts = [separator.join(str(part) for part in parts) for parts in rows]
        if empty := [i for i, (parts, text) in enumerate(zip(rows, texts), 1)
                     if None in parts or not text.strip()]:  # fmt: skip
            raise ValueError(f"{path}: the text ({', '.join(columns)}) is empty or missing in "
                             f"rows {empty[:10]} (data rows counted from 1)")  # fmt: skip
        others = [c for c in found if c not in columns]
        return texts, [dict(zip(others, values)) for values in zip(*(table[c] for c in others))]
    texts = read_user_text(path, "input").split("\n")
    if texts and texts[-1] == "":
        texts.pop()  # the newline that ends the last line
    if not texts:
        raise ValueError(f"{path} is empty: nothing to classify")
    for line, text in enumerate(texts, start=1):
        if not text.strip():
            raise ValueError(f"{path}, line {line}: empty line; remove it or give it a text")
    return [t.removesuffix("\r") for t in texts], []


def write_predictions(texts: list[str], predictions: list[Prediction], path: Path,
                      given: list[dict[str, Any]] | None = None) -> Path:  # fmt: skip
    """CSV (``.csv``) or JSON lines (``.jsonl``): text, label, probabilities, and after them
    what the input gave each text (``given``: its other columns; a column named like one of
    ours, as ``label``, is written as ``file_label``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(predictions[0].probabilities) if predictions else []
    ours = {"text", "label", "probabilities", "truncated", *(f"p_{n}" for n in names)}
    given = [{(f"file_{k}" if k in ours else k): v for k, v in row.items()} for row in given or []]
    extra = list(given[0]) if given else []
    given = given or [{}] * len(texts)
    if path.suffix.lower() == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for text, p, row in zip(texts, predictions, given):
                record = {"text": text, "label": p.label, "probabilities": p.probabilities,
                          "truncated": p.truncated, **row}  # fmt: skip
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        return path
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", *(f"p_{n}" for n in names), "truncated", *extra])
        for text, p, row in zip(texts, predictions, given):
            writer.writerow([text, p.label, *(f"{p.probabilities[n]:.6f}" for n in names),
                             p.truncated, *(row[k] for k in extra)])  # fmt: skip
    return path


def predict(cfg: DictConfig) -> list[Prediction]:
    """Classify ``cfg.text`` (one text or a list), the texts of ``cfg.input``, or the
    messages of an SMS-format ``cfg.data.path``."""
    sms_path = cfg.get("data", {}).get("path")
    given = [name for name, value in (("text", cfg.text), ("input", cfg.input),
                                      ("data.path", sms_path)) if value is not None]  # fmt: skip
    piped = not given and not sys.stdin.isatty()
    if len(given) != 1 and not piped:
        raise ValueError(
            "give exactly one of 'text=\"...\"', input=<file> or data.path=<label<TAB>text "
            'file>, or pipe texts in, one a line (echo "Call me" | python predict.py ...)'
            + (f"; got {' and '.join(given)}" if given else "")
        )
    output = Path(cfg.output)
    if output.suffix.lower() not in (".csv", ".jsonl"):
        raise ValueError(f"output={output}: end it in .csv or .jsonl, the format to write")
    source = cfg.input if cfg.input is not None else sms_path
    if source is not None and output.resolve() == Path(str(source)).expanduser().resolve():
        raise ValueError(f"output={output} is the input file: the predictions would replace "
                         "it; give another output=")  # fmt: skip
    check_inference(cfg)
    classifier = TextClassifier.load(cfg.ckpt_path, device=cfg.device)
    given: list[dict[str, Any]] = []
    if piped:  # no Hydra quoting: any text as it is, one a line
        texts = [line.removesuffix("\r") for line in sys.stdin.read().splitlines()]
        if not texts:
            raise ValueError("no texts: give 'text=\"...\"', input=<file> or data.path=<file>, "
                             "or pipe texts in, one a line")  # fmt: skip
        for line, text in enumerate(texts, start=1):
            if not text.strip():
                raise ValueError(f"standard input, line {line}: empty; give every line a text")
    elif cfg.text is not None:
        texts = list(cfg.text) if isinstance(cfg.text, ListConfig) else [str(cfg.text)]
    elif cfg.input is not None:  # by default the text column(s) the run trained on
        run = data_settings(cfg.ckpt_path)
        column = cfg.column or run.get("text_column") or "text"
        texts, given = read_input(Path(cfg.input), column, run.get("text_separator", " "))
    else:
        messages = parse_messages(user_file(sms_path, "data.path"), None)  # labels kept as given
        texts, given = [m.text for m in messages], [{"label": m.label} for m in messages]
    predictions = classifier.classify(texts, batch_size=cfg.batch_size, progress=True)
    if cfg.text is not None or piped:
        for text, p in zip(texts, predictions):
            probs = ", ".join(f"{name} {value:.4f}" for name, value in p.probabilities.items())
            print(f"{p.label}\t({probs})\t{text}")
    write_predictions(texts, predictions, output, given)
    counts = {n: sum(p.label == n for p in predictions) for n in classifier.settings.label_names}
    log.info("%d predictions %s written to %s", len(predictions), counts, output)
    return predictions
