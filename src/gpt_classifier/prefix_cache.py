"""The frozen-prefix cache: compute the frozen blocks' output once per message.

When the embeddings and the first ``depth`` blocks are frozen and run without
dropout, their output for a message is a pure function of its token ids. The cache
keeps it in host memory (so it works on every accelerator) and, optionally, on disk
so that the next job of a sweep skips the prefix altogether.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from gpt_classifier.backbone import GPT
from gpt_classifier.tokenizer import PAD_TOKEN_ID

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PrefixCache:
    """Hidden states after the first ``depth`` blocks, keyed by the token ids fed in."""

    def __init__(self, model: GPT, depth: int, dtype: torch.dtype = torch.float32) -> None:
        if depth < 1:
            raise ValueError("a prefix cache needs at least one frozen block")
        self.model = model
        self.depth = depth
        self.dtype = dtype
        self.entries: dict[bytes, torch.Tensor] = {}
        self.computed = 0  # sequences whose prefix this process ran

    @staticmethod
    def key(ids: torch.Tensor) -> bytes:
        """The cache key of one unpadded token sequence."""
        return ids.detach().to("cpu", torch.int64).numpy().tobytes()

    @property
    def nbytes(self) -> int:
        """Host memory held by the cached hidden states."""
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    @torch.no_grad()
    def _compute(self, seqs: Sequence[torch.Tensor], device: torch.device) -> None:
        """Run the frozen prefix on ``seqs`` and store each one's hidden states.

        Shorter sequences are padded on the right; causal attention keeps the padding
        from reaching their real positions, so each stored row is exact.
        """
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), PAD_TOKEN_ID, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
        hidden = self.model.run_blocks(self.model.embed(ids.to(device)), 0, self.depth)
        for seq, h in zip(seqs, hidden.to("cpu", self.dtype)):
            self.entries[self.key(seq)] = h[: len(seq)].clone()
        self.computed += len(seqs)

    def warm(
        self,
        seqs: Iterable[torch.Tensor],
        device: torch.device,
        batch_tokens: int | None = None,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> int:
        """Compute every missing sequence, longest first, in batches of about
        ``batch_tokens`` padded tokens, dense because neighbours in length order are
        nearly equally long. Returns how many sequences were computed."""
        if batch_tokens is None:
            # On a 2-core CPU, 512 ran the prefix at ~200 GFLOP/s and 2048 at ~170 (the
            # activations of smaller batches stay in cache); accelerators want big ones.
            batch_tokens = 512 if device.type == "cpu" else 16384
        missing: dict[bytes, torch.Tensor] = {}
        for seq in seqs:
            k = self.key(seq)
            if k not in self.entries:
                missing[k] = seq
        ordered = sorted(missing.values(), key=len, reverse=True)
        was_training = self.model.training
        self.model.eval()
        try:
            with context():
                start = 0
                while start < len(ordered):
                    count = max(1, batch_tokens // len(ordered[start]))
                    self._compute(ordered[start : start + count], device)
                    start += count
        finally:
            self.model.train(was_training)
        return len(missing)

    def lookup(self, input_ids: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
        """Cached hidden states for a padded batch: (B, T) ids -> (B, T, D).

        Row ``i`` is keyed by its first ``key_lengths[i]`` tokens; positions after them
        are zeros (causal attention never lets them reach an earlier position). Rows
        not yet cached are computed now.
        """
        b, t = input_ids.shape
        rows = [input_ids[i, : int(n)] for i, n in enumerate(key_lengths.tolist())]
        keys = [self.key(r) for r in rows]  # once per row: this runs on every step
        missing = [r for r, k in zip(rows, keys) if k not in self.entries]
        if missing:
            self._compute(missing, input_ids.device)
        out = torch.zeros(b, t, self.model.cfg.emb_dim, dtype=self.dtype)
        for i, k in enumerate(keys):
            hidden = self.entries[k]
            out[i, : len(hidden)] = hidden
        return out.to(input_ids.device, non_blocking=True)

    # ------------------------------------------------------------------ persistence

    def fingerprint(self, extra: str = "") -> str:
        """Hash of everything the cached values depend on besides the token ids."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"depth={self.depth};dtype={self.dtype};{extra}".encode())
        prefix_modules = [
            self.model.tok_emb,
            self.model.pos_emb,
            *self.model.trf_blocks[: self.depth],
        ]
        for module in prefix_modules:
            for name, p in module.named_parameters():
                digest.update(name.encode())
                digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def load(self, path: Path) -> int:
        """Add the entries stored at ``path``; returns how many were read."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            return 0
        try:
            stored = load_file(str(path))
        except (SafetensorError, OSError) as err:
            log.warning("Ignoring unreadable prefix cache %s (%s)", path, err)
            return 0
        tokens = stored["tokens"].split(stored["lengths"].tolist())
        hidden = stored["hidden"].to(self.dtype).split(stored["lengths"].tolist())
        for ids, h in zip(tokens, hidden):
            self.entries.setdefault(self.key(ids), h)
        return len(tokens)

    def save(self, path: Path) -> None:
        """Write every entry to ``path`` atomically (concurrent jobs never see half a file)."""
        from safetensors.torch import save_file

        if not self.entries:
            return
        keys = list(self.entries)
        tokens = [torch.frombuffer(bytearray(k), dtype=torch.int64) for k in keys]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(
            {
                "tokens": torch.cat(tokens),
                "lengths": torch.tensor([len(t) for t in tokens], dtype=torch.int64),
                "hidden": torch.cat([self.entries[k] for k in keys]),
            },
            str(tmp),
        )
        os.replace(tmp, path)
