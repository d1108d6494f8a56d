"""Download a file once, completely or not at all, with a progress bar and a checksum."""

from __future__ import annotations

import hashlib
import http.client
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from gpt_classifier.files import atomic_path

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """No URL gave the complete file."""


class ChecksumError(ValueError):
    """A file's size or sha256 is not what was expected."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, size: int | None, sha256: str | None, remedy: str) -> None:
    """Raise :class:`ChecksumError`, naming ``path`` and ``remedy``, on a size or hash mismatch."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path} has {actual_size:,} bytes, expected {size:,}; {remedy}")
    if sha256 is not None and (actual := sha256_of(path)) != sha256.lower():
        raise ChecksumError(f"{path} has sha256 {actual}, expected {sha256}; {remedy}")


def download(urls: Sequence[str], dest: Path, timeout: float = 60.0) -> Path:
    """Fetch the first URL that works into ``dest``; a partial transfer never lands there."""
    errors: list[str] = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp:
                _fetch(url, tmp, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as err:
            errors.append(f"{url}: {err}")
            log.warning("Download from %s failed: %s", url, err)
            continue
        log.info("Downloaded %s to %s", url, dest)
        return dest
    raise DownloadError(
        f"could not download {dest.name} from any of {len(urls)} URL(s):\n  " + "\n  ".join(errors)
    )


def _fetch(url: str, tmp: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "gpt-classifier"})
    with urllib.request.urlopen(request, timeout=timeout) as response, tmp.open("wb") as out:
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(f"transfer interrupted after {received:,} of {total:,} bytes")
