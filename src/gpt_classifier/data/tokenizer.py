"""GPT-2's byte-pair tokenizer (tiktoken's ``gpt2`` encoding)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken

PAD_TOKEN_ID = 50256  # <|endoftext|>, GPT-2's only special token, used for padding
_ENDOFTEXT = "<|endoftext|>"


def get_tokenizer(folder: str | Path | None = None) -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding; from a folder's own BPE files when it has them.

    OpenAI's checkpoint folders ship ``encoder.json`` and ``vocab.bpe``: reading those
    needs no download. Otherwise tiktoken downloads the same files once into its cache
    (``TIKTOKEN_CACHE_DIR`` points it at a local copy for offline use).
    """
    if folder is not None:
        folder = Path(folder)
        vocab_bpe, encoder_json = folder / "vocab.bpe", folder / "encoder.json"
        if vocab_bpe.is_file() and encoder_json.is_file():
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
            from tiktoken_ext.openai_public import r50k_pat_str

            ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
            return tiktoken.Encoding(
                name="gpt2",
                pat_str=r50k_pat_str,
                mergeable_ranks=ranks,
                special_tokens={_ENDOFTEXT: len(ranks)},
            )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # tiktoken raises requests' errors when offline
        raise RuntimeError(
            "could not load tiktoken's 'gpt2' encoding, which is downloaded on first use "
            f"({type(err).__name__}: {err}). Offline, set TIKTOKEN_CACHE_DIR to a folder "
            "holding its cached files, or pass an OpenAI checkpoint folder with encoder.json "
            "and vocab.bpe."
        ) from err


def encode_texts(tokenizer: tiktoken.Encoding, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids (no special tokens), on every core the process may use.

    One thread per core, each encoding a contiguous share (tiktoken releases the GIL while
    it encodes): ``encode_ordinary_batch`` submits a task per text instead, which costs
    more than encoding an SMS-length text.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, min(cores or 1, len(texts) // 1000))
    if threads == 1:
        return [tokenizer.encode_ordinary(text) for text in texts]
    size = -(-len(texts) // threads)
    shares = [texts[i : i + size] for i in range(0, len(texts), size)]
    with ThreadPoolExecutor(threads) as pool:
        encoded = pool.map(lambda share: [tokenizer.encode_ordinary(t) for t in share], shares)
        return [ids for share in encoded for ids in share]


# Where tiktoken gets GPT-2's BPE files (tiktoken_ext.openai_public.gpt2), with its hashes.
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def gpt2_bpe_files() -> tuple[bytes, bytes]:
    """GPT-2's ``encoder.json`` and ``vocab.bpe`` (transformers' ``vocab.json`` and
    ``merges.txt``), from tiktoken's cache or downloaded once into it."""
    from tiktoken.load import read_file_cached

    try:
        return (
            read_file_cached(BPE_URL + "encoder.json", _ENCODER_JSON_SHA256),
            read_file_cached(BPE_URL + "vocab.bpe", _VOCAB_BPE_SHA256),
        )
    except Exception as err:  # tiktoken raises requests' errors when offline
        raise RuntimeError(
            f"could not read GPT-2's BPE files ({type(err).__name__}: {err}). Offline, set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files."
        ) from err
