"""data=files: a user's own CSV/JSONL/Parquet files, any labels, any number of classes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from entry_points import ok, run_entry
from omegaconf import OmegaConf

from gpt_classifier.data.files import FilesDataModule
from gpt_classifier.data.sms import DataFormatError, parse_messages

LABELS = ["long", "short", "spam"]


def three_classes(sms_file: Path) -> list[dict[str, str]]:
    """The SMS messages with three labels: spam, and ham split by length."""
    rows = []
    for message in parse_messages(sms_file, {"ham": 0, "spam": 1}):
        label = "spam" if message.label == "spam" else "short" if len(message.text) < 40 else "long"
        rows.append({"text": message.text, "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], bom: bool = False) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def train_args(tmp_path: Path, *data: str) -> list[str]:
    return ["train.py", "model=gpt2-tiny", "accelerator=cpu", "data=files", *data,
            "trainer.max_epochs=1", "trainer.precision=32-true",
            f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "callbacks.progress_bar.refresh_rate=0"]  # fmt: skip


def test_a_three_class_csv_trains_splits_stratified_and_predicts_by_name(tmp_path, sms_file):
    rows = three_classes(sms_file)[:1500]
    renamed = [{"message": r["text"], "label": r["label"]} for r in rows]
    data = write_csv(tmp_path / "messages.csv", renamed, bom=True)  # as Excel saves it
    ok(run_entry(*train_args(tmp_path, f"data.path={data}", "data.text_column=message")))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/examples"] + metrics["val/examples"] + metrics["train/examples"] == 1500
    counts = {label: sum(r["label"] == label for r in rows) for label in LABELS}
    with (run / "splits" / "test.csv").open(encoding="utf-8", newline="") as f:
        test = [int(r["Label"]) for r in csv.DictReader(f)]
    for index, label in enumerate(LABELS):  # each label's share, within one row
        assert abs(test.count(index) - 0.2 * counts[label]) <= 1, (label, test.count(index))
    # predict.py reads the run's text column (message) from a file of the same kind.
    new = write_csv(tmp_path / "new.csv", [{"id": "7", "message": "hello there", "label": "x"}])
    ok(run_entry("predict.py", f"ckpt_path={run}", f"input={new}",
                 f"hydra.run.dir={tmp_path / 'predict'}"))  # fmt: skip
    with (tmp_path / "predict" / "predictions.csv").open(encoding="utf-8", newline="") as f:
        (predicted,) = list(csv.DictReader(f))
    assert predicted["text"] == "hello there" and predicted["label"] in LABELS
    # The input's other columns follow, its own label as file_label, to join back by id.
    assert (predicted["id"], predicted["file_label"]) == ("7", "x")
    # eval.py rebuilds the run's test split from the CSV, as training made it.
    ok(run_entry("eval.py", f"ckpt_path={run}", f"hydra.run.dir={tmp_path / 'eval'}"))
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["examples"] == metrics["test/examples"]
    assert evaluated["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_pre_split_jsonl_files_are_used_as_given(tmp_path, sms_file):
    rows = three_classes(sms_file)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:600])
    test = write_jsonl(tmp_path / "test.jsonl", rows[600:800])
    module = FilesDataModule(files={"train": str(train), "test": str(test)},
                             splits_dir=str(tmp_path / "splits"))  # fmt: skip
    splits = module.load_splits()
    assert module.label_names == LABELS
    assert len(splits.test) == 200  # as given
    assert len(splits.train) + len(splits.validation) == 600  # validation split off train
    assert {label for _, label in splits.validation} == {0, 1, 2}
    assert (tmp_path / "splits" / "validation.csv").is_file()


def test_labels_fix_the_order_and_num_classes_follows_them(tmp_path, sms_file):
    rows = three_classes(sms_file)[:900]
    data = write_csv(tmp_path / "m.csv", rows)
    module = FilesDataModule(path=str(data), labels=["spam", "short", "long"])
    module.load_splits()
    assert module.label_names == ["spam", "short", "long"]
    said = r"row \d+ \(data rows counted from 1\): label 'long' is not one of data.labels's"
    with pytest.raises(DataFormatError, match=said + r" \['spam', 'short'\]; the file's other "
                       r"labels: \['long'\] \(data.labels names labels as the file"):  # fmt: skip
        FilesDataModule(path=str(data), labels=["spam", "short"]).load_splits()
    # Numbers in the file, names in data.labels: the error shows the file's labels.
    numbers = write_csv(tmp_path / "n.csv", [{"text": f"t{i}", "label": i % 2} for i in range(40)])
    with pytest.raises(DataFormatError, match=r"label '0' is not one of data.labels's \['neg', "
                       r"'pos'\]; the file's other labels: \['0', '1'\]"):  # fmt: skip
        FilesDataModule(path=str(numbers), labels=["neg", "pos"]).load_splits()


def test_multiple_text_columns_are_joined(tmp_path):
    rows = [{"title": f"t{i}", "body": f"b{i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    data = write_csv(tmp_path / "m.csv", rows)
    module = FilesDataModule(path=str(data), text_column=["title", "body"], text_separator=": ")
    texts = {text for text, _ in module.load_splits().train}
    assert texts <= {f"t{i}: b{i}" for i in range(40)} and texts


@pytest.mark.parametrize(
    ("content", "name", "says"),
    [
        ("message,label\nhi,a\n", "m.csv", r"no column \['text'\] \(set data.text_column\); "
                                           r"its columns are \['message', 'label'\]"),
        ("text,text,label,,\nhi,yo,a,,\n", "m.csv", r"the header names 'text' more than once; "
                                                  r"give each column its own name"),
        ("sentence,sentiment\nhi,a\n", "m.csv", r"no column \['text', 'label'\] \(set "
                                                  r"data.text_column and data.label_column\)"),
        ("ham\tGo until jurong point\nspam\tFree entry\n", "m.tsv",
         r"its columns are \['ham', 'Go until jurong point'\]; its first row looks like data: add "
         r"a header row naming the columns"),
        ("text,label\nhi,a\n,b\n   ,a\nyo,\n", "m.csv",
         r"2 row\(s\) with an empty text: rows 2, 3; 1 row\(s\) with an empty 'label': rows 4"),
        ('{"text": "hi", "label": "a"}\n{"text": null, "label": "b"}\n', "m.jsonl",
         r"1 row\(s\) with a null text \(text\): rows 2"),
        ("text;label\nhi;a\n", "m.csv", r"its columns are \['text;label'\]; the header is "
                                         r"separated by ';': save the file with commas"),
        ("text,label\nhi,a\n", "m.txt", r"the suffix '.txt' is not one of .csv, .tsv.*; rename"),
        ("PK\x03\x04", "m.xlsx", r"not one of .*; a spreadsheet: save it as CSV UTF-8"),
        ("PK\x03\x04", "m.csv", r"is a zip archive; unzip it .*, or, if it is a spreadsheet"),
        ("", "m.csv", r"data.path=.*m.csv is empty$"),
        ('{"text": "hi", "label": ["a", "b"]}\n{"text": "yo", "label": ["a"]}\n', "m.jsonl",
         r"2 row\(s\) with a list or record as 'label' \(multi-label data is not supported: "
         r"give each row one label\): rows 1, 2"),
        ("text,label\n", "m.csv", r"data.path=.*m.csv has no rows$"),
        ('{"text": {"0": "hi", "1": "yo"}, "label": {"0": "a", "1": "b"}}', "m.json",
         r"m.json is one JSON object \(text, label\), not a row per record: write a list of "
         r"records, or JSON lines \(pandas: df.to_json\(path, orient='records', lines=True\)"),
        ('{"data": [{"text": "hi", "label": "a"}]}', "m.json", r"is one JSON object \(data\)"),
        ('{"text": ["hi", "yo"], "label": "a"}\n', "m.jsonl",
         r"1 row\(s\) with a list or record as text \(text\): make it one string: rows 1"),
        ("text,label\nhi,a\nhi, you,b\n", "m.csv", r"Expected 2 fields in line 3, saw 3; put a "
                                                  r"text that holds the separator in quotes"),
        ('text,label\nfine,a\nsecond,b\n"third,a\nlast,b\n', "m.csv",
         r"m.csv, line 4: a quote \(\"\) opens a text that none closes: the rows after it would "
         r"become part of it; put the whole text in quotes and double every quote in it"),
        ('text\tlabel\n"hi there\ta\nsecond "row\tb\nthird\ta\n', "m.tsv",  # pandas: 2 rows
         r"m.tsv, line 3: a text goes on after its closing quote \(\"\): it would lose its "
         r'quotes; .* \("He said ""hi"""\), as CSV writers do'),
        ("\n\n", "m.jsonl", r"data.path=.*m.jsonl has no rows$"),
        ('{"text": "hi", "label": "a"\n', "m.jsonl", r"could not be read as jsonl"),
        ('{"text": "hi", "label": "a"}\n' * 3 + '{"text": "yo", "label": "b",}\n', "m.jsonl",
         r"m.jsonl could not be read as jsonl: line 4: not JSON \(Expecting property name"),
        ('"hi"\n"yo"\n', "m.jsonl", r"m.jsonl could not be read as jsonl: line 1: a JSON string, "
                                   r"not a record: write one object a line"),
        ('\ufeff{"text": "hi", "label": "a"}\n', "m.jsonl",
         r"m.jsonl starts with a UTF-8 byte-order mark, which JSON readers refuse; re-save"),
        ("text,label\n" + "".join(f"t{i},a\n" for i in range(30)) + "x,b\ny,b\n", "m.csv",
         r"1 of 2 label\(s\) have too few rows to split stratified into train/validation/test, "
         r"which needs at least 10 each: 'b' \(2\); add rows"),
        ("text,label\n" + "".join(f"t{i},{i / 7:.3f}\n" for i in range(300)), "m.csv",
         r"300 of 300 label\(s\) have too few .*: '0.000' \(1\), '0.143' \(1\), .*'1.286' \(1\), "
         r"\.\.\.; .* with 300 distinct labels, are they numbers to predict\?"),
    ],
)  # fmt: skip
def test_bad_files_are_named_with_the_row_and_column(tmp_path, content, name, says):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=says):
        FilesDataModule(path=str(path)).load_splits()


@pytest.mark.parametrize(
    ("name", "content"),
    [("m.csv", b"text,label\nhi,a\nbad \xff byte,b\n"),
     ("m.jsonl", b'{"text": "hi", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')],
)  # fmt: skip
def test_bytes_that_are_not_utf8_are_named_with_their_line(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    line, raw = (3, r"b'\\xff'") if name == "m.csv" else (2, r"b'\\xe9'")
    said = rf"data.path={path}, line {line}: bytes {raw} are not UTF-8; re-save the file as UTF-8"
    with pytest.raises(DataFormatError, match=said):
        FilesDataModule(path=str(path)).load_splits()


def test_a_folder_where_a_file_belongs_is_named(tmp_path):
    (tmp_path / "train.csv").mkdir()
    with pytest.raises(IsADirectoryError, match=r"data.files.train=.*train.csv is a folder"):
        FilesDataModule(files={"train": str(tmp_path / "train.csv")}).load_splits()


def test_a_label_in_test_that_training_lacks_is_refused(tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"text": f"t{i}", "label": "ab"[i % 2]}
                                                for i in range(30)])  # fmt: skip
    test = write_csv(
        tmp_path / "test.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}]
    )
    said = (
        r"data.files.test=.*test.csv, row 2 \(data rows counted from 1\): label 'c' is not "
        r"one of the training data's"
    )
    with pytest.raises(DataFormatError, match=said + r" \['a', 'b'\]"):
        FilesDataModule(files={"train": str(train), "test": str(test)}).load_splits()


def test_num_classes_that_disagrees_with_the_data_names_both(tmp_path, sms_file):
    data = write_csv(tmp_path / "m.csv", three_classes(sms_file)[:300])
    result = run_entry(*train_args(tmp_path, f"data.path={data}", "classifier.num_classes=2"))
    assert result.returncode != 0
    assert "classifier.num_classes=2, but the data has 3 labels" in result.stderr


def test_class_weights_auto_weigh_the_training_loss_by_inverse_frequency(tmp_path, sms_file):
    rows = three_classes(sms_file)[:900]  # imbalanced: mostly long or short ham
    data = write_csv(tmp_path / "m.csv", rows)
    ok(run_entry(*train_args(tmp_path, f"data.path={data}", "classifier.class_weights=auto")))
    from gpt_classifier.training.module import ClassifierModule

    module = ClassifierModule.load_from_checkpoint(tmp_path / "run")
    with (tmp_path / "run" / "splits" / "train.csv").open(encoding="utf-8", newline="") as f:
        labels = [int(r["Label"]) for r in csv.DictReader(f)]
    counts = [labels.count(i) for i in range(3)]
    want = [len(labels) / (3 * count) for count in counts]
    assert module.hparams.class_weights == pytest.approx(want)
    assert sum(w * c for w, c in zip(want, counts)) == pytest.approx(len(labels))  # mean 1
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    module.metrics["split_train"].reset()
    batch = {"input_ids": None, "lengths": None, "labels": targets}
    module.forward = lambda batch: logits  # the loss alone, on known logits
    loss, _ = module._step(batch, "train")
    weighted = torch.nn.functional.cross_entropy(logits, targets, weight=torch.tensor(want))
    assert float(loss) == pytest.approx(float(weighted), rel=1e-6)
    unweighted, _ = module._step(batch, "val")  # validation and test stay unweighted
    assert float(unweighted) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, targets)), rel=1e-6
    )
    wrong = run_entry(*train_args(tmp_path / "w", f"data.path={data}",
                                  "classifier.class_weights=[1,2]"))  # fmt: skip
    assert wrong.returncode != 0 and "give 3 positive numbers, one per class" in wrong.stderr


def test_a_hugging_face_dataset_keeps_its_class_names_and_maps_its_splits(tmp_path, sms_file):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from gpt_classifier.data.files import HubDataModule

    rows = three_classes(sms_file)[:700]
    names = ["spam", "short", "long"]  # the ClassLabel's order, not sorted
    features = Features({"sms": Value("string"), "label": ClassLabel(names=names)})

    def table(part):
        return Dataset.from_dict({"sms": [r["text"] for r in part],
                                  "label": [names.index(r["label"]) for r in part]},
                                 features=features)  # fmt: skip

    folder = tmp_path / "saved"
    DatasetDict({"train": table(rows[:500]), "dev": table(rows[500:])}).save_to_disk(folder)
    module = HubDataModule(name=str(folder), text_column="sms",
                           split_names={"validation": "dev", "test": None})  # fmt: skip
    splits = module.load_splits()
    assert module.label_names == names
    assert len(splits.validation) == 200  # dev, as given
    assert len(splits.train) + len(splits.test) == 500  # test split off train
    assert splits.validation[0] == (rows[500]["text"], names.index(rows[500]["label"]))
    # eval.py rebuilds a run's split from the data settings its checkpoint keeps.
    from gpt_classifier.tasks.evaluate import split_token_ids

    torch.save({"datamodule_hyper_parameters": dict(module.hparams)}, tmp_path / "run.ckpt")
    module.setup("test")
    ids, labels = split_token_ids(OmegaConf.create({}), tmp_path / "run.ckpt", "validation")
    assert labels == module.datasets["validation"].labels.tolist()
    assert ids == [x.tolist() for x in module.datasets["validation"].token_ids]
    with pytest.raises(DataFormatError, match=r"has the splits \['train', 'dev'\], none of them "
                                              r"data.split_names.train=training"):  # fmt: skip
        HubDataModule(name=str(folder), text_column="sms",
                      split_names={"train": "training"}).load_splits()  # fmt: skip
    # A hidden test set (GLUE's): labels -1, which must not be read as the last name.
    hidden = Dataset.from_dict({"sms": ["?"] * 9, "label": [-1] * 9}, features=features)
    DatasetDict({"train": table(rows[:500]), "test": hidden}).save_to_disk(tmp_path / "glue")
    said = r"split test: 9 row\(s\) with no label \('label' -1 .*split_names.test=null splits"
    with pytest.raises(DataFormatError, match=said):
        HubDataModule(name=str(tmp_path / "glue"), text_column="sms").load_splits()


def test_an_unknown_dataset_name_offline_says_what_loads_offline(monkeypatch):
    from huggingface_hub import constants

    from gpt_classifier.data.files import HubDataModule

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(DataFormatError, match=r"data.name=nobody/no-such-dataset could not be "
                                              r"loaded .* only cached datasets load"):  # fmt: skip
        HubDataModule(name="nobody/no-such-dataset").load_splits()


def test_a_dataset_that_does_not_load_online_says_what_to_check(monkeypatch):
    import datasets
    from huggingface_hub import constants

    from gpt_classifier.data.files import HubDataModule

    def unreachable(*args, **kwargs):  # what the Hub's client raises after its retries
        raise ConnectionError("Couldn't reach 'nobody/no-such-dataset' on the Hub")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    said = (
        r"could not be loaded \(ConnectionError: .*\)\. Check the name "
        r"\(https://huggingface.co/datasets/nobody/no-such-dataset\), the network"
    )
    with pytest.raises(DataFormatError, match=said):
        HubDataModule(name="nobody/no-such-dataset").load_splits()


def test_data_path_and_a_file_of_a_split_are_not_both_taken(tmp_path):
    """data.path with data.files.test: the test file was ignored without a word."""
    data = write_csv(tmp_path / "all.csv", [{"text": f"t{i}", "label": "ab"[i % 2]}
                                           for i in range(40)])  # fmt: skip
    said = (
        rf"data.path={data} and data.files.test=test.csv are both given: .* give "
        rf"data.files.train={data} data.files.test=test.csv \(a missing split"
    )
    with pytest.raises(ValueError, match=said):
        FilesDataModule(path=str(data), files={"train": None, "test": "test.csv"})


def test_own_data_keys_without_data_files_say_to_add_it():
    """``data.text_column=review`` without ``data=files``: Hydra's fix is ``+data.text_column``,
    which the SMS data module does not take."""
    from gpt_classifier.tasks.components import build
    from gpt_classifier.tasks.errors import ConfigError

    cfg = OmegaConf.create({"data": {"_target_": "gpt_classifier.data.datamodule.SMSSpamDataModule",
                                     "path": "reviews.csv", "text_column": "review"}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^data: .*'text_column' \(the keys of your own data "
                                          r"need data=files or data=hf\)"):  # fmt: skip
        build(cfg, "data")


def test_texts_in_two_splits_are_counted_and_warned_about(tmp_path, caplog):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(40)]
    train = write_csv(tmp_path / "train.csv", rows)
    test = write_csv(tmp_path / "test.csv", rows[:3] + [{"text": "new", "label": "a"}])
    with caplog.at_level("WARNING", logger="gpt_classifier.data.files"):
        FilesDataModule(files={"train": str(train), "test": str(test)}).load_splits()
    assert "3 text(s) appear in more than one split" in caplog.text


def test_csv_cells_are_read_as_written(tmp_path):
    """Not parsed as numbers or missing values: '007' is not 7.0, and 'NA' is not empty."""
    labels, texts = ["007", "NA", "010", "null"], ["N/A", "00042", "1e3", "None"]
    rows = [{"text": f"{texts[i % 4]}", "label": labels[i % 4]} for i in range(80)]
    data = FilesDataModule(path=str(write_csv(tmp_path / "codes.csv", rows)))
    splits = data.load_splits()
    assert data.label_names == ["007", "010", "NA", "null"]
    read = {(text, data.label_names[label]) for _, split in splits.items() for text, label in split}
    assert read == {(row["text"], row["label"]) for row in rows}


def test_json_labels_of_mixed_types_are_read_as_written(tmp_path):
    """1 and "1" are one label, and "b" has no quotes (🤗 keeps such a column as JSON text)."""
    rows = [{"text": f"t{i}", "label": [1, "1", "b"][i % 3]} for i in range(90)]
    data = FilesDataModule(path=str(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    data.load_splits()
    assert data.label_names == ["1", "b"]


def test_number_labels_are_ordered_by_value(tmp_path):
    rows = [{"text": f"t{i}", "label": [10, 2, 1, -1][i % 4]} for i in range(80)]
    data = FilesDataModule(path=str(write_csv(tmp_path / "stars.csv", rows)))
    data.load_splits()
    assert data.label_names == ["-1", "1", "2", "10"]  # not "-1", "1", "10", "2"


def test_labels_written_two_ways_stay_apart_and_are_warned_about(tmp_path, caplog):
    labels = ["spam", "spam ", "Ham", "ham"]
    path = write_csv(tmp_path / "m.csv", [{"text": f"t{i}", "label": labels[i % 4]}
                                          for i in range(80)])  # fmt: skip
    with caplog.at_level("WARNING", logger="gpt_classifier.data.files"):
        data = FilesDataModule(path=str(path))
        data.load_splits()
    assert data.label_names == ["Ham", "ham", "spam", "spam "]  # as given
    for pair in ("['Ham', 'ham']", "['spam', 'spam ']"):
        said = f"the labels {pair} differ only in case or spaces, so they are 2 classes"
        assert said in caplog.text


def test_a_fixed_label_no_training_row_has_is_warned_about(tmp_path, caplog):
    path = write_csv(tmp_path / "m.csv", [{"text": f"t{i}", "label": "ab"[i % 2]}
                                          for i in range(40)])  # fmt: skip
    with caplog.at_level("WARNING", logger="gpt_classifier.data.files"):
        data = FilesDataModule(path=str(path), labels=["a", "b", "c"])
        data.load_splits()
    assert data.label_names == ["a", "b", "c"]  # kept: the head has a class for it
    assert "no training row has the label(s) ['c'], so the model cannot learn them" in caplog.text


def test_eval_reads_labelled_files_in_every_format_training_takes(tmp_path):
    from gpt_classifier.tasks.evaluate import read_labelled_file, table_columns

    rows = [{"title": f"t{i}", "body": f"b{i}", "y": LABELS[i % 3]} for i in range(6)]
    texts, labels = [f"t{i} | b{i}" for i in range(6)], [i % 3 for i in range(6)]
    # The run's own columns, from its checkpoint, unless given.
    settings = {"text_column": ["title", "body"], "label_column": "y", "text_separator": " | "}
    torch.save({"datamodule_hyper_parameters": settings}, tmp_path / "run.ckpt")
    run = table_columns(OmegaConf.create({"ckpt_path": str(tmp_path / "run.ckpt")}))
    assert run == settings
    given = OmegaConf.create({"ckpt_path": str(tmp_path / "run.ckpt"), "label_column": "z"})
    assert table_columns(given)["label_column"] == "z"
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    for file in (write_jsonl(tmp_path / "m.jsonl", rows), write_csv(tmp_path / "m.csv", rows),
                 tmp_path / "m.parquet", tmp_path / "m.tsv"):  # fmt: skip
        assert read_labelled_file(file, LABELS, run) == (texts, labels), file
    # A run's split file (class indices) and the SMS format (label<TAB>text, any suffix).
    (tmp_path / "test.csv").write_text("Label,Text\n2,hello\n0,there\n", encoding="utf-8")
    assert read_labelled_file(tmp_path / "test.csv", LABELS, run) == (["hello", "there"], [2, 0])
    (tmp_path / "sms.tsv").write_text("spam\thello\nshort\tthere\n", encoding="utf-8")
    assert read_labelled_file(tmp_path / "sms.tsv", LABELS, run) == (["hello", "there"], [2, 1])
    (tmp_path / "sms.txt").write_text("spam\thello\nham\tthere\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"sms.txt, line 2: label 'ham' is not one of the "
                                              r"model's \['long', 'short', 'spam'\]$"):  # fmt: skip
        read_labelled_file(tmp_path / "sms.txt", LABELS, run)
    write_csv(tmp_path / "bad.csv", [*rows, {"title": "x", "body": "y", "y": "other"}])
    with pytest.raises(DataFormatError, match=r"bad.csv, row 7 \(data rows counted from 1\): "
                                              r"label 'other' is not one of the model's "
                                              r"\['long', 'short', 'spam'\]"):  # fmt: skip
        read_labelled_file(tmp_path / "bad.csv", LABELS, run)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_the_synthetic_dataset_script_writes_what_data_files_reads(tmp_path, suffix):
    out = tmp_path / f"texts{suffix}"
    ok(run_entry("scripts/make_text_dataset.py", "--rows", "600", "--classes", "3",
                 "--out", out))  # fmt: skip
    module = FilesDataModule(path=str(out))
    splits = module.load_splits()
    assert module.label_names == ["class_0", "class_1", "class_2"]
    assert sum(len(split) for _, split in splits.items()) == 600
    module.setup("fit")
    tokens = sum(int(d.sizes.sum()) for d in module.datasets.values())
    assert 15 < tokens / 600 < 35  # SMS-length texts (SMS messages: about 24 tokens)
