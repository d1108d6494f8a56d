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
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gpt_classifier.data.tokenizer import PAD_TOKEN_ID
from gpt_classifier.model.classifier import SequenceClassifier
from gpt_classifier.model.pooling import positions_read

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FILE_FORMAT = 5  # the index and hidden.<n>; fingerprint and checksum in the metadata


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
        # key -> (extent, D), a view of the block of host memory its pass filled
        self.entries: dict[bytes, torch.Tensor] = {}
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

    def bytes_for(self, todo: dict[bytes, int]) -> int:
        """Host memory that computing ``todo`` (a :meth:`plan`) would add."""
        size = torch.empty((), dtype=self.dtype).element_size() * self.model.cfg.emb_dim
        return size * sum(todo.values())

    def missing(self, keys: Sequence[bytes], needed: Sequence[int]) -> dict[bytes, int]:
        """Rows to compute, as key -> positions: absent, or stored with fewer."""
        todo: dict[bytes, int] = {}
        for key, n in zip(keys, needed):
            have = self.entries.get(key)
            if (have is None or len(have) < n) and todo.get(key, 0) < n:
                todo[key] = n
        return todo

    def plan(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[dict[bytes, int], int]:
        """The rows of ``batches`` (host ``input_ids``, ``lengths``) still to compute, as key
        -> the most positions any use of the key needs; and how many distinct keys the
        batches hold."""
        todo: dict[bytes, int] = {}
        asked: set[bytes] = set()
        for input_ids, lengths in batches:
            keys, needed = self.row_keys(input_ids, lengths)
            asked.update(keys)
            for key, n in self.missing(keys, needed).items():
                todo[key] = max(n, todo.get(key, 0))
        return todo, len(asked)

    @torch.no_grad()
    def warm(
        self,
        todo: dict[bytes, int],
        device: torch.device,
        batch_tokens: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Compute the rows of a :meth:`plan`, longest first, in dense batches of about
        ``batch_tokens`` tokens; ``progress(rows, tokens)`` is called after each batch.

        The rows go into one new block of host memory that the entries view: a file is
        written from the blocks as they are, without a copy. A row's ids are its key's
        real tokens, then padding; causal attention keeps the padding from reaching the
        real positions, so each stored row is exact. Without the causal mask it would
        reach them, so batches then hold rows of one length (their keys hold every id).
        """
        # Neighbours in length order are nearly equally long: little padding.
        ordered = sorted(todo.items(), key=lambda kv: kv[1], reverse=True)
        block = torch.empty(sum(todo.values()), self.model.cfg.emb_dim, dtype=self.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            start = row = 0
            while start < len(ordered):
                width = ordered[start][1]
                chunk = ordered[start : start + max(1, batch_tokens // width)]
                if not self.model.cfg.causal_mask:
                    chunk = [kv for kv in chunk if kv[1] == width]
                # Row-major masks: the keys' tokens in, the rows' positions out, in order.
                ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
                counts = np.array([len(key) // 8 for key, _ in chunk])
                ids[np.arange(width) < counts[:, None]] = np.frombuffer(
                    b"".join(key for key, _ in chunk), dtype=np.int64)  # fmt: skip
                hidden = self.model(torch.from_numpy(ids).to(device), hidden_after=self.depth)
                needed = torch.tensor([n for _, n in chunk], device=hidden.device)
                rows = hidden[torch.arange(width, device=hidden.device) < needed[:, None]]
                block[row : row + len(rows)] = rows.to("cpu", self.dtype)
                for key, n in chunk:
                    self.entries[key] = block[row : row + n]
                    row += n
                self.computed += len(chunk)
                if progress is not None:
                    progress(len(chunk), sum(n for _, n in chunk))
                start += len(chunk)
        finally:
            self.model.train(was_training)

    def lookup(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Cached hidden states for a padded batch: (B, T) ids -> (B, T, D) on the host.

        Positions a row does not need are zeros (causal attention never lets them
        reach a position that is read). Rows not yet cached are computed now.
        """
        b, t = input_ids.shape
        keys, needed = self.row_keys(input_ids, lengths)
        if todo := self.missing(keys, needed):
            device = self.model.backbone.tok_emb.weight.device
            self.warm(todo, device, batch_tokens=sum(todo.values()))
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


def _collated(loader: DataLoader, size: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example of a loader's dataset, collated ``size`` at a time (ids, lengths),
    without iterating the loader: that would draw from the random generators and
    change the training order."""
    dataset = loader.dataset
    for start in range(0, len(dataset), size):  # type: ignore[arg-type]
        end = min(start + size, len(dataset))  # type: ignore[arg-type]
        batch = loader.collate_fn([dataset[i] for i in range(start, end)])
        yield batch["input_ids"], batch["lengths"]


def widest_batch(loader: DataLoader) -> int:
    """The widest any of a loader's batches can be."""
    return max((ids.shape[1] for ids, _ in _collated(loader)), default=0)


def loader_batches(loader: DataLoader, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_collated`, each padded to :func:`widest_batch`: where pooling reads padding, a
    message needs the positions of the widest batch it can be in."""
    width = widest_batch(loader)
    for ids, lengths in _collated(loader):
        yield F.pad(ids, (0, width - ids.shape[1]), value=pad_id), lengths
