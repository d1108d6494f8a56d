"""Your own labelled texts: ``FilesDataModule`` (CSV, TSV, JSONL/JSON or Parquet files) and
``HubDataModule`` (a 🤗 dataset), read with 🤗 ``datasets``. The labels are the training
split's (sorted) unless ``labels`` fixes them; a missing split is split off, stratified."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpt_classifier.data.datamodule import SMSSpamDataModule
from gpt_classifier.data.sms import DataFormatError, Message
from gpt_classifier.data.splits import Splits, stratified_split, undersample
from gpt_classifier.files import UTF8_BOM, ZIP_MAGIC, first_bad_utf8, user_file

log = logging.getLogger(__name__)

# Suffix: (datasets builder, its options).
READERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
SPLITS = ("train", "validation", "test")
SHOWN = 10  # rows named in an error, at most


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
        if path is not None and files["train"] is not None:
            raise ValueError("give data.path (one file, split here) or data.files.train (and "
                             "optionally validation/test), not both")  # fmt: skip
        if path is None and files["train"] is None:
            raise ValueError("give data.path=<one file to split> or data.files.train=<file> "
                             "(CSV/TSV with a header row, JSONL/JSON or Parquet)")  # fmt: skip

    def _file(self) -> Path:
        key = "data.path" if self.path is not None else "data.files.train"
        return user_file(self.path or self.files["train"], key)

    def prepare_data(self) -> None:
        self._file()

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
            {row.label for row in train_rows})  # fmt: skip
        self.labels = {name: index for index, name in enumerate(names)}
        self._check_labels(train_rows, key)
        _warn_of_near_duplicates(names, key)
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
        """The (label, text) rows of one table, every problem named by row and column."""
        columns = list(table.column_names)
        absent = [c for c in [*self.text_columns, self.label_column] if c not in columns]
        if absent:
            which = "data.text_column" if self.label_column not in absent else "data.label_column"
            raise DataFormatError(f"{source}: no column {absent} (set {which}); its columns "
                                  f"are {columns}")  # fmt: skip
        feature = table.features[self.label_column]
        names = getattr(feature, "names", None)  # a ClassLabel keeps its names
        # Whole columns at once: iterating a Dataset formats a table per row.
        texts = [table.data.column(c).to_pylist() for c in self.text_columns]
        labels = table.data.column(self.label_column).to_pylist()
        problems: dict[str, list[int]] = {}
        rows = []
        for i, (label, *parts) in enumerate(zip(labels, *texts), start=1):
            if label is None or (isinstance(label, str) and not label.strip()):
                problems.setdefault(f"an empty {self.label_column!r}", []).append(i)
                continue
            if any(part is None for part in parts):
                problems.setdefault(f"a null text ({', '.join(self.text_columns)})", []).append(i)
                continue
            text = self.text_separator.join(str(part) for part in parts)
            if not text.strip():
                problems.setdefault("an empty text", []).append(i)
                continue
            rows.append(Message(label=names[label] if names else str(label), text=text))
        if problems:
            said = "; ".join(
                f"{len(where)} row(s) with {what}: rows "
                + ", ".join(map(str, where[:SHOWN])) + (", ..." if len(where) > SHOWN else "")
                for what, where in problems.items()
            )  # fmt: skip
            raise DataFormatError(f"{source}: {said} (data rows counted from 1); fill or "
                                  "remove them")  # fmt: skip
        if not rows:
            raise DataFormatError(f"{source} has no rows")
        return rows

    def _check_labels(self, rows: list[Message], key: str) -> None:
        for i, row in enumerate(rows, start=1):
            if row.label not in self.labels:
                known = list(self.labels)
                where = "data.labels" if self.fixed_labels else "the training data"
                raise DataFormatError(f"{key}, row {i}: label {row.label!r} is not one of "
                                      f"{where}'s {known}")  # fmt: skip

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
        try:
            from datasets import DatasetDict, load_dataset, load_from_disk
        except ImportError as err:
            raise ImportError('data=hf reads 🤗 datasets: pip install -e ".[data]"') from err
        folder = self._file()
        try:
            if folder.is_dir():
                data = load_from_disk(str(folder))
            else:
                data = load_dataset(self.name, self.config_name)
        except Exception as err:  # noqa: BLE001 - the Hub, the cache and the files each have their own
            from huggingface_hub import constants  # offline as datasets sees it

            cause = f"{type(err).__name__}: {err}"[:800]
            offline = constants.HF_HUB_OFFLINE
            hint = (" With HF_HUB_OFFLINE=1 only cached datasets load: run once online, or "
                    "give a folder written by save_to_disk." if offline else "")  # fmt: skip
            raise DataFormatError(
                f"data.name={self.name} could not be loaded ({cause}).{hint}"
            ) from err
        if not isinstance(data, DatasetDict):
            data = DatasetDict({"train": data})
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


def read_table(path: Path, key: str):  # -> datasets.Dataset
    """One file as a ``datasets.Dataset``, its format taken from its suffix."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(
            'data=files reads files with 🤗 datasets: pip install -e ".[data]"'
        ) from err
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataFormatError(
            f"{key}={path}: the suffix {suffix or '(none)'!r} is not one of "
            f"{', '.join(READERS)}; rename the file to say its format"
        )
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(ZIP_MAGIC):
        raise DataFormatError(f"{key}={path} is a zip archive; unzip it and give the file")
    builder, options = READERS[suffix]
    if builder == "csv":  # Excel and Windows editors start CSV files with a BOM
        options = {**options, "encoding": "utf-8-sig"}
    elif head.startswith(UTF8_BOM):
        raise DataFormatError(f"{key}={path} starts with a UTF-8 byte-order mark, which JSON "
                              "readers refuse; re-save it as UTF-8 without BOM")  # fmt: skip
    if suffix != ".parquet" and (bad := first_bad_utf8(path)) is not None:
        # Caught here: the JSON reader keeps such bytes, to fail later on a row's text.
        raise DataFormatError(f"{key}={path}, line {bad[0]}: bytes {bad[1]!r} are not UTF-8; "
                              "re-save the file as UTF-8")  # fmt: skip
    if path.stat().st_size == 0:
        raise DataFormatError(f"{key}={path} is empty")
    try:
        return load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # noqa: BLE001 - each reader raises its own kinds
        cause = err.__cause__ or err
        if "corresponds to no data" in str(cause):  # a header alone, or blank lines
            raise DataFormatError(f"{key}={path} has no rows") from err
        said = f"{type(cause).__name__}: {cause}"[:1500]
        raise DataFormatError(f"{key}={path} could not be read as {suffix[1:]}: {said}") from err
