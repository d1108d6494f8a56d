"""Write a synthetic labelled text dataset: SMS-length texts, any number of classes.

Each class has words of its own, mixed into words all classes share, so a classifier
can learn it but not trivially. For trying ``data=files`` at scale::

    python scripts/make_text_dataset.py --rows 1000000 --classes 5 --out texts.csv
    python train.py data=files data.path=texts.csv model=gpt2-tiny trainer.max_epochs=1

The format follows the suffix of ``--out`` (.csv, .tsv, .jsonl or .parquet); the
columns are ``text`` and ``label`` (``class_0`` ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi",
             "ja", "pe", "qu", "wa", "xe", "yo", "zu"]  # fmt: skip


def vocabulary(size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` distinct made-up words of two to four syllables."""
    words: set[str] = set()
    while len(words) < size:
        count = int(rng.integers(2, 5))
        words.add("".join(rng.choice(SYLLABLES, count)))
    return np.array(sorted(words))


def make_rows(rows: int, classes: int, seed: int = 0,
              class_share: float = 0.25) -> tuple[list[str], list[str]]:  # fmt: skip
    """``rows`` texts of 2 to 14 words (about 25 GPT-2 tokens, as SMS messages), a
    ``class_share`` of their words their class's own, and their labels (classes about
    equally frequent)."""
    if rows < 1 or classes < 2:
        raise ValueError("give --rows 1 or more and --classes 2 or more")
    rng = np.random.default_rng(seed)
    shared = vocabulary(2000, rng)
    own = vocabulary(50 * classes, rng).reshape(classes, 50)
    labels = rng.integers(0, classes, rows)
    lengths = rng.integers(2, 15, rows)
    total = int(lengths.sum())
    from_class = rng.random(total) < class_share
    words = shared[rng.integers(0, len(shared), total)]
    owner = np.repeat(labels, lengths)
    words[from_class] = own[owner[from_class], rng.integers(0, 50, int(from_class.sum()))]
    ends = np.cumsum(lengths)
    texts = [" ".join(words[end - n : end]) for end, n in zip(ends.tolist(), lengths.tolist())]
    return texts, [f"class_{k}" for k in labels.tolist()]


def write(path: Path, texts: list[str], labels: list[str]) -> None:
    """The rows in ``path``'s format (its suffix), via 🤗 datasets (the ``data`` extra)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()

    table = Dataset.from_dict({"text": texts, "label": labels})
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".csv", ".tsv"):
        table.to_csv(str(path), index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        table.to_json(str(path), lines=True, force_ascii=False)
    elif suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        raise SystemExit(f"--out {path}: the suffix must be .csv, .tsv, .jsonl or .parquet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--out", type=Path, default=Path("texts.csv"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        texts, labels = make_rows(args.rows, args.classes, args.seed)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    write(args.out, texts, labels)
    print(f"{args.out}: {args.rows:,} rows, {args.classes} classes", file=sys.stderr)


if __name__ == "__main__":
    main()
