"""What is on this machine already, and which download hosts answer: asked all at once,
so that offline the pre-flight takes seconds."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from gpt_classifier.data.tokenizer import BPE_URL

# One connection attempt per host, all at once: offline, the answer comes in this long.
REACH_TIMEOUT_S = 2.0


def hub_cached(repo: str) -> bool:
    """Whether the Hugging Face cache holds ``repo``'s config and weights."""
    from huggingface_hub import try_to_load_from_cache

    has = {name for name in ("config.json", "model.safetensors", "pytorch_model.bin")
           if isinstance(try_to_load_from_cache(repo, name), str)}  # fmt: skip
    return "config.json" in has and len(has) > 1


def tiktoken_cached() -> bool:
    """Whether tiktoken's cache holds GPT-2's two BPE files."""
    # tiktoken keeps each downloaded file under the SHA-1 of its URL (tiktoken.load).
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"
    files = ("vocab.bpe", "encoder.json")
    return all((folder / hashlib.sha1((BPE_URL + f).encode()).hexdigest()).is_file() for f in files)


def hub_dataset_cached(name: str) -> bool:
    """Whether the datasets cache or the Hub's holds the 🤗 dataset ``name`` (True where
    🤗 datasets is not installed: the pre-flight names that instead)."""
    try:
        from datasets import config
        from datasets.naming import camelcase_to_snakecase
    except ImportError:
        return True
    from huggingface_hub import constants

    # Where load_dataset keeps what it built, and where the Hub's client keeps the files.
    *namespace, dataset = name.split("/")
    built = Path(config.HF_DATASETS_CACHE) / "___".join(
        [*namespace, camelcase_to_snakecase(dataset)]
    )
    return (
        built.is_dir()
        or (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").is_dir()
    )


_REACHED: dict[str, bool] = {}


def probe(urls: list[str]) -> None:
    """Try every host at once, each once, so that offline the pre-flight takes seconds."""
    hosts = {urlparse(url).hostname or "" for url in urls} - set(_REACHED)
    if hub_offline():
        _REACHED["huggingface.co"] = False
        hosts.discard("huggingface.co")

    def connects(host: str) -> bool:
        try:
            with socket.create_connection((host, 443), timeout=REACH_TIMEOUT_S):
                return True
        except OSError:
            return False

    pool = ThreadPoolExecutor(max(1, len(hosts)))
    futures = {host: pool.submit(connects, host) for host in hosts}
    for host, future in futures.items():
        try:  # getaddrinfo has no timeout of its own: bound the whole attempt
            _REACHED[host] = future.result(timeout=REACH_TIMEOUT_S + 0.5)
        except TimeoutError:
            _REACHED[host] = False
    pool.shutdown(wait=False)


def reachable(url: str) -> bool:
    """Whether ``url``'s host answered (asked once per process)."""
    host = urlparse(url).hostname or ""
    if host not in _REACHED:
        probe([url])
    return _REACHED[host]


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE``, read as the Hub's client reads it."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE
