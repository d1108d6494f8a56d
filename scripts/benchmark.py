"""Benchmark the book-equivalent training mode against ours, side by side.

Each (model, freeze policy) pair runs ``train.py`` twice on the same machine, one
mode after the other, and the table reports both and their speed ratio:

- ``book``: ``experiment=book_ch06_baseline``: full forward on every step, float32,
  padding to the longest training message, logits at the final position.
- ``ours``: the default engine (prefix cache, per-batch padding, last-token pooling,
  ``precision=auto``) on the same book-compatible split, so accuracies compare.

Example::

    python scripts/benchmark.py --models gpt2-small --freeze last_block --epochs 5

``--sweep N`` instead times what repeat runs cost: one job, the same job again (its
prefix cache on disk), and an N-job ``optimizer.lr`` sweep in one process from a cold
cache, with their ratios to the one job.

``--data-scale N`` instead measures a dataset of one's own from 10k to N rows: reading,
tokenizing and peak memory, and a gpt2-tiny epoch over 200k rows (``data_scale.py``).

``--markdown`` also writes the tables into ``docs/benchmarks.md``, in the section of this
machine kind and workload (replacing the one measured before), with the command.

``--compare-repo DIR`` also runs every job from another checkout (e.g. a ``git worktree``
of an earlier commit), alternating with this one ``--repeats`` times (each goes first
on every other repeat, so neither gains from its place), and prints the ratio of the
median end-to-end times: a change that must not slow things down is
timed against its parent in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "book": ["experiment=book_ch06_baseline"],
    "ours": ["data.book_compat=true"],
}
EXAMPLES = {"train": 1045, "all": 1494}


def run_mode(
    mode: str, model: str, freeze: str, args: argparse.Namespace, out: Path,
    repo: Path = REPO, label: str = "this", repeat: int = 0,
) -> dict:  # fmt: skip
    """One ``train.py`` job of checkout ``repo`` in a child process; its metrics, wall
    time and peak memory."""
    run_dir = out / f"{model}-{freeze}-{mode}-{label}-{repeat}"
    command = [
        sys.executable, "train.py", *MODES[mode],
        f"model={model}", f"freeze={freeze}", f"accelerator={args.accelerator}",
        f"model.pretrained={str(args.pretrained).lower()}",
        f"trainer.max_epochs={args.epochs}", f"hydra.run.dir={run_dir}",
        "callbacks.progress_bar.refresh_rate=0", *args.override,
    ]  # fmt: skip
    if args.data:
        command.append(f"data.path={args.data}")
    # A cache folder of its own: every job starts cold, as a first run does.
    command.append(f"paths.cache_dir={out / (run_dir.name + '-cache')}")
    wall, peak_gib = run_command(command, repo, out / f"{run_dir.name}.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fit_s, test_s = metrics["time/fit_s"], metrics["time/test_s"]
    return {
        "model": model,
        "freeze": freeze,
        "mode": mode,
        "code": label,
        "epochs": args.epochs,
        "end_to_end_s": round(wall, 1),
        "fit_s": round(fit_s, 1),
        "test_s": round(test_s, 1),
        # the one-off frozen-prefix pass, inside fit_s and test_s (0 without the cache)
        "prefix_s": round(metrics.get("time/prefix_s", 0.0), 1),
        "train_examples_per_s": round(EXAMPLES["train"] * args.epochs / fit_s, 1),
        "eval_examples_per_s": round(EXAMPLES["all"] / test_s, 1),
        "peak_rss_gib": peak_gib,
        "val_acc": round(metrics["val/acc"], 4),
        "test_acc": round(metrics["test/acc"], 4),
    }


def run_command(command: list[str], repo: Path, log_path: Path) -> tuple[float, float]:
    """Run ``command`` in checkout ``repo``; its wall seconds and peak memory (GiB)."""
    # The checkout's own package, ahead of whichever one is installed.
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"run failed (exit status {status}); see {log_path}")
    return wall, round(usage.ru_maxrss / 2**20, 2)  # ru_maxrss is in KiB on Linux


def sweep_runs(jobs: int, args: argparse.Namespace, out: Path, repo: Path,
               label: str) -> list[dict[str, Any]]:  # fmt: skip
    """One default job, the same job again (its cache on disk), and a ``jobs``-job
    ``optimizer.lr`` sweep from a cold cache, in checkout ``repo``; their rows."""
    model, freeze = args.models[0], args.freeze[0]
    common = [
        *MODES["ours"], f"model={model}", f"freeze={freeze}", f"accelerator={args.accelerator}",
        f"model.pretrained={str(args.pretrained).lower()}", f"trainer.max_epochs={args.epochs}",
        "callbacks.progress_bar.refresh_rate=0", *args.override,
    ]  # fmt: skip
    if args.data:
        common.append(f"data.path={args.data}")
    # Learning rates spread evenly in log space over the book's 5e-5 and a decade around it.
    rates = [f"{1e-5 * 10 ** (i / max(jobs - 1, 1)):.3g}" for i in range(jobs)]
    out = out / label
    runs = {
        "one job (cold cache)": (["train.py", f"paths.cache_dir={out / 'cache-single'}",
                                  f"hydra.run.dir={out / 'single'}"], [out / "single"]),
        "same job again (cache on disk)": (["train.py", f"paths.cache_dir={out / 'cache-single'}",
                                            f"hydra.run.dir={out / 'again'}"], [out / "again"]),
        f"{jobs}-job lr sweep (cold cache)": (
            ["train.py", "-m", f"paths.cache_dir={out / 'cache-sweep'}",
             f"hydra.sweep.dir={out / 'sweep'}", f"optimizer.lr={','.join(rates)}"],
            [out / "sweep" / str(i) for i in range(jobs)],
        ),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (command, folders) in runs.items():
        wall, peak = run_command([sys.executable, *command, *common], repo,
                                 out / f"{name.split()[0]}-{len(rows)}.log")  # fmt: skip
        metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
        rows.append({
            "run": name, "code": label, "jobs": len(folders), "wall_s": round(wall, 1),
            "peak_rss_gib": peak,
            "prefix_s": round(sum(m["time/prefix_s"] for m in metrics), 1),
            "startup_s": round(sum(m["time/startup_s"] for m in metrics), 1),
            "fit_s": round(sum(m["time/fit_s"] for m in metrics), 1),
            "test_s": round(sum(m["time/test_s"] for m in metrics), 1),
            "best_val_acc": round(max(m["val/acc"] for m in metrics), 4),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    one = rows[0]["wall_s"]
    for row in rows:
        row["x one job"] = f"{row['wall_s'] / one:.2f}"
    return rows


def print_sweep_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The sweep rows as Markdown, and this checkout against the compared one."""
    columns = ["run", "code", "jobs", "wall_s", "x one job", "prefix_s", "startup_s", "fit_s",
               "test_s", "peak_rss_gib", "best_val_acc"]  # fmt: skip
    print(
        f"\n{args.models[0]} {args.freeze[0]}, {args.epochs} epochs; sums over jobs "
        "(prefix_s and startup_s are inside fit_s; startup_s excludes the prefix pass)"
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    labels = list(dict.fromkeys(r["code"] for r in rows))
    if len(labels) == 2:
        this, other = labels
        print(f"\n| run | this s (median) | {other} s (median) | this / {other} |")
        print("|---|---|---|---|")
        for run in dict.fromkeys(r["run"] for r in rows):
            times = {c: statistics.median(r["wall_s"] for r in rows
                                          if r["run"] == run and r["code"] == c)
                     for c in labels}  # fmt: skip
            print(
                f"| {run} | {times[this]:.1f} | {times[other]:.1f} | "
                f"{times[this] / times[other]:.3f} |"
            )


def print_table(rows: list[dict[str, Any]]) -> None:
    """Markdown table of every row plus the speed ratio against the book mode."""
    columns = ["model", "freeze", "mode", "code", "epochs", "end_to_end_s", "fit_s", "test_s",
               "prefix_s", "train_examples_per_s", "eval_examples_per_s", "peak_rss_gib", "val_acc",
               "test_acc", "speedup"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


def print_comparison(rows: list[dict[str, Any]], label: str) -> None:
    """Median end-to-end time of this checkout against the compared one, per job."""
    print(f"\n| model | freeze | mode | this s (median) | {label} s (median) | this / {label} |")
    print("|---|---|---|---|---|---|")
    jobs = dict.fromkeys((r["model"], r["freeze"], r["mode"]) for r in rows)
    for model, freeze, mode in jobs:
        job = [r for r in rows if (r["model"], r["freeze"], r["mode"]) == (model, freeze, mode)]
        times = {c: [r["end_to_end_s"] for r in job if r["code"] == c] for c in ("this", label)}
        if not all(times.values()):
            continue
        this, other = statistics.median(times["this"]), statistics.median(times[label])
        print(f"| {model} | {freeze} | {mode} | {this:.1f} | {other:.1f} | {this / other:.3f} |")


DOCS = REPO / "docs" / "benchmarks.md"
END_MARK = "<!-- end of the generated training tables -->"


def machine_kind(accelerator: str) -> str:
    """This machine in words: the CPU model and cores, or the GPU."""
    if accelerator in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} (x{torch.cuda.device_count()})"
    from gpt_classifier.training.precision import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


def write_markdown(machine: str, workload: str, tables: str, command: str | None = None) -> None:
    """Put ``tables`` into docs/benchmarks.md as the section of ``machine`` and
    ``workload``, replacing the one measured there before."""
    start = f"<!-- {machine} | {workload} -->"
    command = command or documented_command(sys.argv[1:])
    section = (f"{start}\n### {workload}: {machine}\n\n```bash\n{command}\n```\n"
               f"{tables.strip()}\n<!-- end -->\n")  # fmt: skip
    text = DOCS.read_text()
    if start in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split("<!-- end -->\n", 1)[1]
    else:
        text = text.replace(END_MARK, section + "\n" + END_MARK)
    DOCS.write_text(text)
    print(f"written to {DOCS}", file=sys.stderr)


def documented_command(argv: list[str]) -> str:
    """This command as docs/benchmarks.md shows it: paths a reader has, no output options."""
    words, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word in ("--out", "--json", "--compare-label"):
            skip = True
            continue
        if word == "--markdown":
            continue
        previous = argv[i - 1] if i else ""
        if previous == "--compare-repo":
            word = "<worktree-of-the-compared-commit>"
        elif previous == "--data":
            word = Path(word).name
        words.append(word)
    return "python scripts/benchmark.py " + " ".join(words)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, workload: str,
           tables: Any) -> None:  # fmt: skip
    """Print what ``tables()`` prints; with --markdown also into docs/benchmarks.md, with
    --json the rows as JSON."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        tables()
    print(printed.getvalue())
    if args.markdown:
        write_markdown(machine_kind(args.accelerator), workload, printed.getvalue())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def in_turn(checkouts: list[tuple[Path, str]], repeat: int) -> list[tuple[Path, str]]:
    """The checkouts in the order of this repeat: reversed on every other one."""
    return checkouts if repeat % 2 == 0 else checkouts[::-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small"])
    parser.add_argument("--freeze", nargs="+", default=["last_block"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "mps", "auto"])
    parser.add_argument("--pretrained", action="store_true", help="load pretrained weights")
    parser.add_argument("--data", help="path of the SMS file or zip (data.path)")
    parser.add_argument("--out", type=Path, help="folder for the runs (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--compare-repo", type=Path, help="another checkout to time alongside")
    parser.add_argument("--compare-label", default="other", help="its name in the tables")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job (alternating)")
    parser.add_argument(
        "--sweep", type=int, metavar="N", help="instead: one job, it again, an N-job lr sweep"
    )
    parser.add_argument(
        "--data-scale", type=int, metavar="N", help="instead: data=files from 10k to N rows"
    )
    parser.add_argument("--markdown", action="store_true", help="also into docs/benchmarks.md")
    parser.add_argument("override", nargs="*", help="extra train.py overrides for every run")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        measure(args, args.out)
    else:  # the runs' checkpoints and caches: gigabytes a sweep, of no use once timed
        with tempfile.TemporaryDirectory(prefix="gpt-classifier-bench-") as folder:
            measure(args, Path(folder))


def measure(args: argparse.Namespace, out: Path) -> None:
    """Run what ``args`` ask for in ``out`` and print (and write) the tables."""
    kept = "" if args.out else " (removed at the end; --out keeps them)"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"runs in {out}{kept}")  # fmt: skip
    checkouts = [(REPO, "this")]
    if args.compare_repo:
        checkouts.append((args.compare_repo.resolve(), args.compare_label))
    if args.data_scale:
        from data_scale import TRAIN_ROWS, print_tables, scale_rows, train_row

        scale = scale_rows(args.data_scale, out)
        train = train_row(out, min(args.data_scale, TRAIN_ROWS))
        report([*scale, train], args, "data scale", lambda: print_tables(scale, train))
        return
    if args.sweep:
        sweep_rows = [
            row
            for repeat in range(args.repeats)
            for repo, label in in_turn(checkouts, repeat)
            for row in sweep_runs(args.sweep, args, out / f"r{repeat}", repo, label)
        ]
        workload = f"{args.sweep}-job sweep, {args.models[0]} {args.freeze[0]}"
        report(sweep_rows, args, workload, lambda: print_sweep_table(sweep_rows, args))
        return
    rows: list[dict[str, Any]] = []
    for model in args.models:
        for freeze in args.freeze:
            for repeat in range(args.repeats):
                for repo, label in in_turn(checkouts, repeat):
                    pair = [run_mode(mode, model, freeze, args, out, repo, label, repeat)
                            for mode in args.modes]  # fmt: skip
                    book = next((r for r in pair if r["mode"] == "book"), None)
                    for row in pair:
                        if book:
                            row["speedup"] = round(book["end_to_end_s"] / row["end_to_end_s"], 1)
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr)

    def tables() -> None:
        print_table(rows)
        if args.compare_repo:
            print_comparison(rows, args.compare_label)

    report(rows, args, f"one run, {args.epochs} epochs, {'/'.join(args.freeze)}", tables)


if __name__ == "__main__":
    main()
