"""The frozen-prefix cache: run the frozen embeddings and leading blocks once per message.

When the embeddings and the first ``depth`` blocks are frozen and run without
dropout, their output for a message is a pure function of its token ids. The
:class:`PrefixCache` keeps it in host memory (so it works on every accelerator) and,
optionally, on disk so that later runs skip the prefix altogether.
:class:`PrefixCacheCallback` owns its lifecycle in a Lightning run: one pass over
every message of the run's dataloaders before the first step, then each batch gets
its rows from the cache (``batch["prefix"]``), and the model runs only what trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from gpt_classifier.data.tokenizer import PAD_TOKEN_ID
from gpt_classifier.files import atomic_path
from gpt_classifier.model.classifier import CachedPrefix, SequenceClassifier
from gpt_classifier.model.pooling import positions_read
from gpt_classifier.training.distributed import all_gather_objects

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FILE_FORMAT = 3  # tokens, lengths, extents, hidden; the fingerprint in the metadata


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

    def load(self, path: Path, fingerprint: str) -> int:
        """Add the entries stored at ``path`` if it holds ``fingerprint``'s values; returns
        how many were read. A damaged or foreign file is ignored (logged), never trusted."""
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            return 0
        try:
            with safe_open(str(path), framework="pt") as f:
                stored_for = (f.metadata() or {}).get("fingerprint")
                if stored_for != fingerprint:
                    raise ValueError(f"it holds fingerprint {stored_for!r}, not {fingerprint!r}")
                stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
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
        for ids, h in zip(tokens, parts):
            key = ids.numpy().tobytes()
            if key not in self.entries or len(self.entries[key]) < len(h):
                self.entries[key] = h
        return len(tokens)

    def save(self, path: Path, fingerprint: str) -> None:
        """Merge the entries into the file at ``path`` under a lock and replace it
        atomically: concurrent jobs never see half a file, and none loses another's rows."""
        from filelock import FileLock
        from safetensors.torch import save_file

        if not self.entries:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_name(path.name + ".lock"))):
            self.load(path, fingerprint)  # what other jobs added since this one read it
            keys = list(self.entries)
            tokens = [torch.frombuffer(bytearray(k), dtype=torch.int64) for k in keys]
            with atomic_path(path) as tmp:
                save_file(
                    {
                        "tokens": torch.cat(tokens),
                        "lengths": torch.tensor([len(t) for t in tokens], dtype=torch.int64),
                        "extents": torch.tensor(
                            [len(self.entries[k]) for k in keys], dtype=torch.int64
                        ),
                        "hidden": torch.cat([self.entries[k] for k in keys]),
                    },
                    str(tmp),
                    metadata={"fingerprint": fingerprint, "format": str(FILE_FORMAT)},
                )


def evict_oldest(directory: Path, max_bytes: int, keep: Path) -> list[Path]:
    """Delete the least recently used cache files of ``directory`` until the rest fit in
    ``max_bytes`` (``keep`` is never deleted); returns what was deleted."""
    files = []
    for file in directory.glob("prefix-*.safetensors"):
        try:
            stat = file.stat()
        except OSError:  # removed by a concurrent job meanwhile
            continue
        files.append((stat.st_mtime, stat.st_size, file))
    total = sum(size for _, size, _ in files)
    deleted = []
    for _, size, file in sorted(files):
        if total <= max_bytes:
            break
        if file == keep:
            continue
        file.unlink(missing_ok=True)
        file.with_name(file.name + ".lock").unlink(missing_ok=True)
        total -= size
        deleted.append(file)
    return deleted


class PrefixCacheCallback(L.Callback):
    """Feeds training and evaluation from a :class:`PrefixCache` where that is exact.

    ``enabled``: ``auto`` (on whenever the fine-tuning method leaves the embeddings
    and at least one leading block frozen and dropout is off), ``true`` (the same,
    but an error where it cannot apply) or ``false``. ``cache_dtype``: ``auto`` (the
    compute dtype) or a dtype name. ``persist`` reuses the cache across runs, in ``dir``
    on disk, where the least recently used files go once they exceed ``max_gb``.
    ``cpu_batch_tokens`` / ``accelerator_batch_tokens`` size the warm-up batches.
    """

    def __init__(
        self,
        enabled: bool | str = "auto",
        cache_dtype: str = "auto",
        persist: bool = False,  # the config turns it on, with its dir
        dir: str | None = None,  # noqa: A002 (the config key)
        max_gb: float = 10.0,
        cpu_batch_tokens: int = 512,
        accelerator_batch_tokens: int = 16384,
    ) -> None:
        if str(enabled) not in ("auto", "True", "False"):
            raise ValueError(f"prefix_cache.enabled={enabled!r}; use auto, true or false")
        if cache_dtype != "auto" and cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"prefix_cache.cache_dtype={cache_dtype!r}; choose auto or {list(CACHE_DTYPES)}"
            )
        if persist and not dir:
            raise ValueError("prefix_cache.persist=true needs prefix_cache.dir")
        if not max_gb > 0:
            raise ValueError(f"prefix_cache.max_gb={max_gb!r}; give a size in GB above 0")
        self.enabled = str(enabled)
        self.cache_dtype = cache_dtype
        self.persist = persist
        self.dir = Path(dir) if dir else None
        self.max_bytes = int(max_gb * 1e9)
        self.batch_tokens = {"cpu": cpu_batch_tokens, "accelerator": accelerator_batch_tokens}
        self.cache: PrefixCache | None = None
        self.decided = False
        self.seconds = 0.0  # spent computing the prefix (warm-up and misses), for metrics.json
        self._file: Path | None = None
        self._fingerprint = ""
        self._reused_from = ""  # where reused entries came from, for the log

    # ------------------------------------------------------------------ deciding

    def _prepare(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Decide once, after the fine-tuning method has been applied (module setup)."""
        if self.decided:
            return
        self.decided = True
        model: SequenceClassifier = module.model
        depth = module.method.frozen_depth(model.cfg)
        reasons = []
        if depth == 0:
            reasons.append(f"{module.method!r} leaves no frozen prefix")
        if model.cfg.drop_rate > 0:
            reasons.append(f"dropout {model.cfg.drop_rate} makes the prefix random")
        if trainer is not None and isinstance(trainer.strategy, FSDPStrategy):
            reasons.append("FSDP shards the frozen blocks; they run inside its wrapped model")
        if self.enabled == "False" or reasons:
            if self.enabled == "True":
                raise ValueError(
                    f"prefix_cache.enabled=true is not valid here: {'; '.join(reasons)}"
                )
            log.info("Prefix cache off (%s)", "; ".join(reasons) or "prefix_cache.enabled=false")
            return
        gpt = model.backbone
        prefix = [gpt.tok_emb, gpt.pos_emb, *gpt.trf_blocks[:depth]]
        trainable = [p for m in prefix for p in m.parameters() if p.requires_grad]
        if trainable:  # the method's promise and its marking disagree: never cache wrongly
            raise RuntimeError(f"{module.method!r} says {depth} blocks are frozen, but they train")
        self.cache = PrefixCache(model, depth, self._dtype(trainer))
        log.info("Prefix cache on: embeddings + %d frozen blocks run once per message", depth)

    def _dtype(self, trainer: L.Trainer) -> torch.dtype:
        if self.cache_dtype != "auto":
            return CACHE_DTYPES[self.cache_dtype]
        return torch.bfloat16 if str(trainer.precision).startswith("bf16") else torch.float32

    # ------------------------------------------------------------------ warming

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)
        loaders = [trainer.train_dataloader, *_as_list(trainer.val_dataloaders)]
        # The test split too, so that one pass computes every message at the widest any
        # later batch needs (with per-batch padding, final-position pooling reads padding).
        datamodule = trainer.datamodule
        if datamodule is not None and is_overridden("test_dataloader", datamodule):
            loaders += _as_list(datamodule.test_dataloader())
        self._warm(trainer, pl_module, loaders)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)
        self._warm(trainer, pl_module, _as_list(trainer.val_dataloaders))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)
        self._warm(trainer, pl_module, _as_list(trainer.test_dataloaders))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)
        self._warm(trainer, pl_module, _as_list(trainer.predict_dataloaders))

    def _warm(self, trainer: L.Trainer, module: L.LightningModule, loaders: list[Any]) -> None:
        """One dense pass over every message of ``loaders`` that is not cached yet."""
        loaders = [dl for dl in loaders if isinstance(dl, DataLoader)]
        if self.cache is None or not loaders:
            return
        if not self.cache.model.cfg.causal_mask and not all(map(_fixed_width, loaders)):
            log.info(
                "Prefix cache off: without the causal mask a message's prefix depends on its "
                "batch's padding, and batches pad to their own longest message"
            )
            self.cache = None
            return
        cache_file = self._load_persisted(trainer)
        todo, asked = self.cache.plan(_whole_dataset(dl) for dl in loaders)
        if self._reused_from:
            log.info(
                "Prefix cache: reused %d of %d messages from %s",
                asked - len(todo), asked, self._reused_from,
            )  # fmt: skip
            self._reused_from = ""  # said once per run
        # Under data parallelism each process computes a share of the messages, every
        # process then gets the others' (the data order reshuffles each epoch, so each
        # process needs them all); the work of all processes adds up to one pass.
        rank, world_size = trainer.global_rank, trainer.world_size
        if world_size > 1:
            ordered = sorted(todo.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            todo = dict(ordered[rank::world_size])
        elif not todo:
            return
        device = module.device
        batch_tokens = self.batch_tokens["cpu" if device.type == "cpu" else "accelerator"]
        bar = _progress_bar(trainer, len(todo))
        start = time.perf_counter()
        tokens = 0

        def progress(count: int, count_tokens: int) -> None:
            nonlocal tokens
            tokens += count_tokens
            if bar is not None:
                bar.update(count)
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s")

        try:
            with trainer.precision_plugin.forward_context():
                self.cache.warm(todo, device, batch_tokens, progress)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if world_size > 1:
            received = self._exchange(trainer, list(todo))
            if not todo and not received:
                return
            log.info(
                "Prefix cache, process %d of %d: computed %d of %d distinct messages in %.1f s "
                "(%s tokens/s), received %d from the other processes; %.1f MiB in host "
                "memory (%s)",
                rank, world_size, len(todo), asked, seconds,
                f"{tokens / seconds:,.0f}" if seconds else "-", received,
                self.cache.nbytes / 2**20, self.cache.dtype,
            )  # fmt: skip
        else:
            log.info(
                "Prefix cache: computed %d of %d distinct messages in %.1f s (%s tokens/s); "
                "%.1f MiB in host memory (%s)",
                len(todo), asked, seconds, f"{tokens / seconds:,.0f}" if seconds else "-",
                self.cache.nbytes / 2**20, self.cache.dtype,
            )  # fmt: skip
        if cache_file is not None and trainer.is_global_zero:
            self._save(cache_file)

    def _exchange(self, trainer: L.Trainer, computed: list[bytes]) -> int:
        """Send the entries this process computed to every other process and take
        theirs; returns how many entries arrived."""
        assert self.cache is not None
        entries = self.cache.entries
        shares = all_gather_objects(trainer, {key: entries[key] for key in computed})
        received = 0
        for rank, share in enumerate(shares):
            if rank == trainer.global_rank:
                continue
            for key, hidden in share.items():
                if key not in entries or len(entries[key]) < len(hidden):
                    entries[key] = hidden.to(self.cache.dtype)
                    received += 1
        return received

    def _load_persisted(self, trainer: L.Trainer) -> Path | None:
        """The cache's file, whose entries are read the first time."""
        if not self.persist or self.cache is None or self.dir is None:
            return None
        if self._file is None:
            fingerprint = self.cache.fingerprint(str(trainer.precision))
            self._fingerprint = fingerprint
            self._file = self.dir / f"prefix-{fingerprint}.safetensors"
            if self.cache.load(self._file, fingerprint):
                self._reused_from = str(self._file)
                _touch(self._file)  # recently used: evicted last
        return self._file

    def _save(self, file: Path) -> None:
        """Write the cache file, then keep the folder within ``max_gb``."""
        if self.cache is None:
            return
        if self.cache.nbytes > self.max_bytes:
            log.warning(
                "Prefix cache not saved: its %.2f GB exceed prefix_cache.max_gb=%.2f",
                self.cache.nbytes / 1e9, self.max_bytes / 1e9,
            )  # fmt: skip
            return
        try:
            self.cache.save(file, self._fingerprint)
        except OSError as err:  # a full or read-only disk costs reuse, not the run
            log.warning("Prefix cache not saved to %s (%s)", file, err)
            return
        for old in evict_oldest(file.parent, self.max_bytes, keep=file):
            log.info("Prefix cache: removed %s (least recently used; prefix_cache.max_gb=%g)",
                     old, self.max_bytes / 1e9)  # fmt: skip

    # ------------------------------------------------------------------ feeding steps

    def _attach(self, batch: dict[str, Any], module: L.LightningModule) -> None:
        if self.cache is None:
            return
        ids, lengths = batch["input_ids"], batch["lengths"]
        # One device-to-host copy per batch, not one per row.
        host = torch.cat([ids, lengths[:, None]], dim=1).cpu()
        start = time.perf_counter()
        before = self.cache.computed
        # Misses run in the precision the warm-up and the steps use (autocast, if any).
        with module.trainer.precision_plugin.forward_context():
            hidden = self.cache.lookup(host[:, :-1], host[:, -1])
        if self.cache.computed != before:
            self.seconds += time.perf_counter() - start
        # The residual stream runs in the parameters' dtype, whatever the cache stores.
        dtype = module.model.backbone.pos_emb.weight.dtype
        batch["prefix"] = CachedPrefix(
            hidden.to(ids.device, dtype, non_blocking=True), self.cache.depth
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._attach(batch, pl_module)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._attach(batch, pl_module)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._attach(batch, pl_module)

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._attach(batch, pl_module)


def _touch(file: Path) -> None:
    with contextlib.suppress(OSError):  # read-only folder: only the eviction order suffers
        os.utime(file)


def _as_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


def _whole_dataset(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example of a loader's dataset collated into one batch, without iterating
    the loader (that would draw from the random generators and change the training
    order). One batch pads to the widest any of its batches can be."""
    dataset = loader.dataset
    batch = loader.collate_fn([dataset[i] for i in range(len(dataset))])  # type: ignore[arg-type]
    return batch["input_ids"], batch["lengths"]


def _fixed_width(loader: DataLoader) -> bool:
    """Whether every batch of a loader pads to one width (one example alone included)."""
    dataset = loader.dataset
    one = loader.collate_fn([dataset[0]])["input_ids"].shape[1]  # type: ignore[index]
    return one == _whole_dataset(loader)[0].shape[1]


def _progress_bar(trainer: L.Trainer, total: int) -> Any:
    """A tqdm bar like the training loop's, where the trainer shows one."""
    bar_callback = trainer.progress_bar_callback
    if (
        bar_callback is None
        or getattr(bar_callback, "is_disabled", False)
        or not trainer.is_global_zero
    ):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Prefix cache", unit="msg", dynamic_ncols=True, leave=True)
