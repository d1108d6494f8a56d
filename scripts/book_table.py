"""Re-run the book's additional-experiments table (chapter 6 bonus) beside its numbers.

    python scripts/book_table.py [--rows 1,4,16] [--out DIR] [-- <Hydra overrides>]

Each row runs ``python train.py experiment=book_table/rowNN <overrides>`` in its own
process (the overrides apply to every row, e.g. ``model.pretrained=false`` or
``data.path=...``); the classical baseline (``baseline.py``) adds a row unless
``--no-baseline``. Writes ``book_table.md`` and ``book_table.csv`` into ``--out``
(default ``outputs/book_table/<date_time>/``), each row's run folder and log under
``runs/``, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The book's published numbers (pretrained weights, A100, 5 epochs): setting, train / val /
# test accuracy in %, training minutes.
BOOK: dict[int, tuple[str, float, float, float, float]] = {
    1: ("gpt2-small, last token, last_block, context = longest train (120)",
        96.63, 99.33, 95.00, 0.28),
    2: ("first token", 78.46, 80.54, 75.00, 0.28),
    3: ("last_layer (head only)", 78.65, 79.87, 72.00, 0.25),
    4: ("last two blocks", 98.85, 98.66, 98.33, 0.33),
    5: ("all layers", 99.62, 96.64, 96.67, 0.69),
    6: ("gpt2-medium", 87.50, 91.28, 84.67, 0.75),
    7: ("gpt2-large", 99.52, 98.66, 96.67, 1.50),
    8: ("gpt2-xl", 99.81, 99.81, 98.33, 2.83),
    9: ("gpt2-xl, all layers", 100.00, 98.66, 98.67, 8.12),
    10: ("random weights, all layers", 100.00, 96.64, 93.67, 0.69),
    11: ("LoRA rank 16, alpha 16", 100.00, 97.32, 96.67, 0.75),
    12: ("gpt2-xl, LoRA rank 16, alpha 8", 100.00, 98.66, 98.33, 5.79),
    13: ("padding to the model's context (1024)", 83.08, 87.92, 78.33, 2.46),
    14: ("no padding (batch size 1)", 100.00, 98.66, 98.00, 1.75),
    15: ("no padding, batch 1 with 8 accumulation steps", 99.33, 98.66, 98.33, 1.70),
    16: ('"flexible": last non-padding position', 99.42, 98.66, 98.33, 0.30),
    17: ("no causal mask", 99.23, 98.66, 95.33, 0.29),
    18: ("`ignore_index` for padding (the book's script never uses it: = row 1)",
         96.63, 99.33, 95.00, 0.28),
    19: ("average of all positions' outputs", 97.79, 99.33, 96.33, 0.32),
}  # fmt: skip

COLUMNS = [
    "row", "setting", "book train", "book val", "book test", "book min",
    "ours train", "ours val", "ours test", "ours fit min", "ours wall min",
    "trainable params", "weights", "machine",
]  # fmt: skip


def run_config(run_dir: Path) -> dict[str, Any]:
    """The composed config a run wrote, as plain values."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))


def machine(config: dict[str, Any]) -> str:
    """What a run ran on: the GPU's name, or the CPU's and its core count."""
    accelerator = config.get("trainer", {}).get("accelerator", "cpu")
    wants_gpu = accelerator in ("gpu", "cuda", "auto")
    try:
        import torch

        if wants_gpu and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def run(script: str, run_dir: Path, overrides: list[str]) -> tuple[dict[str, Any] | None, float]:
    """One app in a child process: its metrics.json (None if it failed) and wall time."""
    command = [sys.executable, script, f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    with open(f"{run_dir}.log", "w") as log:
        status = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    metrics = run_dir / "metrics.json"
    if status != 0 or not metrics.is_file():
        print(f"{script} failed (exit status {status}); see {run_dir}.log", file=sys.stderr)
        return None, wall
    return json.loads(metrics.read_text()), wall


def table_row(number: int | str, setting: str, book: tuple | None, metrics: dict | None,
              wall: float, run_dir: Path) -> dict[str, Any]:  # fmt: skip
    """One row of the table; the book's columns are empty for rows it does not have."""
    row: dict[str, Any] = {"row": number, "setting": setting}
    if book:
        row.update(dict(zip(COLUMNS[2:6], book)))
    if metrics is None:
        row["ours train"] = f"failed: see {run_dir.name}.log"
        return row
    config = run_config(run_dir)
    model = config.get("model")
    weights = "none" if model is None else ("pretrained" if model["pretrained"] else "random")
    row.update({
        "ours train": round(100 * metrics["train/acc"], 2),
        "ours val": round(100 * metrics["val/acc"], 2),
        "ours test": round(100 * metrics["test/acc"], 2),
        "ours fit min": round(metrics["time/fit_s"] / 60, 2),
        "ours wall min": round(wall / 60, 2),
        "trainable params": metrics.get("params/trainable", ""),
        "weights": weights,
        "machine": machine(config),
    })  # fmt: skip
    return row


def markdown(rows: list[dict[str, Any]], overrides: list[str]) -> str:
    lines = [
        "# The book's additional-experiments table, re-run",
        "",
        "Book: pretrained weights, A100, 5 epochs (accuracy in %, training minutes). "
        f"Ours: `python scripts/book_table.py -- {' '.join(overrides)}`".rstrip()
        + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, rows: list[dict[str, Any]], overrides: list[str]) -> str:
    """Write ``book_table.md`` and ``book_table.csv`` into ``out``; returns the Markdown."""
    text = markdown(rows, overrides)
    (out / "book_table.md").write_text(text, encoding="utf-8")
    with (out / "book_table.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(map(str, BOOK)), help="e.g. 1,4,16")
    parser.add_argument("--out", type=Path, help="default: outputs/book_table/<date_time>/")
    parser.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row, after --")
    args = parser.parse_args()
    try:
        numbers = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rows {args.rows!r}: give row numbers separated by commas, e.g. 1,4,16")
    unknown = [n for n in numbers if n not in BOOK]
    if unknown:
        parser.error(f"--rows: no row {unknown} in the book's table; rows are 1 to {len(BOOK)}")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or REPO / "outputs" / "book_table" / stamp).resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    rows = []
    for number in numbers:
        run_dir = runs / f"row{number:02d}"
        overrides = [f"experiment=book_table/row{number:02d}", *args.overrides]
        metrics, wall = run("train.py", run_dir, overrides)
        rows.append(table_row(number, BOOK[number][0], BOOK[number][1:], metrics, wall, run_dir))
        print(json.dumps(rows[-1]), file=sys.stderr)
        write_table(out, rows, args.overrides)  # an interrupted table keeps its finished rows
    if not args.no_baseline:
        # The same data and split as the rows (the book's), with the data overrides.
        data = [o for o in args.overrides if o.startswith(("data.", "paths.", "seed="))]
        run_dir = runs / "baseline"
        metrics, wall = run("baseline.py", run_dir, ["data.book_compat=true", *data])
        setting = "TF-IDF (char 2-5 grams) + logistic regression (`baseline.py`)"
        rows.append(table_row("baseline", setting, None, metrics, wall, run_dir))

    print(write_table(out, rows, args.overrides))
    print(f"Written to {out}", file=sys.stderr)
    return 1 if any("failed" in str(r.get("ours train", "")) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
