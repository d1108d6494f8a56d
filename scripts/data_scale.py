"""How reading, tokenizing and training scale with the rows of a dataset of one's own.

Run through ``python scripts/benchmark.py --data-scale 1000000``: for 10k, 100k and 1M
rows (up to the number given) of ``make_text_dataset.py``'s SMS-length texts, a fresh
process reads the CSV file (``data=files``: 🤗 datasets, our checks, the stratified
split) and tokenizes every split on all cores, and reports rows/s, tokens/s and its
peak memory; then ``train.py`` runs one gpt2-tiny ``last_block`` epoch over 200k rows
with the prefix cache, end to end, with its peak memory.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from make_text_dataset import make_rows, write

REPO = Path(__file__).resolve().parents[1]
SIZES = (10_000, 100_000, 1_000_000)
TRAIN_ROWS = 200_000
GOALS = {"tokenize_rows_per_s": 50_000, "train_peak_rss_gib": 6.0}


def measure(path: Path) -> dict[str, Any]:
    """Read and tokenize ``path`` in this process (the child's side)."""
    from gpt_classifier.data.files import FilesDataModule

    start = time.perf_counter()
    data = FilesDataModule(path=str(path), context_length=1024)
    splits = data.load_splits()
    read_s = time.perf_counter() - start
    rows = sum(len(split) for _, split in splits.items())
    start = time.perf_counter()
    data.setup("fit")  # the splits are read already: this tokenizes them
    tokenize_s = time.perf_counter() - start
    tokens = sum(int(d.sizes.sum()) for d in data.datasets.values())
    return {
        "rows": rows,
        "read_rows_per_s": round(rows / read_s),
        "tokenize_rows_per_s": round(rows / tokenize_s),
        "tokens_per_s": round(tokens / tokenize_s),
        "tokens_per_row": round(tokens / rows, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def dataset(rows: int, out: Path) -> Path:
    path = out / f"texts-{rows}.csv"
    if not path.is_file():
        write(path, *make_rows(rows, classes=5))
    return path


def child(command: list[str], out: Path, name: str) -> tuple[str, float, float]:
    """Run ``command`` in a fresh process with its own 🤗 datasets cache (a cold read):
    its output, wall seconds and peak memory (GiB)."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(out / "hf-datasets"),
           "PYTHONPATH": str(REPO / "src")}  # fmt: skip
    log = out / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        process = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{name} failed (exit status {status}); see {log}")
    return log.read_text(), wall, round(usage.ru_maxrss / 2**20, 2)


def scale_rows(largest: int, out: Path) -> list[dict[str, Any]]:
    rows = []
    for size in [s for s in SIZES if s <= largest] or [largest]:
        path = dataset(size, out)
        text, _, _ = child([sys.executable, __file__, "--measure", str(path)], out, f"read-{size}")
        rows.append(json.loads(text.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def train_row(out: Path, rows: int = TRAIN_ROWS) -> dict[str, Any]:
    run = out / f"train-{rows}"
    command = [sys.executable, "train.py", "model=gpt2-tiny", "freeze=last_block", "data=files",
               f"data.path={dataset(rows, out)}", "trainer.max_epochs=1",
               f"hydra.run.dir={run}", f"paths.cache_dir={out / 'cache'}",
               "callbacks.progress_bar.refresh_rate=0"]  # fmt: skip
    log, wall, peak = child(command, out, f"train-{rows}")
    cache = re.search(r"Prefix cache: computed .*?; ([\d.]+) MiB in host memory", log)
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "rows": rows,
        "end_to_end_s": round(wall, 1),
        "fit_s": round(metrics["time/fit_s"], 1),
        "prefix_s": round(metrics["time/prefix_s"], 1),
        "prefix_cache_mib": float(cache[1]) if cache else None,
        "peak_rss_gib": peak,
        "test_acc": round(metrics["test/acc"], 4),
    }


def print_tables(scale: list[dict[str, Any]], train: dict[str, Any]) -> None:
    goal = GOALS["tokenize_rows_per_s"]
    print("| rows | read rows/s | tokenize rows/s | tokens/s | tokens/row | peak RSS GiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in scale:
        print(f"| {r['rows']:,} | {r['read_rows_per_s']:,} | {r['tokenize_rows_per_s']:,} | "
              f"{r['tokens_per_s']:,} | {r['tokens_per_row']} | {r['peak_rss_gib']} |")  # fmt: skip
    print(f"\nGoal: tokenizing at least {goal:,} rows/s (all cores).\n")
    print("| gpt2-tiny last_block, 1 epoch | end to end s | fit s | prefix pass s | "
          "prefix cache MiB | peak RSS GiB | test acc |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {train['rows']:,} rows | {train['end_to_end_s']} | {train['fit_s']} | "
          f"{train['prefix_s']} | {train['prefix_cache_mib']} | {train['peak_rss_gib']} | "
          f"{train['test_acc']} |")  # fmt: skip
    print(f"\nGoal: peak RSS under {GOALS['train_peak_rss_gib']:g} GiB.")


if __name__ == "__main__" and sys.argv[1:2] == ["--measure"]:
    print(json.dumps(measure(Path(sys.argv[2]))))
