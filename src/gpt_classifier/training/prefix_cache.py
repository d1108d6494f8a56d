"""The frozen-prefix cache: run the frozen embeddings and leading blocks once per message.

When the embeddings and the first ``depth`` blocks are frozen and run without
dropout, their output for a message is a pure function of its token ids. The
:class:`PrefixCache` keeps it in host memory (so it works on every accelerator) and,
optionally, in a file named by a fingerprint of the frozen weights, so that later runs
skip the prefix altogether. :mod:`~gpt_classifier.training.prefix_callback` runs it in a
Lightning run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from gpt_classifier.data.tokenizer import PAD_TOKEN_ID
from gpt_classifier.files import atomic_path
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.pooling import positions_read

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FILE_FORMAT = 4  # tokens, lengths, extents, hidden; fingerprint and checksum in the metadata


class PrefixCache:
    """Hidden states after the first ``depth`` blocks, one entry per distinct key.

    :meth:`row_keys` is the one key function, used by :meth:`warm` and :meth:`lookup`
    alike: a row's pooled output depends on its first ``n`` positions (pooling and
    causal attention say which), so the entry holds those ``n`` hidden states and is
    keyed by the real tokens among them. Positions past the real tokens are padding,
    whose hidden states depend only on how far past they are, so one entry serves
    every amount of padding up to its extent.
    """

    def __init__(
        self,
        model: SequenceClassifier,
        depth: int,
        dtype: torch.dtype = torch.float32,
        pad_id: int = PAD_TOKEN_ID,
    ) -> None:
        if depth < 1:
            raise ValueError("a prefix cache needs at least one frozen block")
        self.model = model
        self.depth = depth
        self.dtype = dtype
        self.pad_id = pad_id
        self.entries: dict[bytes, torch.Tensor] = {}  # key -> (extent, D)
        self.computed = 0  # rows whose prefix this process ran

    def row_keys(
        self, input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[list[bytes], list[int]]:
        """Each row's cache key and how many leading positions it needs (host tensors)."""
        width = input_ids.shape[1]
        causal = self.model.cfg.causal_mask
        needed = positions_read(self.model.pool(lengths, width), width, causal).tolist()
        ids = input_ids.to(torch.int64).numpy()
        # Without the causal mask, real tokens attend to the padding: it is part of the key.
        reals = lengths.tolist() if causal else needed
        keys = [ids[i, : min(n, real)].tobytes() for i, (n, real) in enumerate(zip(needed, reals))]
        return keys, needed

    @property
    def nbytes(self) -> int:
        """Host memory held by the cached hidden states."""
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def bytes_for(self, todo: dict[bytes, torch.Tensor]) -> int:
        """Host memory that computing ``todo`` (a :meth:`plan`) would add."""
        size = torch.empty((), dtype=self.dtype).element_size() * self.model.cfg.emb_dim
        return size * sum(len(row) - len(self.entries.get(key, ())) for key, row in todo.items())

    def _missing(
        self, input_ids: torch.Tensor, keys: Sequence[bytes], needed: Sequence[int]
    ) -> dict[bytes, torch.Tensor]:
        """Rows to compute, by key: absent, or stored with fewer positions than needed."""
        todo: dict[bytes, torch.Tensor] = {}
        for row, (key, n) in enumerate(zip(keys, needed)):
            have = self.entries.get(key)
            if (have is None or len(have) < n) and (key not in todo or len(todo[key]) < n):
                todo[key] = input_ids[row, :n]
        return todo

    @torch.no_grad()
    def _compute(self, todo: dict[bytes, torch.Tensor], device: torch.device) -> None:
        """Run the frozen prefix on the rows in ``todo`` and store them.

        Rows are padded on the right to the longest; causal attention keeps that
        padding from reaching their own positions, so each stored row is exact.
        Without the causal mask it would reach them: rows run in groups of one length.
        """
        groups = [todo]
        if not self.model.cfg.causal_mask:
            by_length: dict[int, dict[bytes, torch.Tensor]] = {}
            for key, seq in todo.items():
                by_length.setdefault(len(seq), {})[key] = seq
            groups = list(by_length.values())
        for group in groups:
            seqs = list(group.values())
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = seq
            hidden = self.model(ids.to(device), hidden_after=self.depth).to("cpu", self.dtype)
            for key, seq, h in zip(group, seqs, hidden):
                self.entries[key] = h[: len(seq)].clone()
            self.computed += len(seqs)

    def plan(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[dict[bytes, torch.Tensor], int]:
        """The rows of ``batches`` (host ``input_ids``, ``lengths``) still to compute, by
        key, each as long as the longest use of its key needs; and how many distinct
        keys the batches hold."""
        todo: dict[bytes, torch.Tensor] = {}
        asked: set[bytes] = set()
        for input_ids, lengths in batches:
            keys, needed = self.row_keys(input_ids, lengths)
            asked.update(keys)
            for key, row in self._missing(input_ids, keys, needed).items():
                if key not in todo or len(todo[key]) < len(row):
                    todo[key] = row
        return todo, len(asked)

    def warm(
        self,
        todo: dict[bytes, torch.Tensor],
        device: torch.device,
        batch_tokens: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Compute the rows of a :meth:`plan`, longest first, in dense batches of about
        ``batch_tokens`` tokens; ``progress(rows, tokens)`` is called after each batch."""
        # Neighbours in length order are nearly equally long: little padding.
        ordered = sorted(todo.items(), key=lambda kv: len(kv[1]), reverse=True)
        was_training = self.model.training
        self.model.eval()
        try:
            start = 0
            while start < len(ordered):
                count = max(1, batch_tokens // len(ordered[start][1]))
                chunk = dict(ordered[start : start + count])
                self._compute(chunk, device)
                if progress is not None:
                    progress(len(chunk), sum(len(s) for s in chunk.values()))
                start += count
        finally:
            self.model.train(was_training)

    def lookup(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Cached hidden states for a padded batch: (B, T) ids -> (B, T, D) on the host.

        Positions a row does not need are zeros (causal attention never lets them
        reach a position that is read). Rows not yet cached are computed now.
        """
        b, t = input_ids.shape
        keys, needed = self.row_keys(input_ids, lengths)
        todo = self._missing(input_ids, keys, needed)
        if todo:
            was_training = self.model.training
            self.model.eval()
            try:
                self._compute(todo, self.model.backbone.tok_emb.weight.device)
            finally:
                self.model.train(was_training)
        out = torch.zeros(b, t, self.model.cfg.emb_dim, dtype=self.dtype)
        for row, (key, n) in enumerate(zip(keys, needed)):
            out[row, :n] = self.entries[key][:n]
        return out

    # ------------------------------------------------------------------ persistence

    def fingerprint(self, extra: str = "") -> str:
        """Hash of everything the cached values depend on besides the token ids."""
        digest = hashlib.sha256(
            f"format={FILE_FORMAT};depth={self.depth};dtype={self.dtype};pad={self.pad_id};"
            f"causal={self.model.cfg.causal_mask};{extra}".encode()
        )
        for name, p in self.prefix_parameters():
            digest.update(name.encode())
            data = p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(memoryview(data))  # the tensor's memory in place, not a copy
        return digest.hexdigest()

    def prefix_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters the cached values are computed from, by name."""
        gpt = self.model.backbone
        modules = {"tok_emb": gpt.tok_emb, "pos_emb": gpt.pos_emb}
        modules.update({f"trf_blocks.{i}": gpt.trf_blocks[i] for i in range(self.depth)})
        return [(f"{prefix}.{name}", p) for prefix, module in modules.items()
                for name, p in module.named_parameters()]  # fmt: skip

    def load(self, path: Path, fingerprint: str, wanted: set[bytes] | None = None) -> int:
        """Add the entries stored at ``path`` (those with a ``wanted`` key, if given) if it
        holds ``fingerprint``'s values; returns how many were read. A damaged or foreign
        file is ignored (logged), never trusted."""
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            return 0
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                stored_for = metadata.get("fingerprint")
                if stored_for != fingerprint:
                    raise ValueError(f"it holds fingerprint {stored_for!r}, not {fingerprint!r}")
                stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            if checksum(stored) != metadata.get("sha256"):
                raise ValueError("its contents do not match their checksum (damaged)")
            tokens = stored["tokens"].split(stored["lengths"].tolist())
            extents = stored["extents"].tolist()
            hidden = stored["hidden"]
            if hidden.ndim != 2 or hidden.shape[1] != self.model.cfg.emb_dim:
                raise ValueError(f"hidden states of shape {tuple(hidden.shape)}")
            if len(extents) != len(tokens) or sum(extents) != len(hidden):
                raise ValueError("its index does not match its hidden states")
            parts = hidden.to(self.dtype).split(extents)
        except (SafetensorError, OSError, KeyError, RuntimeError, ValueError) as err:
            log.warning("Ignoring prefix cache file %s (%s); recomputing", path, err)
            return 0
        read = 0
        for ids, h in zip(tokens, parts):
            key = ids.numpy().tobytes()
            if wanted is not None and key not in wanted:
                continue
            if key not in self.entries or len(self.entries[key]) < len(h):
                # A copy: a view would keep the file's whole tensor in memory.
                self.entries[key] = h.clone() if wanted is not None else h
            read += 1
        return read

    def save(self, path: Path, fingerprint: str) -> None:
        """Merge the entries into the file at ``path`` under a lock and replace it
        atomically: concurrent jobs never see half a file, and none loses another's rows."""
        from filelock import FileLock
        from safetensors.torch import save_file

        if not self.entries:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        own = self.entries
        with FileLock(str(path.with_name(path.name + ".lock"))):
            # What other jobs added since this one read it goes into the file, not into
            # this run's memory.
            self.entries = dict(own)
            try:
                self.load(path, fingerprint)
                keys = list(self.entries)
                tensors = _as_tensors(self.entries, keys)
            finally:
                self.entries = own
            metadata = {"fingerprint": fingerprint, "format": str(FILE_FORMAT),
                        "sha256": checksum(tensors)}  # fmt: skip
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)


def _as_tensors(entries: dict[bytes, torch.Tensor], keys: list[bytes]) -> dict[str, torch.Tensor]:
    """The entries as the file's four tensors."""
    tokens = [torch.frombuffer(bytearray(k), dtype=torch.int64) for k in keys]
    return {
        "tokens": torch.cat(tokens),
        "lengths": torch.tensor([len(t) for t in tokens], dtype=torch.int64),
        "extents": torch.tensor([len(entries[k]) for k in keys], dtype=torch.int64),
        "hidden": torch.cat([entries[k] for k in keys]),
    }


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes, by name: what a cache file stores of its contents."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
