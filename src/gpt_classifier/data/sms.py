"""The UCI SMS Spam Collection: get the file, parse it verbatim, balance and split it."""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_classifier.data.download import (
    ChecksumError,
    DownloadError,
    download,
    verify_file,
)
from gpt_classifier.files import atomic_path

log = logging.getLogger(__name__)

FILE_NAME = "SMSSpamCollection"
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
MIRROR_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"
FILE_SIZE = 477_907
FILE_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
DEFAULT_LABELS: dict[str, int] = {"ham": 0, "spam": 1}
UTF8_BOM = b"\xef\xbb\xbf"


class DataFormatError(ValueError):
    """The data file breaks the ``label<TAB>text`` format; the message names file and line."""


@dataclass(frozen=True)
class Message:
    """One labelled text, exactly as in the file."""

    label: str
    text: str


@dataclass(frozen=True)
class Splits:
    """Train, validation and test messages with integer labels, in split order."""

    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def items(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """(name, rows) for the three splits."""
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


# ----------------------------------------------------------------------------- getting the file


def ensure_sms_file(
    path: str | Path | None = None,
    data_dir: str | Path = "data/sms_spam_collection",
    urls: Sequence[str] = (UCI_URL, MIRROR_URL),
    size: int | None = FILE_SIZE,
    sha256: str | None = FILE_SHA256,
) -> Path:
    """Path of the raw tab-separated file, downloading and extracting it only if needed.

    ``path`` may name the raw file (used as it is) or a zip holding it (extracted
    into ``data_dir``). Without ``path``, a verified file in ``data_dir`` is used with
    no network access; otherwise the zip is downloaded from ``urls``.
    """
    data_dir = Path(data_dir)
    target = data_dir / FILE_NAME
    remedy = f"delete {target} and run again to download it afresh, or pass data.path=<file>"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.path={path} does not exist; pass the raw file or zip")
        if zipfile.is_zipfile(path):
            return _extract(path, target, size, sha256, remedy)
        _warn_if_not_release(path, size, sha256)
        return path
    if target.is_file():
        verify_file(target, size, sha256, remedy)
        return target
    zip_path = data_dir / "sms_spam_collection.zip"
    try:
        download(urls, zip_path)
    except DownloadError as err:
        raise DownloadError(
            f"{err}\nWith no network, put the UCI file at {target}, or pass "
            "data.path=<a copy of the file or of its zip>."
        ) from err
    try:
        return _extract(zip_path, target, size, sha256, remedy)
    finally:
        zip_path.unlink(missing_ok=True)


def _extract(
    zip_path: Path, target: Path, size: int | None, sha256: str | None, remedy: str
) -> Path:
    with zipfile.ZipFile(zip_path) as archive:
        members = [n for n in archive.namelist() if Path(n).name == FILE_NAME]
        if not members:
            raise DataFormatError(f"{zip_path} holds no file named {FILE_NAME}")
        with atomic_path(target) as tmp:
            tmp.write_bytes(archive.read(members[0]))
            verify_file(tmp, size, sha256, f"{zip_path} is not the UCI release; {remedy}")
    return target


def _warn_if_not_release(path: Path, size: int | None, sha256: str | None) -> None:
    try:
        verify_file(path, size, sha256, "")
    except ChecksumError:
        log.warning("%s is not the UCI release file; using it as your own data", path)


# ----------------------------------------------------------------------------- parsing


def parse_messages(path: str | Path, labels: Mapping[str, int] = DEFAULT_LABELS) -> list[Message]:
    """Every ``label<TAB>text`` line of the file, verbatim; bad input names file and line."""
    path = Path(path)
    raw = path.read_bytes()
    # What Windows editors write at the start of a UTF-8 file; not part of any label.
    raw = raw.removeprefix(UTF8_BOM)
    if not raw.strip():
        raise DataFormatError(f"{path} is empty; expected lines of 'label<TAB>text'")
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    messages: list[Message] = []
    for number, line_bytes in enumerate(lines, start=1):
        where = f"{path}, line {number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFormatError(
                f"{where}: bytes {line_bytes[err.start : err.end]!r} at column {err.start + 1} "
                "are not UTF-8; re-save the file as UTF-8."
            ) from err
        line = line.removesuffix("\r")
        if "\t" not in line:
            raise DataFormatError(f"{where}: no tab between label and text: {line[:60]!r}")
        label, text = line.split("\t", 1)
        if label not in labels:
            raise DataFormatError(
                f"{where}: unknown label {label!r}; expected one of {sorted(labels)} "
                "(set data.labels to map other labels)"
            )
        if not text.strip():
            raise DataFormatError(f"{where}: the text after label {label!r} is empty")
        messages.append(Message(label, text))
    return messages


def parse_messages_like_pandas(path: str | Path) -> list[Message]:
    """The file as the book reads it: ``pd.read_csv(sep="\\t", header=None)``.

    Default CSV quoting treats ``"`` as a quote character, so a message starting with
    one swallows the following lines up to the next quote, and the quotes vanish. The
    book's split depends on that; :func:`parse_messages` is the faithful reading.
    """
    text = Path(path).read_text(encoding="utf-8-sig")  # pandas skips a BOM too
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"')
    return [Message(row[0], row[1] if len(row) > 1 else "") for row in rows if row]


# ----------------------------------------------------------------------------- balance and split


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
    if not (train_frac > 0 and validation_frac >= 0 and train_frac + validation_frac < 1):
        raise ValueError(
            f"data.train_frac={train_frac} and data.validation_frac={validation_frac} must be "
            "positive and leave room for a test split (sum below 1)"
        )
    rows = list(messages)
    if balance:
        rows = _undersample(rows, seed)
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


def check_labels(messages: Sequence[Message], labels: Mapping[str, int], path: Path) -> None:
    """Fail when the messages carry fewer than two labels: there is nothing to learn,
    and a single-class run would report accuracy 1.0 after minutes of training."""
    counts: dict[str, int] = {}
    for message in messages:
        counts[message.label] = counts.get(message.label, 0) + 1
    if len(counts) < 2:
        (only,) = counts
        raise DataFormatError(
            f"{path}: all {counts[only]} messages are labelled {only!r}; a classifier needs "
            f"messages of at least two of the labels {sorted(labels)}. Add messages of the "
            "other labels, or point data.path at another file."
        )
    missing = sorted(set(labels) - set(counts))
    if missing:
        log.warning("%s: no message is labelled %s (data.labels has them); the classifier "
                    "will never predict them", path, missing)  # fmt: skip


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


def _undersample(rows: list[Message], seed: int) -> list[Message]:
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


def write_split_csv(rows: Sequence[tuple[str, int]], path: Path) -> None:
    """Write one split as ``Label,Text`` CSV (integer labels, split order)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Label", "Text"])
        writer.writerows((label, text) for text, label in rows)
