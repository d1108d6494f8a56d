"""The UCI SMS Spam Collection: get the file, parse it verbatim, balance and split it."""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt_classifier.data.download import (
    ChecksumError,
    DownloadError,
    download,
    verify_file,
)
from gpt_classifier.files import UTF8_BOM, ZIP_MAGIC, atomic_path, user_file

log = logging.getLogger(__name__)

FILE_NAME = "SMSSpamCollection"
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
MIRROR_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"
FILE_SIZE = 477_907
FILE_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
DEFAULT_LABELS: dict[str, int] = {"ham": 0, "spam": 1}


class DataFormatError(ValueError):
    """The data file breaks the ``label<TAB>text`` format; the message names file and line."""


@dataclass(frozen=True)
class Message:
    """One labelled text, exactly as in the file."""

    label: str
    text: str


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
        path = user_file(path, "data.path")
        if zipfile.is_zipfile(path):
            return _extract(path, target, size, sha256, remedy)
        with path.open("rb") as f:
            if f.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
                raise DataFormatError(
                    f"data.path={path} starts like a zip archive but cannot be read as one "
                    "(truncated or damaged): download it again, or pass the extracted "
                    f"{FILE_NAME} file."
                )
        with path.open("rb") as f:
            tabbed = b"\t" in f.readline(65536)
        if path.suffix.lower() in (".csv", ".json", ".jsonl", ".parquet") and not tabbed:
            raise DataFormatError(
                f"data.path={path} is a {path.suffix} table, and the SMS data (data=sms_spam, "
                "the default) reads UCI's label<TAB>text lines: for a table of your own, add "
                "data=files (with data.text_column= and data.label_column= if they are not "
                "text and label)"
            )
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


def parse_messages(path: str | Path, labels: Mapping[str, int] | None = DEFAULT_LABELS
                   ) -> list[Message]:  # fmt: skip
    """Every ``label<TAB>text`` line of the file, verbatim (one message a line; ``labels``
    None: any label); bad input names file and line."""
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
        if labels is not None and label not in labels:
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
