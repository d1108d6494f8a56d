"""Every command in README.md and docs/ runs as written.

Commands are taken from the ```bash blocks. The inference entry points (predict, eval,
export) run for real on a trained gpt2-tiny run; `python train.py` runs for real in the
README's smoke form; every other `train.py`/`baseline.py`/`serve.py` command is composed
by Hydra with its overrides as written (a full run of gpt2-xl is hours), and a sweep's
every value is composed. Scripts that measure for minutes are checked against their own
`--help` (every flag the docs use exists). `<placeholders>` become real paths.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from importlib.metadata import metadata
from pathlib import Path

import pytest
from entry_points import ok, run_entry, run_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from gpt_classifier.tasks.command_line import check_overrides

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Commands that reach the network or never return; what the test does instead.
NOT_RUN = {
    "tensorboard": "a server that runs until stopped",
    "curl": "needs a running serve.py (tests/test_serving.py sends these requests)",
}


def doc_commands() -> list[tuple[str, str]]:
    """(page:line, command) of every command in the pages' bash blocks."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```bash\n(.*?)```", text, re.S):
            first_line = text[: match.start(1)].count("\n") + 1
            lines = match.group(1).split("\n")
            number = 0
            while number < len(lines):
                start, line = number, lines[number]
                while line.endswith("\\") and number + 1 < len(lines):
                    number += 1
                    line = line[:-1] + " " + lines[number].strip()
                number += 1
                words = shlex.split(line, comments=True)
                if words:
                    where = f"{page.relative_to(REPO)}:{first_line + start}"
                    found += [(where, " ".join(map(shlex.quote, part)))
                              for part in split_and(words)]  # fmt: skip
    return found


def split_and(words: list[str]) -> list[list[str]]:
    """``a && b`` as two commands; a trailing ``&`` dropped."""
    parts, current = [], []
    for word in [*words, "&&"]:
        if word == "&&":
            parts.append(current)
            current = []
        elif word != "&":
            current.append(word)
    return [p for p in parts if p]


COMMANDS = doc_commands()


def test_the_pages_hold_commands():
    assert len(COMMANDS) > 40
    assert {where.split(":")[0] for where, _ in COMMANDS} >= {"README.md", "docs/cluster.md"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, trained_run, sms_file) -> Path:
    """A folder as a user has it: the SMS file, a few text files, and the trained run."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "SMSSpamCollection").symlink_to(sms_file)
    (folder / "texts.txt").write_text("Sorry, I'll call later\nWINNER!! Claim your prize now\n")
    rows = sms_file.read_text(encoding="utf-8").splitlines()[:20]
    (folder / "my_sms.tsv").write_text("\n".join(rows) + "\n")
    (folder / "data.tsv").write_text("\n".join(rows) + "\n")
    labelled = [dict(zip(("label", "text"), row.split("\t", 1))) for row in rows]
    (folder / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    write_own_data(folder, sms_file)
    return folder


def write_own_data(folder: Path, sms_file: Path) -> None:
    """The files the README's "Your own data" commands name, from SMS messages in three
    classes (spam, and short or long ham)."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt_classifier.data.sms import parse_messages

    rows = []
    for m in parse_messages(sms_file, {"ham": 0, "spam": 1})[:600]:
        label = 2 if m.label == "spam" else 1 if len(m.text) < 40 else 0
        rows.append((m.text, label))
    with (folder / "reviews.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((text, ["long", "short", "spam"][label]) for text, label in rows)
    for name, part in (("train.jsonl", rows[:450]), ("test.jsonl", rows[450:])):
        lines = [json.dumps({"review": text, "rating": label + 1}) for text, label in part]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    from datasets import ClassLabel, Dataset, Features, Value

    # data.name=ag_news: run here on a save_to_disk folder of that name (no network).
    topics = ["World", "Sports", "Business", "Sci/Tech"]
    features = Features({"text": Value("string"), "label": ClassLabel(names=topics)})
    Dataset.from_dict({"text": [t for t, _ in rows], "label": [i % 4 for i in range(len(rows))]},
                      features=features).save_to_disk(folder / "ag_news")  # fmt: skip
    names = ["world", "sports", "business"]
    pq.write_table(pa.table({"title": [t[:20] for t, _ in rows], "body": [t[20:] for t, _ in rows],
                             "label": [names[label] for _, label in rows]}),
                   folder / "news.parquet")  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sms_file) -> Path:
    """A briefly trained gpt2-tiny LoRA run, for the commands that need one."""
    out = tmp_path_factory.mktemp("lora")
    ok(run_train(out, sms_file, "freeze=lora", "trainer.max_epochs=1"))
    return out / "run"


def fill(word: str, run: Path, folder: Path) -> str:
    """A word with its ``<placeholder>`` replaced by something real."""
    key, _, value = word.partition("=")
    if "<" not in value:
        return word
    if key in ("ckpt_path", "hydra.run.dir"):
        return f"{key}={run}"
    if key == "hydra.launcher.partition":
        return f"{key}=gpu"
    return f"{key}={folder / re.sub(r'[^A-Za-z0-9]+', '_', value).strip('_')}"


def hydra_compose(config_name: str, words: list[str]) -> None:
    """Compose ``config_name`` with the overrides as Hydra would, each sweep value too."""
    flags_with_values = {"--cfg", "-c", "--package", "-p"}
    overrides = [
        w
        for i, w in enumerate(words)
        if not w.startswith("-") and (i == 0 or words[i - 1] not in flags_with_values)
    ]
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override, word in zip(parsed, overrides):
        if override.is_sweep_override():
            sweep = override.value()
            values = sweep.list if hasattr(sweep, "list") else [sweep]
            choices.append([f"{override.get_key_element()}={v}" for v in values])
        else:
            choices.append([word])
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        for combination in itertools.product(*choices):
            compose(config_name, overrides=list(combination), return_hydra_config=True)


def check_script(words: list[str]) -> None:
    """A measuring script: it exists, and its --help knows every flag used."""
    script = REPO / words[1]
    result = run_entry(script, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--") and w != "--"):
        assert flag in result.stdout, f"{script.name} has no {flag}"


def check_pip(words: list[str]) -> None:
    extras = metadata("gpt-classifier").get_all("Provides-Extra") or []
    for word in words[2:]:
        for extra in re.findall(r"\[([^\]]+)\]", word):
            assert set(extra.split(",")) <= set(extras), f"no extra {extra}"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs(where, command, request, tmp_path):
    words = shlex.split(command)
    stdin = None
    if "|" in words:  # echo "..." | python ...: the echoed text on standard input
        cut = words.index("|")
        assert words[0] == "echo", f"{where}: how to run {command!r}?"
        stdin, words = " ".join(words[1:cut]) + "\n", words[cut + 1 :]
    if words[0] in NOT_RUN:
        pytest.skip(NOT_RUN[words[0]])
    if words[0] == "pip":
        return check_pip(words)
    if words[:3] == ["python", "-m", "pytest"]:
        return  # this suite
    assert words[0] == "python", f"{where}: how to run {command!r}?"
    entry = words[1]
    if entry.startswith("scripts/"):
        return check_script(words)
    runs = entry in ("predict.py", "eval.py", "export.py") and "hub_repo" not in command
    own_data = entry == "train.py" and {"data=files", "data=hf"} & set(words)  # workdir's files
    smoke = own_data or (entry == "train.py" and "model.pretrained=false" in words
                         and "-m" not in words)  # fmt: skip
    if not (runs or smoke):  # composed only: the placeholders need not exist
        config = {"train.py": "train", "baseline.py": "baseline", "serve.py": "serve",
                  "export.py": "export"}[entry]  # fmt: skip
        filled = [fill(w, tmp_path / "run", tmp_path) for w in words[2:]]
        check_overrides(filled)  # what the entry point checks first
        return hydra_compose(config, filled)
    workdir = request.getfixturevalue("workdir")
    run = request.getfixturevalue("lora_run" if "ckpt_path=<lora-run>" in words else "trained_run")
    filled = [fill(w, run, tmp_path) for w in words[2:]]
    command_line = [REPO / entry, *filled, f"hydra.run.dir={tmp_path / 'out'}"]
    if smoke:  # its own cache, and a quiet log
        command_line += [
            f"paths.cache_dir={tmp_path / 'cache'}",
            "callbacks.progress_bar.refresh_rate=0",
        ]
    if own_data:  # as written, on the smallest model, briefly
        command_line += ["model=gpt2-tiny", "trainer.max_epochs=1"]
    result = run_entry(*command_line, cwd=workdir, input=stdin or "")
    assert result.returncode == 0, f"{where}: {command}\n{result.stderr[-3000:]}"
    if smoke:
        assert (tmp_path / "out" / "metrics.json").is_file()


def test_install_sizes_cover_every_extra():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    result = run_entry("scripts/install_sizes.py", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| ")}  # fmt: skip
    assert {f"`.[{extra}]` adds" for extra in extras if extra != "dev"} <= set(rows), rows
    base = rows["base (`pip install -e .`, CPU torch)"]
    assert "torch" in base and float(base.split("|")[2].replace(",", "")) > 500
