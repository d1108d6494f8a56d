"""``SMSSpamDataModule``: the SMS spam data from download to batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from gpt_classifier.data.batching import (
    PADDING_MODES,
    Collator,
    TokenizedTexts,
    TruncationSide,
    truncate,
)
from gpt_classifier.data.samplers import (
    BucketBatchSampler,
    LengthSortedSampler,
    RankBatches,
    ReplayableRandomSampler,
    ResumableLoader,
)
from gpt_classifier.data.sms import (
    DEFAULT_LABELS,
    FILE_SHA256,
    FILE_SIZE,
    MIRROR_URL,
    UCI_URL,
    check_labels,
    ensure_sms_file,
    parse_messages,
    parse_messages_like_pandas,
)
from gpt_classifier.data.splits import (
    Splits,
    balance_and_split,
    check_split_sizes,
    write_split_csv,
)
from gpt_classifier.data.tokenizer import encode_texts, get_tokenizer
from gpt_classifier.sweep_reuse import reuse

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
# Settings that change how batches are drawn, not the splits or their tokens.
LOADER_SETTINGS = frozenset(
    {"batch_size", "eval_batch_size", "shuffle", "drop_last", "bucket_by_length", "num_workers"}
)


class SMSSpamDataModule(L.LightningDataModule):
    """Downloads, parses, balances, splits and tokenizes the SMS Spam Collection. Padding:
    ``batch`` (each batch to its longest message), ``longest_train`` (every split to the
    longest training message, as the book) or ``context`` (to ``max_length``)."""

    def __init__(
        self,
        path: str | None = None,
        data_dir: str = "data/sms_spam_collection",
        urls: Sequence[str] = (UCI_URL, MIRROR_URL),
        size: int | None = FILE_SIZE,
        sha256: str | None = FILE_SHA256,
        labels: Mapping[str, int] = DEFAULT_LABELS,
        book_compat: bool = False,
        balance: bool = True,
        seed: int = 123,
        train_frac: float = 0.7,
        validation_frac: float = 0.1,
        padding: str = "batch",
        max_length: int | None = None,
        context_length: int = 1024,
        truncation_side: TruncationSide = "right",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        bucket_by_length: bool = False,
        num_workers: int = 0,
        splits_dir: str | None = None,
        tokenizer_dir: str | None = None,
    ) -> None:
        super().__init__()
        if padding not in PADDING_MODES:
            raise ValueError(f"data.padding={padding!r}; choose one of {list(PADDING_MODES)}")
        if sorted(labels.values()) != list(range(len(labels))):
            raise ValueError(
                f"data.labels={dict(labels)} must map each label to 0..{len(labels) - 1} once"
            )
        if not (train_frac > 0 and validation_frac >= 0 and train_frac + validation_frac < 1):
            raise ValueError(f"data.train_frac={train_frac}, validation_frac={validation_frac}: "
                             "give a train share above 0, and shares that sum below 1")  # fmt: skip
        counts = {"batch_size": batch_size, "eval_batch_size": eval_batch_size,
                  "max_length": max_length}  # fmt: skip
        for key, value in counts.items():
            if value is None and key != "batch_size":  # null: batch_size, or the context
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value!r}: give a whole number, 1 or more")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"data.truncation_side={truncation_side!r}; use right (keep the "
                             "start) or left (keep the end)")  # fmt: skip
        if max_length is not None and max_length > context_length:
            log.warning("data.max_length=%d is more than the model's context: texts are cut "
                        "at its %d tokens", max_length, context_length)  # fmt: skip
        self.save_hyperparameters(ignore=["splits_dir"], logger=False)
        self.path, self.data_dir = path, data_dir
        self.labels = dict(labels)
        self.max_length = min(max_length or context_length, context_length)
        self.splits_dir = splits_dir
        self.tokenizer_dir = tokenizer_dir
        self.splits: Splits | None = None
        self.datasets: dict[str, TokenizedTexts] = {}
        # Data-parallel processes expected before a trainer is attached (train.py).
        self.expected_processes = 1

    @property
    def label_names(self) -> list[str]:
        """Label names by class index, e.g. ``["ham", "spam"]``."""
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def _identity(self) -> tuple[Any, ...]:
        """What the data is read from, for a sweep's reuse: the file and its version."""
        file = self._file().resolve()
        stat = file.stat()
        return str(file), stat.st_size, stat.st_mtime_ns

    def _file(self) -> Path:
        hp = self.hparams
        return ensure_sms_file(self.path, self.data_dir, hp.urls, hp.size, hp.sha256)

    def prepare_data(self) -> None:
        self._file()  # downloads once; later runs find the verified file

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return  # tokenized once per run, not per stage or epoch
        # A sweep's previous job may have read the same data: the key is the data's
        # identity and every setting but the loaders'.
        settings = {k: v for k, v in self.hparams.items() if k not in LOADER_SETTINGS}
        key = (*self._identity(), repr(sorted(settings.items())), self.max_length,
               self.tokenizer_dir)  # fmt: skip

        def read() -> tuple[Splits, dict[str, TokenizedTexts], dict[str, int]]:
            splits = self.load_splits()
            return splits, self._tokenize(splits), self.labels

        splits, self.datasets, labels = reuse("data", key, read)
        if self.splits is None:  # reused: this job's checks and split files all the same
            self.splits, self.labels = splits, dict(labels)  # own data: labels read from it
            self._check_sizes(splits, self._file())
            self._write_splits()

    def load_splits(self) -> Splits:
        """Each split's texts and labels, made once (split CSVs into ``splits_dir``)."""
        if self.splits is not None:
            return self.splits
        hp = self.hparams
        file = self._file()
        if hp.book_compat:
            messages = parse_messages_like_pandas(file)
        else:
            messages = parse_messages(file, self.labels)
        check_labels(messages, self.labels, file)
        splits = balance_and_split(
            messages, self.labels, hp.seed, hp.balance, hp.train_frac, hp.validation_frac
        )
        self._check_sizes(splits, file)
        self.splits = splits
        log.info(
            "SMS data from %s: %d messages -> train %d / validation %d / test %d",
            file, len(messages), len(self.splits.train), len(self.splits.validation),
            len(self.splits.test),
        )  # fmt: skip
        self._write_splits()
        return self.splits

    def split_minimums(self) -> dict[str, int]:
        """The fewest messages each split needs: a whole training batch (when the last
        short one is dropped), one validation message (val/acc picks the best
        checkpoint) and one test message; each of that per process under data
        parallelism, where a global batch is ``batch_size`` x processes."""
        hp = self.hparams
        processes = self._split_sharers()
        train = hp.batch_size * processes if hp.drop_last else 1
        return {"train": train, "validation": processes, "test": processes}

    def _check_sizes(self, splits: Splits, file: Path) -> None:
        hp = self.hparams
        check_split_sizes(splits, self.split_minimums(), file, hp.train_frac,
                          hp.validation_frac, hp.balance, self._split_sharers())  # fmt: skip

    def _split_sharers(self) -> int:
        """How many data-parallel processes share the splits: the trainer's, or before
        there is one, ``expected_processes`` (train.py sets it from the configured
        trainer, so that too little data fails before any process starts)."""
        return self._processes()[1] if self.trainer is not None else self.expected_processes

    def _write_splits(self) -> None:
        """The split CSVs into ``splits_dir``, when set (each run folder keeps its own)."""
        if self.splits_dir and self.splits is not None:
            for name, rows in self.splits.items():
                write_split_csv(rows, Path(self.splits_dir) / f"{name}.csv", str(self._file()))

    def _tokenize(self, splits: Splits) -> dict[str, TokenizedTexts]:
        hp = self.hparams
        tokenizer = get_tokenizer(self.tokenizer_dir)
        encoded = {
            name: encode_texts(tokenizer, [text for text, _ in rows])
            for name, rows in splits.items()
        }
        limit = self.max_length
        pad_to: int | None = None
        if hp.padding == "longest_train":
            limit = min(max(len(ids) for ids in encoded["train"]), self.max_length)
            pad_to = limit
        elif hp.padding == "context":
            pad_to = limit
        datasets = {}
        for name, rows in splits.items():
            ids = encoded[name]
            long = [i for i, row in enumerate(ids) if len(row) > limit]
            for i in long:
                ids[i], _ = truncate(ids[i], limit, hp.truncation_side)
            if long:
                kept = "end kept" if hp.truncation_side == "left" else "start kept"
                log.warning("%s: %d of %d messages were longer than %d tokens and were "
                            "truncated (%s)", name, len(long), len(ids), limit, kept)  # fmt: skip
            datasets[name] = TokenizedTexts(ids, [y for _, y in rows], pad_to)
        return datasets

    @property
    def pad_to(self) -> int | None:
        """The fixed padded length, or None when each batch pads to its own longest."""
        return next(iter(self.datasets.values())).pad_to if self.datasets else None

    # ------------------------------------------------------------------ loaders

    def _processes(self) -> tuple[int, int]:
        """(rank, world size) of the data-parallel run this module feeds; (0, 1) alone.

        The module shards the data itself (the trainer runs with
        ``use_distributed_sampler=False``): a length-bucketing batch sampler cannot take
        Lightning's ``DistributedSampler``, and that one pads the evaluation splits with
        repeated messages (a 300-message test split would count 302).
        """
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: TokenizedTexts, train: bool) -> DataLoader:
        hp = self.hparams
        rank, world_size = self._processes()
        collate = Collator(dataset.pad_to)
        common = {"collate_fn": collate, "num_workers": hp.num_workers,
                  "persistent_workers": hp.num_workers > 0}  # fmt: skip
        if train and (hp.bucket_by_length or world_size > 1):
            # data.batch_size per process: the global batch is batch_size x processes.
            global_size = hp.batch_size * world_size
            if hp.bucket_by_length:
                batches = BucketBatchSampler(dataset.sizes.tolist(), global_size,
                                             hp.drop_last, seed=hp.seed)  # fmt: skip
            else:
                order = (
                    ReplayableRandomSampler(dataset) if hp.shuffle else SequentialSampler(dataset)
                )
                batches = BatchSampler(order, global_size, hp.drop_last)
            if world_size > 1:
                batches = RankBatches(batches, rank, world_size)
            return ResumableLoader(dataset, batch_sampler=batches, **common)
        if train:
            # Resumable: a run resumed mid-epoch sees the rest of that epoch's order.
            return ResumableLoader(
                dataset, batch_size=hp.batch_size, drop_last=hp.drop_last,
                sampler=ReplayableRandomSampler(dataset) if hp.shuffle else None, **common,
            )  # fmt: skip
        return DataLoader(dataset, batch_size=hp.eval_batch_size or hp.batch_size,
                          sampler=LengthSortedSampler(dataset.sizes.tolist(), rank, world_size),
                          **common)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["validation"], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], train=False)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every example of a split, in length order, for whole-split evaluation."""
        if split not in self.datasets:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLIT_NAMES)}")
        return self._loader(self.datasets[split], train=False)
