"""``PrefixCacheCallback``: the frozen-prefix cache in a Lightning run.

One pass over every message of the run's dataloaders before the first step (under data
parallelism each process computes a share and they exchange them), then each batch gets
its rows from the cache (``batch["prefix"]``) and the model runs only what trains.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from gpt_classifier.model.classifier import CachedPrefix, SequenceClassifier
from gpt_classifier.training.distributed import all_gather_objects
from gpt_classifier.training.prefix_cache import (
    CACHE_DTYPES,
    PrefixCache,
    loader_batches,
    widest_batch,
)
from gpt_classifier.training.prefix_store import open_store, save_within_budget
from gpt_classifier.training.signals import GracefulStop

log = logging.getLogger(__name__)


class PrefixCacheCallback(L.Callback):
    """Feeds training and evaluation from a :class:`PrefixCache` where that is exact.

    ``enabled``: ``auto`` (on whenever the fine-tuning method leaves the embeddings
    and at least one leading block frozen and dropout is off), ``true`` (the same,
    but an error where it cannot apply) or ``false``. ``cache_dtype``: ``auto`` (the
    compute dtype) or a dtype name. ``persist`` reuses the cache across runs, in ``dir``
    on disk, where the least recently used files go once they exceed ``max_gb``. A cache
    that would hold more than ``max_memory_gb`` in host memory is turned off (logged).
    ``cpu_batch_tokens`` / ``accelerator_batch_tokens`` size the warm-up batches.
    """

    def __init__(
        self,
        enabled: bool | str = "auto",
        cache_dtype: str = "auto",
        persist: bool = False,  # the config turns it on, with its dir
        dir: str | None = None,  # noqa: A002 (the config key)
        max_gb: float = 10.0,
        max_memory_gb: float = 8.0,
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
        for key, value in (("max_gb", max_gb), ("max_memory_gb", max_memory_gb)):
            if not value > 0:
                raise ValueError(f"prefix_cache.{key}={value!r}; give a size in GB above 0")
        self.enabled = str(enabled)
        self.cache_dtype = cache_dtype
        self.persist = persist
        self.dir = Path(dir) if dir else None
        self.max_bytes = int(max_gb * 1e9)
        self.max_memory_bytes = int(max_memory_gb * 1e9)
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
        todo, asked = self.cache.plan(
            batch for dl in loaders for batch in loader_batches(dl, self.cache.pad_id)
        )
        need = self.cache.nbytes + self.cache.bytes_for(todo)
        if need > self.max_memory_bytes:
            log.info("Prefix cache off: it would hold %.2f GB of hidden states for %d "
                     "messages in host memory, over prefix_cache.max_memory_gb=%g; raise "
                     "it, or halve the size with prefix_cache.cache_dtype=bfloat16",
                     need / 1e9, asked, self.max_memory_bytes / 1e9)  # fmt: skip
            self.cache = None
            return
        if (cache_file := self._load_persisted(trainer, wanted=todo)) is not None:
            todo = self.cache.missing(list(todo), list(todo.values()))
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
            ordered = sorted(todo.items(), key=lambda kv: (-kv[1], kv[0]))
            todo = dict(ordered[rank::world_size])
        elif not todo:
            return
        device = module.device
        batch_tokens = self.batch_tokens["cpu" if device.type == "cpu" else "accelerator"]
        bar = _progress_bar(trainer, len(todo))
        start = time.perf_counter()
        tokens = 0

        stoppers = [c for c in trainer.callbacks if isinstance(c, GracefulStop)]
        fitting = trainer.state.fn == TrainerFn.FITTING

        def progress(count: int, count_tokens: int) -> None:
            nonlocal tokens
            for stop in stoppers if fitting else []:
                stop.stop_if_asked(trainer)  # a signal: stop now, not after the whole pass
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
        who, received = "Prefix cache", ""
        if world_size > 1:
            arrived = self._exchange(trainer, list(todo))
            if not todo and not arrived:
                return
            who = f"Prefix cache, process {rank} of {world_size}"
            received = f", received {arrived} from the other processes"
        rate = f"{tokens / seconds:,.0f}" if seconds else "-"
        log.info("%s: computed %d of %d distinct messages in %.1f s (%s tokens/s)%s; %.1f MiB "
                 "in host memory (%s)", who, len(todo), asked, seconds, rate, received,
                 self.cache.nbytes / 2**20, self.cache.dtype)  # fmt: skip
        if cache_file is not None and trainer.is_global_zero:
            save_within_budget(self.cache, cache_file, self._fingerprint, self.max_bytes)

    def _exchange(self, trainer: L.Trainer, computed: list[bytes]) -> int:
        """Send the entries this process computed to every other process and take
        theirs; returns how many entries arrived."""
        assert self.cache is not None
        entries = self.cache.entries
        parts = [entries[key] for key in computed]
        # One block: pickled, each entry (a view) would carry the whole block it views.
        share = (computed, [len(p) for p in parts], torch.cat(parts) if parts else None)
        received = 0
        for rank, (keys, extents, block) in enumerate(all_gather_objects(trainer, share)):
            if rank == trainer.global_rank or block is None:
                continue
            for key, hidden in zip(keys, block.to(self.cache.dtype).split(extents)):
                if key not in entries or len(entries[key]) < len(hidden):
                    entries[key] = hidden
                    received += 1
        return received

    def _load_persisted(self, trainer: L.Trainer, wanted: dict[bytes, Any]) -> Path | None:
        """The cache's file, whose ``wanted`` entries are read the first time."""
        if not self.persist or self.cache is None or self.dir is None:
            return None
        if self._file is None:
            self._file, self._fingerprint, self._reused_from = open_store(
                self.cache, self.dir, str(trainer.precision), set(wanted)
            )
        return self._file

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
        # A blocking copy: from pageable memory a non-blocking one gains nothing on CUDA,
        # and on MPS it can read ``hidden`` after its memory is freed (pytorch#189690).
        dtype = module.model.backbone.pos_emb.weight.dtype
        batch["prefix"] = CachedPrefix(hidden.to(ids.device, dtype), self.cache.depth)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: int
    ) -> None:
        self._attach(batch, pl_module)

    # Evaluation batches take their prefix the same way (Lightning adds a dataloader index).
    on_validation_batch_start = on_test_batch_start = on_train_batch_start


def _as_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


def _fixed_width(loader: DataLoader) -> bool:
    """Whether every batch of a loader pads to one width (one example alone included)."""
    one = loader.collate_fn([loader.dataset[0]])["input_ids"].shape[1]  # type: ignore[index]
    return one == widest_batch(loader)


def _progress_bar(trainer: L.Trainer, total: int) -> Any:
    """A tqdm bar like the training loop's, where the trainer shows one."""
    shown = trainer.progress_bar_callback
    if shown is None or getattr(shown, "is_disabled", False) or not trainer.is_global_zero:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Prefix cache", unit="msg", dynamic_ncols=True, leave=True)
