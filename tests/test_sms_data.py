"""The SMS data: verbatim parsing, the book's split, bad input, downloads and batches."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpt_classifier.data.datamodule import SMSSpamDataModule
from gpt_classifier.data.download import ChecksumError, DownloadError
from gpt_classifier.data.sms import (
    DataFormatError,
    ensure_sms_file,
    parse_messages,
    parse_messages_like_pandas,
)
from gpt_classifier.data.splits import balance_and_split


def test_verbatim_parse_of_the_real_file(sms_file):
    messages = parse_messages(sms_file)
    assert len(messages) == 5574
    assert sum(m.label == "ham" for m in messages) == 4827
    assert sum(m.label == "spam" for m in messages) == 747
    lines = sms_file.read_text(encoding="utf-8").split("\n")[:-1]
    assert [f"{m.label}\t{m.text}" for m in messages] == lines  # nothing lost or altered


def test_book_compatible_split(sms_file):
    splits = balance_and_split(parse_messages_like_pandas(sms_file))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1045, 149, 300)
    assert splits.test[0] == ("85233 FREE>Ringtone!Reply REAL", 1)


def test_book_compatible_split_equals_the_books_pandas_code(sms_file):
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(sms_file, sep="\t", header=None, names=["Label", "Text"])
    n_spam = int((df["Label"] == "spam").sum())
    ham_subset = df[df["Label"] == "ham"].sample(n_spam, random_state=123)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    shuffled = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    splits = balance_and_split(parse_messages_like_pandas(sms_file))
    ours = splits.train + splits.validation + splits.test
    assert ours == list(zip(shuffled["Text"], shuffled["Label"]))


def test_default_split_uses_verbatim_messages(sms_file):
    splits = balance_and_split(parse_messages(sms_file))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1045, 149, 300)
    texts = {m.text for m in parse_messages(sms_file)}
    everything = splits.train + splits.validation + splits.test
    assert all(text in texts for text, _ in everything)
    assert sum(label for _, label in everything) == 747
    quoted = [t for t, _ in everything if t.startswith('"')]
    assert quoted, "messages that begin with a quote keep it"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"ham\tfine\nham no tab here\n", r"line 2: no tab between label and text"),
        (b"ham\tfine\nspam\tok\negg\tnope\n", r"line 3: unknown label 'egg'"),
        (b"ham\t   \n", r"line 1: the text after label 'ham' is empty"),
        (b"ham\tok\nspam\tcaf\xe9\n", r"line 2: bytes b'\\xe9' at column 9 are not UTF-8"),
    ],
    ids=["empty", "no-tab", "unknown-label", "empty-text", "not-utf8"],
)
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as info:
        parse_messages(path)
    assert str(path) in str(info.value)


def test_custom_label_mapping(tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_text("good\thello\nbad\tbuy now\n")
    assert [m.label for m in parse_messages(path, {"good": 0, "bad": 1})] == ["good", "bad"]


def test_byte_order_mark_is_accepted_and_texts_are_unchanged(tmp_path, sms_file):
    """What Windows editors write at a UTF-8 file's start is not part of the first label."""
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + sms_file.read_bytes())
    assert parse_messages(path) == parse_messages(sms_file)
    assert parse_messages_like_pandas(path) == parse_messages_like_pandas(sms_file)


def _lines(n_ham: int, n_spam: int) -> str:
    return "".join(f"ham\thello {i}\n" for i in range(n_ham)) + "".join(
        f"spam\tWIN {i}\n" for i in range(n_spam)
    )


@pytest.mark.parametrize(
    ("n_ham", "n_spam", "message"),
    [
        (1, 0, r"all 1 messages are labelled 'ham'.*at least two of the labels"),
        (0, 40, r"all 40 messages are labelled 'spam'"),
        (1, 1, r"2 messages after balancing the labels split into train 1 / validation 0 / "
               r"test 1: train has fewer than 8, the validation split would be empty\. "
               r"Training needs at least train 8, validation 1, test 1.*at least 12 messages"),
        (3, 2, r"4 messages after balancing .* train 2 / validation 0 / test 2"),
        (5, 5, r"10 messages .* train 7 / validation 1 / test 2: train has fewer than 8"),
    ],
    ids=["one-message", "one-label", "one-each", "three-and-two", "short-of-a-batch"],
)  # fmt: skip
def test_too_little_data_fails_before_training_naming_file_and_counts(
    tmp_path, n_ham, n_spam, message
):
    path = tmp_path / "few.tsv"
    path.write_text(_lines(n_ham, n_spam))
    dm = SMSSpamDataModule(path=str(path), size=None, sha256=None)
    with pytest.raises(DataFormatError, match=message) as info:
        dm.setup("fit")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"batch_size": 0}, "data.batch_size=0: give a whole number, 1 or more"),
        ({"eval_batch_size": 2.5}, "data.eval_batch_size=2.5: give a whole number"),
        ({"max_length": 0}, "data.max_length=0: give a whole number"),  # not "the context"
        ({"train_frac": 0.95}, "data.train_frac=0.95, validation_frac=0.1: give a train share"),
        # Checked here, not only when a text is long enough to be cut.
        ({"truncation_side": "middle"}, "data.truncation_side='middle'; use right (keep the"),
    ],
)
def test_bad_numbers_are_named_when_the_data_module_is_made(setting, says):
    from gpt_classifier.data.files import FilesDataModule

    for module in (SMSSpamDataModule, FilesDataModule):
        with pytest.raises(ValueError, match=re.escape(says)):
            module(path="unused.csv", **setting)


def test_a_max_length_past_the_context_is_said_to_be_cut_there(caplog):
    with caplog.at_level("WARNING"):
        SMSSpamDataModule(path="unused", max_length=5000, context_length=1024)
    assert "data.max_length=5000 is more than the model's context: texts are cut at its 1024" in (
        caplog.text)  # fmt: skip


def test_split_minimum_follows_the_batch_settings(tmp_path):
    path = tmp_path / "ten.tsv"
    path.write_text(_lines(5, 5))
    for kwargs in ({"batch_size": 4}, {"drop_last": False}):
        dm = SMSSpamDataModule(path=str(path), size=None, sha256=None, **kwargs)
        dm.setup("fit")
        assert [len(rows) for _, rows in dm.load_splits().items()] == [7, 1, 2]
    dm = SMSSpamDataModule(path=str(path), size=None, sha256=None, validation_frac=0.0)
    with pytest.raises(DataFormatError, match="validation split would be empty.*which no file"):
        dm.setup("fit")


def test_split_minimums_count_every_data_parallel_process(tmp_path):
    """Under DDP a training batch is data.batch_size per process, and each process
    evaluates its own share of validation and test: the minimums grow with processes."""
    from types import SimpleNamespace

    path = tmp_path / "ten.tsv"  # train 7 / validation 1 / test 2
    path.write_text(_lines(5, 5))

    def setup(processes: int, **kwargs) -> None:
        dm = SMSSpamDataModule(path=str(path), size=None, sha256=None, **kwargs)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=processes)  # type: ignore[assignment]
        dm.setup("fit")

    setup(1, batch_size=4)
    needs = (r"train has fewer than 8, validation has fewer than 2\. Training needs at least "
             r"train 8, validation 2, test 2 \(train: data.batch_size x 2 processes "
             r"\(trainer.devices x trainer.num_nodes\) with data.drop_last; validation and "
             r"test: one message per process\)")  # fmt: skip
    with pytest.raises(DataFormatError, match=needs):
        setup(2, batch_size=4)
    with pytest.raises(DataFormatError, match=r"validation has fewer than 2\. .*train 1, "):
        setup(2, batch_size=4, drop_last=False)
    # Before a trainer exists, train.py tells the module how many processes will start.
    early = SMSSpamDataModule(path=str(path), size=None, sha256=None, batch_size=4)
    early.expected_processes = 2
    with pytest.raises(DataFormatError, match=needs):
        early.setup("fit")


# ----------------------------------------------------------------------------- download


def _zip_bytes(name: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, payload)
        archive.writestr("readme", b"UCI readme")
    return buffer.getvalue()


@pytest.fixture
def server(sms_file) -> Iterator[str]:
    """A local HTTP server with a good zip, a truncated transfer, a wrong file and a 404."""
    good = _zip_bytes("SMSSpamCollection", sms_file.read_bytes())
    wrong = _zip_bytes("SMSSpamCollection", sms_file.read_bytes().replace(b"FREE", b"free"))
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hits.append(self.path)
            if self.path == "/good.zip":
                body, claimed = good, len(good)
            elif self.path == "/truncated.zip":
                body, claimed = good[: len(good) // 3], len(good)
            elif self.path == "/wrong.zip":
                body, claimed = wrong, len(wrong)
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(claimed))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    server.hits = hits
    yield base
    httpd.shutdown()
    httpd.server_close()


def test_download_extracts_and_verifies(tmp_path, server, sms_file):
    path = ensure_sms_file(data_dir=tmp_path, urls=[f"{server}/good.zip"])
    assert path == tmp_path / "SMSSpamCollection"
    assert path.read_bytes() == sms_file.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SMSSpamCollection"]
    # A present, verified file is used with no network at all.
    assert ensure_sms_file(data_dir=tmp_path, urls=["http://127.0.0.1:9/unreachable"]) == path


def test_a_table_given_to_the_sms_data_says_to_add_data_files(tmp_path, sms_file):
    """The first thing a user with a CSV of their own may type: ``data.path=reviews.csv``
    without ``data=files`` (it failed as "line 1: no tab between label and text")."""
    table = tmp_path / "reviews.csv"
    table.write_text("text,label\ngreat film,pos\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"reviews.csv is a .csv table, .* add data=files"):
        ensure_sms_file(table, data_dir=tmp_path)
    named_csv = tmp_path / "sms.csv"  # the SMS format under another name is still read
    named_csv.write_bytes(sms_file.read_bytes())
    assert ensure_sms_file(named_csv, data_dir=tmp_path) == named_csv


def test_download_falls_back_to_the_mirror(tmp_path, server):
    path = ensure_sms_file(data_dir=tmp_path, urls=[f"{server}/gone.zip", f"{server}/good.zip"])
    assert path.is_file()


def test_interrupted_download_leaves_no_file(tmp_path, server):
    with pytest.raises(DownloadError, match=r"(?s)interrupted|IncompleteRead.*data.path="):
        ensure_sms_file(data_dir=tmp_path, urls=[f"{server}/truncated.zip"])
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path, server):
    with pytest.raises(ChecksumError, match=r"sha256 .* expected 7d039a24.*delete .* data.path="):
        ensure_sms_file(data_dir=tmp_path, urls=[f"{server}/wrong.zip"])
    assert list(tmp_path.iterdir()) == []


def test_corrupted_cached_file_is_an_error(tmp_path, sms_file):
    (tmp_path / "SMSSpamCollection").write_bytes(sms_file.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="477,897 bytes, expected 477,907; delete"):
        ensure_sms_file(data_dir=tmp_path, urls=[])


def test_no_file_and_no_network_says_where_to_put_it(tmp_path):
    with pytest.raises(DownloadError, match=r"put the UCI file at .*SMSSpamCollection"):
        ensure_sms_file(data_dir=tmp_path, urls=["http://127.0.0.1:9/none.zip"])


def test_local_zip_path_is_extracted(tmp_path, sms_file):
    zip_path = tmp_path / "sms.zip"
    zip_path.write_bytes(_zip_bytes("SMSSpamCollection", sms_file.read_bytes()))
    path = ensure_sms_file(zip_path, data_dir=tmp_path / "data")
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("7d039a24")


# ----------------------------------------------------------------------------- data module


def _datamodule(sms_file: Path, **kwargs) -> SMSSpamDataModule:
    dm = SMSSpamDataModule(path=str(sms_file), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batches_in_every_padding_mode(sms_file):
    for padding in ("batch", "longest_train", "context"):
        dm = _datamodule(sms_file, padding=padding, context_length=1024, book_compat=True)
        batch = next(iter(dm.train_dataloader()))
        assert batch["input_ids"].shape[0] == 8
        assert batch["labels"].tolist() == [int(y) for y in batch["labels"]]
        width = batch["input_ids"].shape[1]
        if padding == "batch":
            assert width == int(batch["lengths"].max())
        elif padding == "longest_train":
            assert width == 120  # the book's longest training message
        else:
            assert width == 1024
        for row, length in zip(batch["input_ids"], batch["lengths"]):
            assert (row[length:] == 50256).all()
        val = next(iter(dm.val_dataloader()))
        assert val["input_ids"].shape[1] == (width if padding != "batch" else val["lengths"].max())


def test_longest_train_truncates_other_splits_like_the_book(sms_file):
    dm = _datamodule(sms_file, padding="longest_train", book_compat=True)
    assert dm.pad_to == 120
    for split in ("validation", "test"):
        assert max(len(ids) for ids in dm.datasets[split].token_ids) <= 120
        assert next(iter(dm.eval_dataloader(split)))["input_ids"].shape[1] == 120


def test_truncation_keeps_the_chosen_end(sms_file, caplog):
    right = _datamodule(sms_file, max_length=10, truncation_side="right")
    left = _datamodule(sms_file, max_length=10, truncation_side="left")
    full = _datamodule(sms_file)
    for i in range(20):
        ids = full.datasets["train"].token_ids[i]
        assert right.datasets["train"].token_ids[i].tolist() == ids[:10].tolist()
        assert left.datasets["train"].token_ids[i].tolist() == ids[-10:].tolist()
    assert "were longer than 10 tokens and were truncated" in caplog.text


def test_splits_are_saved_as_csv(sms_file, tmp_path):
    dm = _datamodule(sms_file, splits_dir=str(tmp_path / "splits"))
    for name, expected in (("train", 1045), ("validation", 149), ("test", 300)):
        with (tmp_path / "splits" / f"{name}.csv").open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["Label", "Text"]
        assert len(rows) == expected + 1
        split = getattr(dm.splits, name)
        assert [(r[1], int(r[0])) for r in rows[1:]] == split


def test_a_run_whose_data_changed_is_not_resumed_or_evaluated_on_another_split(sms_file, tmp_path):
    """The run's split files are written once: a resume or eval.py that would make another
    split from an edited file fails instead (it once trained on, and overwrote, the new one)."""
    from omegaconf import OmegaConf

    from gpt_classifier.tasks.evaluate import split_token_ids

    data, run = tmp_path / "sms.tsv", tmp_path / "run"
    data.write_bytes(sms_file.read_bytes())
    first = _datamodule(data, splits_dir=str(run / "splits"))
    _datamodule(data, splits_dir=str(run / "splits"))  # the same data: the same files, kept
    written = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in (run / "splits").iterdir()}
    checkpoint = run / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"datamodule_hyper_parameters": dict(first.hparams)}, checkpoint)
    with data.open("a", encoding="utf-8") as f:  # relabelled copies of spam
        f.writelines(f"ham\t{text} again\n" for text, label in first.splits.train[:60] if label)
    said = (rf"The data \({data}\) has changed since the run started: it splits differently "
            rf"from {run / 'splits'}/\w+.csv \(line \d+\)\. Restore the data, or train on it in "
            rf"a new run \(without ckpt_path\); eval.py labelled_file=")  # fmt: skip
    with pytest.raises(DataFormatError, match=said):
        _datamodule(data, splits_dir=str(run / "splits"))
    with pytest.raises(DataFormatError, match=said):
        split_token_ids(OmegaConf.create({}), checkpoint, "test")
    assert written == {f.name: hashlib.md5(f.read_bytes()).hexdigest()
                       for f in (run / "splits").iterdir()}  # fmt: skip


def test_eval_loaders_are_length_sorted_and_complete(sms_file):
    dm = _datamodule(sms_file)
    seen = 0
    previous = None
    for batch in dm.eval_dataloader("train"):
        seen += len(batch["labels"])
        longest = int(batch["lengths"].max())
        assert previous is None or longest <= previous
        previous = longest
    assert seen == 1045  # no drop_last for whole-split evaluation


def test_training_order_is_reproducible_and_bucketing_is_dense(sms_file):
    dm = _datamodule(sms_file)
    torch.manual_seed(123)
    first = [b["labels"].tolist() for b in dm.train_dataloader()]
    torch.manual_seed(123)
    assert first == [b["labels"].tolist() for b in dm.train_dataloader()]
    plain = sum(b["input_ids"].numel() for b in dm.train_dataloader())
    bucketed = _datamodule(sms_file, bucket_by_length=True)
    batches = list(bucketed.train_dataloader())
    assert len(batches) == len(bucketed.train_dataloader()) == 1045 // 8
    assert sum(b["input_ids"].numel() for b in batches) < 0.7 * plain
