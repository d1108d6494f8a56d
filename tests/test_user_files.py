"""Files users give: folders, damaged zips, byte-order marks and other encodings are
named with what to do, never read as something else."""

from __future__ import annotations

import zipfile

import pytest

from gpt_classifier.data.sms import DataFormatError, ensure_sms_file
from gpt_classifier.tasks.evaluate import read_labelled_file
from gpt_classifier.tasks.predict import read_input

BOM = "\ufeff"


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"data.path={tmp_path} is a folder"):
        ensure_sms_file(tmp_path, tmp_path / "data")
    with pytest.raises(IsADirectoryError, match=f"input={tmp_path} is a folder"):
        read_input(tmp_path)[0]
    with pytest.raises(IsADirectoryError, match=f"labelled_file={tmp_path} is a folder"):
        read_labelled_file(tmp_path, ["ham", "spam"])


def test_a_truncated_zip_is_not_read_as_text(tmp_path, sms_file):
    whole = tmp_path / "sms.zip"
    with zipfile.ZipFile(whole, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(sms_file, "SMSSpamCollection")
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    with pytest.raises(DataFormatError, match="starts like a zip archive .* download it again"):
        ensure_sms_file(cut, tmp_path / "data")
    with pytest.raises(ValueError, match="is a zip archive, not text"):
        read_input(cut)[0]


def test_texts_in_another_encoding_name_the_file_and_line(tmp_path):
    latin = tmp_path / "texts.txt"
    latin.write_bytes("fine\ncaf\xe9 at 5\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin}, line 2: bytes b'\\xe9' are not UTF-8"):
        read_input(latin)[0]


def test_a_byte_order_mark_is_not_part_of_the_first_column_or_text(tmp_path):
    csv_file = tmp_path / "texts.csv"
    csv_file.write_text(BOM + "text,id\nhello there,1\n", encoding="utf-8")
    assert read_input(csv_file)[0] == ["hello there"]
    txt = tmp_path / "texts.txt"
    txt.write_text(BOM + "first\nsecond\n", encoding="utf-8")
    assert read_input(txt)[0] == ["first", "second"]
    jsonl = tmp_path / "texts.jsonl"  # JSON lines are records, not texts
    jsonl.write_text('{"id": 1, "text": "hello there"}\n{"id": 2, "text": "bye"}\n')
    assert read_input(jsonl)[0] == ["hello there", "bye"]
    assert read_input(jsonl) == (["hello there", "bye"], [{"id": 1}, {"id": 2}])
    with pytest.raises(ValueError, match=r"texts.jsonl has no column 'body'; its columns are "
                                         r"\['id', 'text'\]. Set column=<name>"):  # fmt: skip
        read_input(jsonl, "body")[0]
    jsonl.write_text('{"text": "hello"}\n{"text": 42}\n')  # mixed types: no quotes added
    assert read_input(jsonl)[0] == ["hello", "42"]
    two = tmp_path / "two.csv"  # several text columns, joined as training joins them
    two.write_text("title,body,id\nWin,a prize now,1\nLunch,at noon?,2\n", encoding="utf-8")
    assert read_input(two, ["title", "body"], " | ")[0] == ["Win | a prize now", "Lunch | at noon?"]
    two.write_text("title,body\nWin,\n", encoding="utf-8")
    assert read_input(two, ["title", "body"])[0] == ["Win "]  # an empty field is text too
    with pytest.raises(ValueError, match=r"the text \(body\) is empty or missing in rows \[1\]"):
        read_input(two, "body")[0]
    two.write_text("title,body\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"two.csv has no rows: nothing to classify"):
        read_input(two, "body")[0]
    two.write_text("text,id,text\nhello,1,there\n", encoding="utf-8")  # which text?
    with pytest.raises(ValueError, match=r"two.csv: the header names 'text' more than once"):
        read_input(two)[0]
    (empty := tmp_path / "texts.txt").write_text("")
    with pytest.raises(ValueError, match=r"texts.txt is empty: nothing to classify"):
        read_input(empty)  # 0 predictions were written without a word
    labelled = tmp_path / "labelled.csv"
    labelled.write_text(BOM + "Label,Text\nspam,win now\nham,see you\n", encoding="utf-8")
    assert read_labelled_file(labelled, ["ham", "spam"]) == (["win now", "see you"], [1, 0])


def test_what_a_run_and_an_export_write_others_can_read(trained_run, tmp_path):
    # Files get 0666 less the user's umask (0644 under 022), whatever wrote them
    # (safetensors alone would make its files 0600).
    import os

    from gpt_classifier.inference import TextClassifier

    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    clf = TextClassifier.load(trained_run)
    exported = [clf.export(tmp_path / fmt, format=fmt) for fmt in ("native", "hf")]
    for folder in (trained_run / "checkpoints", *exported):
        for file in folder.iterdir():
            assert file.stat().st_mode & 0o777 == want, (file, oct(file.stat().st_mode))


def test_a_quote_that_would_merge_rows_or_drop_quotes_names_its_line(tmp_path):
    fine = tmp_path / "fine.tsv"  # quotes as CSV writers write them, and inside a text
    fine.write_text('text\tid\n"He said ""hi"""\t1\nsays "so\t2\n', encoding="utf-8")
    assert read_input(fine)[0] == ['He said "hi"', 'says "so']
    merging = tmp_path / "merging.tsv"  # read leniently: one text of lines 2 and 3
    merging.write_text('text\tid\n"hi there\t1\nsecond "row\t2\nthird\t3\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"merging.tsv, line 3: a text goes on after its "
                                         r"closing quote"):  # fmt: skip
        read_input(merging)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('text\nfine\n"hi there\nsecond\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"unclosed.csv, line 3: a quote \(\"\) opens a text "
                                         r"that none closes"):  # fmt: skip
        read_input(unclosed)
