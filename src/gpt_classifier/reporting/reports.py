"""Run reports: ``metrics.json`` and the summary table of a Hydra sweep."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt_classifier.files import write_text_atomically

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")
# A run's record of its config, written once at its first start (tasks/run_config.py).
RUN_CONFIG_FILE = "run_config.yaml"


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    """Write ``values`` as indented JSON, atomically."""
    write_text_atomically(path, json.dumps(dict(values), indent=2) + "\n")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``a/b/c`` keys; lists and None become strings (TensorBoard HParams)."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}/"))
        return out
    key = prefix.rstrip("/")
    out[key] = tree if isinstance(tree, bool | int | float | str) else str(tree)
    return out


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per finished job of a sweep: its overrides and its final metrics."""
    rows = []
    for metrics_file in sorted(
        sweep_dir.glob("*/metrics.json"), key=lambda p: _job_order(p.parent)
    ):
        job_dir = metrics_file.parent
        metrics = json.loads(metrics_file.read_text())
        row: dict[str, Any] = {"job": job_dir.name, "overrides": job_overrides(job_dir)}
        row.update({k: v for k, v in metrics.items() if k != "best_checkpoint"})
        rows.append(row)
    return rows


def job_overrides(job_dir: Path) -> list[str]:
    """A job's overrides as its first start recorded them in ``run_config.yaml`` (Hydra
    rewrites ``.hydra/`` at every start, a refused one included), else as in ``.hydra/``."""
    record, hydra = job_dir / RUN_CONFIG_FILE, job_dir / ".hydra" / "overrides.yaml"
    if record.is_file() and (overrides := OmegaConf.load(record).get("overrides")) is not None:
        return list(overrides)
    return list(OmegaConf.load(hydra)) if hydra.is_file() else []


def _job_order(job_dir: Path) -> tuple[int, str]:
    return (int(job_dir.name), "") if job_dir.name.isdigit() else (1 << 30, job_dir.name)


def write_sweep_summary(sweep_dir: Path, metric: str = "val/acc") -> list[dict[str, Any]]:
    """Write ``summary.csv`` (jobs in order) and ``summary.md`` (best ``metric`` first,
    the best job marked; then the jobs without ``metrics.json``) into ``sweep_dir``."""
    rows = sweep_rows(sweep_dir)
    finished = {row["job"] for row in rows}
    others = {job.name: job_overrides(job) for job in sorted(
        (path.parent.parent for path in sweep_dir.glob("*/.hydra/overrides.yaml")),
        key=_job_order) if job.name not in finished}  # fmt: skip
    if not rows:
        log.warning("No finished job with metrics.json under %s; no summary written", sweep_dir)
        return rows
    # Overrides shared by every job say nothing about the differences: list them once.
    jobs = [*(row["overrides"] for row in rows), *others.values()]
    common = set.intersection(*(set(overrides) for overrides in jobs))
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in common)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(sweep_dir / "summary.csv", table.getvalue())
    lines = [f"# Sweep {sweep_dir}", ""]
    if common:
        lines += ["Overrides of every job: `" + " ".join(sorted(common)) + "`", ""]
    if any("/class/" in c for c in columns):  # a column per class and split: too wide
        columns = [c for c in columns if "/class/" not in c]
        lines += ["Per-class precision, recall, F1 and support: `summary.csv`.", ""]
    ranked = [row for row in rows if isinstance(row.get(metric), int | float)]
    # Losses are best low; accuracy, precision, recall and F1 high.
    ranked.sort(key=lambda row: row[metric], reverse="loss" not in metric)
    ordered = ranked + [row for row in rows if row not in ranked]
    if ranked:
        lines += [f"Sorted by `{metric}`; the best job is marked.", ""]
    lines += ["| best | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in ordered:
        cells = ["**best**" if ranked and row is ranked[0] else ""]
        cells += [_cell(c, row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if others:
        lines += ["", "Jobs without `metrics.json` (failed, stopped, or still running; their "
                  "`train.log` says which):", ""]  # fmt: skip
        lines += [f"- {job}: `{' '.join(o for o in overrides if o not in common)}`"
                  for job, overrides in others.items()]  # fmt: skip
    write_text_atomically(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    log.info("Sweep summary of %d jobs: %s", len(rows), sweep_dir / "summary.md")
    return rows


def results_table(metrics: Mapping[str, Any], splits: Sequence[str] = SPLITS) -> str:
    """The final evaluation as a table: a row per metric, a column per split."""
    names = sorted(
        {k.split("/", 1)[1] for k in metrics if k.split("/", 1)[0] in splits},
        key=lambda name: (name.startswith("class/"), name),
    )  # per class last
    rows = [["metric", *splits]]
    rows += [[name, *(_cell(name, metrics.get(f"{split}/{name}", "")) for split in splits)]
             for name in names]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]  # fmt: skip
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _cell(column: str, value: Any) -> str:
    """Counts as whole numbers, rates and times to 4 decimals."""
    if isinstance(value, float) and value.is_integer() and column.endswith(("examples", "support")):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


class SweepSummary(Callback):
    """Hydra callback: tabulate every job's final metrics after each job of a multirun (a
    failed job ends the sweep without ``on_multirun_end``) and when it ends."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.on_multirun_end(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_summary(Path(config.hydra.sweep.dir), config.get("optimize_metric", "val/acc"))
