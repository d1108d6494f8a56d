"""Files: writing them whole or not at all (the one atomic-write helper of the package),
and reading the text files users give, with errors that say what to do."""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write; it then replaces ``path``
    with ``os.replace``. Readers see the old file or the new one, a failed write leaves
    the old one intact, and concurrent writers never mix their bytes. The file gets the
    permissions of any new file (0666 less the user's umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        # Some writers (safetensors) create 0600 files: others on a shared machine must
        # be able to read what a colleague trained or exported.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A new folder beside ``path`` for the caller to fill; it then takes the place of
    ``path`` (and of all that was in it) whole. A failed write leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    old = tmp.with_name(f"{tmp.name}.old")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)  # a folder cannot replace a folder in one step
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, the bytes given on any OS) through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


UTF8_BOM = b"\xef\xbb\xbf"
ZIP_MAGIC = b"PK\x03\x04"


def user_file(path: str | Path, key: str) -> Path:
    """``path`` as given by ``key=path``, checked to be a file (not a folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{key}={path} is a folder; give the file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist")
    return path


def read_user_text(path: str | Path, key: str) -> str:
    """The UTF-8 text of a file given by ``key=path``, without the byte-order mark that
    Excel and Windows editors write; a folder, a zip or bytes that are not UTF-8 are
    errors naming the file and line."""
    path = user_file(path, key)
    raw = path.read_bytes()
    if raw.startswith(ZIP_MAGIC):
        raise ValueError(f"{key}={path} is a zip archive, not text; unzip it and give the "
                         "file (a spreadsheet, .xlsx or .ods, is one: save it as CSV)")  # fmt: skip
    raw = raw.removeprefix(UTF8_BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}, line {line}: bytes {raw[err.start : err.end]!r} are not UTF-8; re-save "
            "the file as UTF-8"
        ) from err


def first_bad_utf8(path: Path) -> tuple[int, bytes] | None:
    """The line and bytes of the first sequence in ``path`` that is not UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        try:  # at C speed; the line is looked for only on failure
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
            return None
        except UnicodeDecodeError:
            f.seek(0)
        for number, line in enumerate(f, start=1):  # no UTF-8 character spans a newline
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return number, line[err.start : err.end]
    return None
