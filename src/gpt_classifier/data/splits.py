"""Balancing and splitting labelled texts: the book's 70/10/20 split, its size checks,
and the split files each run keeps."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_classifier.data.sms import DEFAULT_LABELS, DataFormatError, Message
from gpt_classifier.data.tables import SHOWN
from gpt_classifier.files import atomic_path


@dataclass(frozen=True)
class Splits:
    """Train, validation and test messages with integer labels, in split order."""

    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def items(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """(name, rows) for the three splits."""
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


def balance_and_split(
    messages: Sequence[Message],
    labels: Mapping[str, int] = DEFAULT_LABELS,
    seed: int = 123,
    balance: bool = True,
    train_frac: float = 0.7,
    validation_frac: float = 0.1,
) -> Splits:
    """The book's procedure: undersample the majority label, shuffle, split 70/10/20.

    Uses numpy's ``RandomState(seed)`` exactly as ``DataFrame.sample`` does, so the
    same messages give the book's split.
    """
    rows = list(messages)
    if balance:
        rows = undersample(rows, seed)
    order = np.random.RandomState(seed).choice(len(rows), size=len(rows), replace=False)
    shuffled = [(rows[i].text, labels[rows[i].label]) for i in order]
    sizes = split_sizes(len(shuffled), train_frac, validation_frac)
    train_end = sizes["train"]
    validation_end = train_end + sizes["validation"]
    return Splits(
        train=shuffled[:train_end],
        validation=shuffled[train_end:validation_end],
        test=shuffled[validation_end:],
    )


def stratified_split(
    rows: Sequence[Message], labels: Mapping[str, int], fractions: Mapping[str, float],
    seed: int, source: str,
) -> dict[str, list[tuple[str, int]]]:  # fmt: skip
    """``rows`` divided into the named splits by ``fractions`` (normalised) within each
    label, so that every split keeps the labels' proportions; each split shuffled.

    ``train`` takes what the others' shares leave. A label too rare to give every split
    one row is an error naming it, its count and how many it would need.
    """
    total = sum(fractions.values())
    shares = {name: fraction / total for name, fraction in fractions.items()}
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row.text)
    ordered = sorted(by_label, key=labels.__getitem__)

    def cuts_for(count: int) -> dict[str, int]:
        return {name: int(count * share) for name, share in shares.items() if name != "train"}

    def too_few(count: int) -> bool:  # for a row in every split, train included
        return 0 in cuts_for(count).values() or count - sum(cuts_for(count).values()) < 1

    rare = [label for label in ordered if too_few(len(by_label[label]))]
    if rare:
        need = max(int(np.ceil(1 / share)) for share in shares.values())
        named = ", ".join(f"{label!r} ({len(by_label[label])})" for label in rare[:SHOWN])
        many = len(by_label) > 100
        numbers = (f"; with {len(by_label)} distinct labels, are they numbers to predict? "
                   "A classifier learns one class per label" if many else "")  # fmt: skip
        raise DataFormatError(
            f"{source}: {len(rare)} of {len(by_label)} label(s) have too few rows to split "
            f"stratified into {'/'.join(shares)}, which needs at least {need} each: {named}"
            f"{', ...' if len(rare) > SHOWN else ''}; add rows, leave them out "
            f"(data.labels=[...]), or give the splits as files{numbers}"
        )
    random = np.random.RandomState(seed)
    out: dict[str, list[tuple[str, int]]] = {name: [] for name in shares}
    for label in ordered:
        texts = by_label[label]
        cuts = cuts_for(len(texts))
        order = random.permutation(len(texts))
        start = 0
        for name in shares:
            size = cuts.get(name, len(texts) - sum(cuts.values()))
            out[name].extend((texts[i], labels[label]) for i in order[start : start + size])
            start += size
    for name, split in out.items():
        out[name] = [split[i] for i in random.permutation(len(split))]
    return out


def minimum_messages(
    train_frac: float, validation_frac: float, needs: Mapping[str, int]
) -> int | None:
    """The fewest messages (after balancing) whose split gives each split its minimum;
    None when a fraction of 0 can never give a split its minimum."""
    fractions = {"train": train_frac, "validation": validation_frac,
                 "test": 1 - train_frac - validation_frac}  # fmt: skip
    if any(needs[name] > 0 and fractions[name] <= 0 for name in needs):
        return None
    n = 1
    while True:  # ends: every needed split has a positive fraction
        sizes = split_sizes(n, train_frac, validation_frac)
        if all(sizes[name] >= needs[name] for name in needs):
            return n
        n += 1


def split_sizes(n: int, train_frac: float, validation_frac: float) -> dict[str, int]:
    """How :func:`balance_and_split` divides ``n`` messages."""
    train = int(n * train_frac)
    validation = int(n * validation_frac)
    return {"train": train, "validation": validation, "test": n - train - validation}


def check_split_sizes(
    splits: Splits, needs: Mapping[str, int], path: Path, train_frac: float,
    validation_frac: float, balanced: bool, processes: int = 1,
) -> None:  # fmt: skip
    """Fail before training when a split has fewer messages than it needs, naming each
    (``processes``: how many data-parallel processes share each split)."""
    sizes = {name: len(rows) for name, rows in splits.items()}
    short = [name for name in needs if sizes[name] < needs[name]]
    if not short:
        return
    total = sum(sizes.values())
    have = " / ".join(f"{name} {sizes[name]}" for name in sizes)
    want = ", ".join(f"{name} {needs[name]}" for name in needs)
    problems = [f"the {name} split would be empty" if sizes[name] == 0
                else f"{name} has fewer than {needs[name]}" for name in short]  # fmt: skip
    raise DataFormatError(
        f"{path}: {total} messages{' after balancing the labels' if balanced else ''} split "
        f"into {have}: {', '.join(problems)}. "
        + f"Training needs at least {want} ("
        + (
            "train: data.batch_size with data.drop_last), "
            if processes == 1
            else f"train: data.batch_size x {processes} processes (trainer.devices x "
            "trainer.num_nodes) with data.drop_last; validation and test: one message per "
            "process), "
        )
        + (
            f"that is at least {least} messages{' after balancing' if balanced else ''} with "
            if (least := minimum_messages(train_frac, validation_frac, needs)) is not None
            else "which no file gives with "
        )
        + f"data.train_frac={train_frac} and data.validation_frac={validation_frac}."
    )


def undersample(rows: list[Message], seed: int) -> list[Message]:
    """Each label undersampled to the rarest one's count, rarest label last.

    With two labels this is the book's ``ham.sample(n_spam)`` followed by all spam.
    """
    by_label: dict[str, list[Message]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    minority = min(by_label, key=lambda k: len(by_label[k]))
    n = len(by_label[minority])
    out: list[Message] = []
    for label, group in by_label.items():
        if label == minority:
            continue
        picked = np.random.RandomState(seed).choice(len(group), size=n, replace=False)
        out.extend(group[i] for i in picked)
    return out + by_label[minority]


def write_split_csv(rows: Sequence[tuple[str, int]], path: Path, source: str) -> None:
    """Write one split as ``Label,Text`` CSV (integer labels, split order), once: a later
    start of the run (a resume, ``eval.py``) must make the same split from ``source``."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["Label", "Text"])
    writer.writerows((label, text) for text, label in rows)
    data = table.getvalue().encode("utf-8")
    if path.is_file():
        kept = path.read_bytes()
        if kept == data:
            return
        line = next((i for i, (a, b) in enumerate(zip(kept.splitlines(), data.splitlines()), 1)
                     if a != b), min(kept.count(b"\n"), data.count(b"\n")) + 1)  # fmt: skip
        raise DataFormatError(
            f"The data ({source}) has changed since the run started: it splits differently from "
            f"{path} (line {line}). Restore the data, or train on it in a new run (without "
            f"ckpt_path); eval.py labelled_file={path} evaluates the split the run made."
        )
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
