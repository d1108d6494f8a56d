"""Your own labelled texts: ``FilesDataModule`` (CSV, TSV, JSONL/JSON or Parquet files) and
``HubDataModule`` (a 🤗 dataset), read with 🤗 ``datasets``. The labels are the training
split's (sorted, numbers by value) unless ``labels`` fixes them; a missing split is split
off, stratified."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpt_classifier.data.datamodule import SMSSpamDataModule
from gpt_classifier.data.sms import DataFormatError, Message
from gpt_classifier.data.splits import Splits, stratified_split, undersample
from gpt_classifier.data.tables import read_rows, read_table
from gpt_classifier.extras import import_extra
from gpt_classifier.files import user_file

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class FilesDataModule(SMSSpamDataModule):
    """The SMS data module's batching, caching and checks, on rows read from files."""

    def __init__(
        self,
        path: str | None = None,
        files: Mapping[str, str | None] | None = None,
        text_column: str | Sequence[str] = "text",
        text_separator: str = " ",
        label_column: str = "label",
        labels: Sequence[str] | None = None,
        balance: bool = False,
        **settings: Any,
    ) -> None:
        files = {name: (files or {}).get(name) for name in SPLITS}
        self._check_sources(path, files)
        super().__init__(path=path, labels={}, balance=balance, **settings)
        self.files = files
        self.text_columns = [text_column] if isinstance(text_column, str) else list(text_column)
        self.text_separator = text_separator
        self.label_column = label_column
        self.fixed_labels = None if labels is None else [str(label) for label in labels]
        # Part of what a sweep's data reuse is keyed by (SMSSpamDataModule.setup).
        self.hparams.update(files=files, text_column=self.text_columns, label_column=label_column,
                            text_separator=text_separator, labels=self.fixed_labels)  # fmt: skip

    @staticmethod
    def _check_sources(path: str | None, files: Mapping[str, str | None]) -> None:
        if path is not None and (given := [f"data.files.{k}={v}" for k, v in files.items() if v]):
            fix = given if files["train"] else [f"data.files.train={path}", *given]
            raise ValueError(f"data.path={path} and {' '.join(given)} are both given: data.path "
                             "is one file split three ways; for files of your own splits, give "
                             f"{' '.join(fix)} (a missing split is taken from train)")  # fmt: skip
        if path is None and files["train"] is None:
            raise ValueError("give data.path=<one file to split> or data.files.train=<file> "
                             "(CSV/TSV with a header row, JSONL/JSON or Parquet)")  # fmt: skip

    def _file(self) -> Path:
        key = "data.path" if self.path is not None else "data.files.train"
        return user_file(self.path or self.files["train"], key)

    def prepare_data(self) -> None:
        self._file()

    def _identity(self) -> tuple[Any, ...]:
        """Every given file and its version, for a sweep's reuse (not the training file's only)."""
        given = [self.path] if self.path is not None else [f for f in self.files.values() if f]
        stats = [(f, f.stat()) for f in (Path(g).expanduser().resolve() for g in given)]
        return tuple((str(f), stat.st_size, stat.st_mtime_ns) for f, stat in stats)

    def _tables(self) -> dict[str, tuple[Any, str]]:
        """Each split that is given: its table, and how messages name it."""
        if self.path is not None:
            return {"train": (read_table(self._file(), "data.path"), f"data.path={self._file()}")}
        tables = {}
        for name, file in self.files.items():
            if file:
                path = user_file(file, f"data.files.{name}")
                tables[name] = (read_table(path, f"data.files.{name}"), f"data.files.{name}={path}")
        return tables

    def load_splits(self) -> Splits:
        if self.splits is not None:
            return self.splits
        hp = self.hparams
        tables = self._tables()
        train_table, key = tables["train"]
        train_rows = self._read(train_table, key)
        names = self.fixed_labels or _class_names(train_table, self.label_column) or sorted(
            {row.label for row in train_rows}, key=_label_order)  # fmt: skip
        self.labels = {name: index for index, name in enumerate(names)}
        self._check_labels(train_rows, key)
        _warn_of_near_duplicates(names, key)
        seen = {row.label for row in train_rows}
        if unseen := [name for name in names if name not in seen]:  # data.labels', a ClassLabel's
            log.warning("%s: no training row has the label(s) %s, so the model cannot learn "
                        "them", key, unseen)  # fmt: skip
        rows = {"train": train_rows}
        for name, (table, source) in tables.items():
            if name != "train":
                rows[name] = self._read(table, source)
                self._check_labels(rows[name], source)
        if hp.balance:
            rows["train"] = undersample(rows["train"], hp.seed)
        missing = [name for name in SPLITS if name not in rows]
        fractions = {"train": hp.train_frac, "validation": hp.validation_frac,
                     "test": 1 - hp.train_frac - hp.validation_frac}  # fmt: skip
        split = {name: [(r.text, self.labels[r.label]) for r in rows[name]] for name in rows}
        if missing:
            wanted = {name: fractions[name] for name in ("train", *missing)}
            split.update(stratified_split(rows["train"], self.labels, wanted, hp.seed, key))
            log.info("%s split off %s (stratified by label, %s)", ", ".join(missing), key,
                     "/".join(f"{wanted[n]:g}" for n in wanted))  # fmt: skip
        self.splits = Splits(**{name: split[name] for name in SPLITS})
        self._warn_of_leaks()
        self._check_sizes(self.splits, self._file())
        log.info("Data: %s, %d labels (%s): train %d / validation %d / test %d", key,
                 len(names), ", ".join(names), *(len(split[n]) for n in SPLITS))  # fmt: skip
        self._write_splits()
        return self.splits

    # ------------------------------------------------------------------ reading

    def _read(self, table: Any, source: str) -> list[Message]:
        return read_rows(table, source, self.text_columns, self.label_column, self.text_separator)

    def _check_labels(self, rows: list[Message], key: str) -> None:
        for i, row in enumerate(rows, start=1):
            if row.label not in self.labels:
                known = list(self.labels)
                where = "data.labels" if self.fixed_labels else "the training data"
                others = sorted({r.label for r in rows} - set(known), key=_label_order)
                hint = (f"; the file's other labels: {others[:10]} (data.labels names labels as "
                        "the file writes them)" if self.fixed_labels else "")  # fmt: skip
                raise DataFormatError(f"{key}, row {i} (data rows counted from 1): label "
                                      f"{row.label!r} is not one of {where}'s "
                                      f"{known}{hint}")  # fmt: skip

    def _warn_of_leaks(self) -> None:
        seen: dict[str, str] = {}
        shared = 0
        for name, split in self.splits.items():
            for text in {text for text, _ in split}:
                if seen.setdefault(text, name) != name:
                    shared += 1
        if shared:
            log.warning("%d text(s) appear in more than one split: test metrics over them "
                        "measure memory, not generalisation", shared)  # fmt: skip


def _warn_of_near_duplicates(names: list[str], key: str) -> None:
    """Labels that differ only in case or spaces: kept apart, as given, but said."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.strip().casefold(), []).append(name)
    for variants in (g for g in groups.values() if len(g) > 1):
        log.warning("%s: the labels %s differ only in case or spaces, so they are %d classes; "
                    "if they mean one, write it one way", key, variants, len(variants))  # fmt: skip


def _label_order(name: str) -> tuple[bool, float, str]:
    """Numbers by value (2 before 10), then other labels alphabetically."""
    number = re.fullmatch(r"\s*[+-]?\d+(\.\d*)?\s*", name) is not None
    return not number, float(name) if number else 0.0, name


def _class_names(table: Any, column: str) -> list[str] | None:
    """The names of a ``ClassLabel`` column (a 🤗 dataset's integer labels), in order."""
    return list(getattr(table.features[column], "names", None) or []) or None


class HubDataModule(FilesDataModule):
    """A 🤗 dataset: a Hub id (``data.name``, with ``data.config_name``) or a folder written
    by ``save_to_disk``; its splits mapped to ours by ``data.split_names``."""

    def __init__(
        self,
        name: str,
        config_name: str | None = None,
        split_names: Mapping[str, str | None] | None = None,
        **settings: Any,
    ) -> None:
        self.name, self.config_name = str(name), config_name
        self.split_names = {**{s: s for s in SPLITS}, **dict(split_names or {})}
        super().__init__(**settings)
        self.hparams.update(name=self.name, config_name=config_name,
                            split_names=self.split_names)  # fmt: skip

    @staticmethod
    def _check_sources(path: str | None, files: Mapping[str, str | None]) -> None:
        return None  # data.name is the source

    def _file(self) -> Path:
        return Path(self.name).expanduser()  # a save_to_disk folder, or a name in messages

    def _identity(self) -> tuple[Any, ...]:
        folder = self._file()
        version = folder.stat().st_mtime_ns if folder.is_dir() else None
        return self.name, self.config_name, version

    def prepare_data(self) -> None:
        return None  # read (and downloaded, where online) in load_splits

    def _tables(self) -> dict[str, tuple[Any, str]]:
        datasets = import_extra("datasets", "data", "data=hf")
        folder = self._file()
        try:
            if folder.is_dir():
                data = datasets.load_from_disk(str(folder))
            else:
                data = datasets.load_dataset(self.name, self.config_name)
        except Exception as err:  # noqa: BLE001 - the Hub, the cache and the files each have their own
            from huggingface_hub import constants  # offline as datasets sees it

            cause = f"{type(err).__name__}: {err}"[:800]
            offline = constants.HF_HUB_OFFLINE
            hint = (" With HF_HUB_OFFLINE=1 only cached datasets load: run once online, or "
                    "give a folder written by save_to_disk." if offline else
                    f" Check the name (https://huggingface.co/datasets/{self.name}), the "
                    "network and, for a gated dataset, a token (HF_TOKEN or `hf auth login`); "
                    "or give a folder written by save_to_disk.")  # fmt: skip
            raise DataFormatError(
                f"data.name={self.name} could not be loaded ({cause}).{hint}"
            ) from err
        if not isinstance(data, datasets.DatasetDict):
            data = datasets.DatasetDict({"train": data})
        tables = {}
        for ours, theirs in self.split_names.items():
            if theirs and theirs in data:
                tables[ours] = (data[theirs], f"data.name={self.name}, split {theirs}")
        if "train" not in tables:
            raise DataFormatError(
                f"data.name={self.name} has the splits {list(data)}, none of them "
                f"data.split_names.train={self.split_names['train']}: set it to one of them"
            )
        return tables
