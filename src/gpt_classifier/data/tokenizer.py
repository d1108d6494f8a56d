"""GPT-2's byte-pair tokenizer (tiktoken's ``gpt2`` encoding)."""

from __future__ import annotations

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
