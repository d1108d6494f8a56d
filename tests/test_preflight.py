"""The pre-flight: a new user offline learns every missing piece at once, with its fix."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from entry_points import REPO, run_entry

# Imported first by the Python of the entry point: a machine with no network at all,
# whatever the machine running the tests can reach.
NO_NETWORK = """
import socket

def _refuse(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

socket.getaddrinfo = _refuse
socket.create_connection = _refuse
"""


@pytest.fixture
def offline(tmp_path) -> dict[str, str]:
    """The environment of a fresh machine offline: empty caches, no network."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    for cache in ("tiktoken", "hf"):
        (tmp_path / cache).mkdir()
    return {"PYTHONPATH": str(site), "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"),
            "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "HYDRA_FULL_ERROR": "0"}  # fmt: skip


def test_train_lists_every_missing_piece_with_its_fix_and_leaves_no_run_folder(tmp_path, offline):
    run_dir = tmp_path / "run"
    result = run_entry("train.py", f"hydra.run.dir={run_dir}",
                       f"data.data_dir={tmp_path / 'data'}", env=offline, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    said = result.stderr
    assert "Cannot start: 3 thing(s) missing" in said
    assert "GPT-2 weights 'openai-community/gpt2'" in said and "model.weights=" in said
    assert "model.pretrained=false" in said  # a smoke run
    assert "tokenizer files" in said and "TIKTOKEN_CACHE_DIR=" in said
    assert "SMS Spam Collection" in said and "data.path=" in said
    assert "Traceback" not in said + result.stdout
    assert not run_dir.exists()


def test_hydra_full_error_still_shows_the_traceback(tmp_path, offline):
    result = run_entry("train.py", f"hydra.run.dir={tmp_path / 'run'}", "model.pretrained=false",
                       f"data.data_dir={tmp_path / 'data'}",
                       env={**offline, "HYDRA_FULL_ERROR": "1"}, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "Cannot start: 2 thing(s) missing" in result.stderr


def test_a_given_data_file_and_random_weights_need_only_the_tokenizer(tmp_path, offline, sms_file):
    result = run_entry("train.py", f"hydra.run.dir={tmp_path / 'run'}", "model.pretrained=false",
                       f"data.path={sms_file}", env=offline, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "Cannot start: 1 thing(s) missing" in result.stderr
    assert "tokenizer files" in result.stderr


def test_data_files_that_do_not_exist_are_listed_with_the_rest(tmp_path, offline, sms_file):
    result = run_entry(REPO / "train.py", f"hydra.run.dir={tmp_path / 'run'}",
                       "model.pretrained=false", "data=files", f"data.files.train={sms_file}",
                       "data.files.test=tset.csv", f"data.files.validation={tmp_path / 'val.csv'}",
                       cwd=tmp_path,
                       env=offline, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Cannot start: 3 thing(s) missing" in result.stderr
    assert f"data.files.test=tset.csv does not exist (relative to {tmp_path})" in result.stderr
    assert f"data.files.validation={tmp_path / 'val.csv'} does not exist\n" in result.stderr
    assert "data.files.train" not in result.stderr and "tokenizer files" in result.stderr
    assert not (tmp_path / "run").exists()
    none = run_entry("train.py", "data=files", f"hydra.run.dir={tmp_path / 'run'}",
                     "model.pretrained=false", env=offline, timeout=120)  # fmt: skip
    assert none.returncode == 2 and "data=files names no file" in none.stderr
    assert "fix: data.path=<one file, to split>" in none.stderr
    unnamed = run_entry("train.py", "data=hf", f"hydra.run.dir={tmp_path / 'run'}",
                        "model.pretrained=false", env=offline, timeout=120)  # fmt: skip
    assert unnamed.returncode == 2 and "data=hf names no dataset" in unnamed.stderr
    assert "Traceback" not in unnamed.stderr


def test_a_hub_dataset_neither_cached_nor_reachable_is_listed_with_the_rest(tmp_path, offline):
    def missing(name):
        result = run_entry("train.py", "data=hf", f"data.name={name}", "model.pretrained=false",
                           f"hydra.run.dir={tmp_path / 'run'}", env=offline)  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr
        return result.stderr

    said = missing("someone/SmsNews")
    assert "Cannot start: 2 thing(s) missing" in said and "tokenizer files" in said
    assert ("the 🤗 dataset data.name=someone/SmsNews: not in the datasets cache and the Hub "
            "cannot be reached (HF_HUB_OFFLINE=1)") in said  # fmt: skip
    assert "fix: data.name=<a folder written by save_to_disk>" in said
    # What load_dataset built, or the Hub's files, in the caches under HF_HOME: it may load.
    (tmp_path / "hf" / "datasets" / "someone___sms_news").mkdir(parents=True)
    (tmp_path / "hf" / "hub" / "datasets--ag_news").mkdir(parents=True)
    for cached in ("someone/SmsNews", "ag_news"):
        assert "Cannot start: 1 thing(s) missing" in missing(cached)


def test_own_data_without_the_data_extra_says_what_to_install(tmp_path, offline, sms_file):
    site = Path(offline["PYTHONPATH"]) / "sitecustomize.py"
    site.write_text(site.read_text() + "\nimport sys\nsys.modules['datasets'] = None\n")
    result = run_entry("train.py", "model.pretrained=false", "data=files",
                       f"data.path={sms_file}", f"hydra.run.dir={tmp_path / 'run'}",
                       env=offline, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Cannot start: 2 thing(s) missing" in result.stderr
    assert "data=files needs datasets, which is not installed" in result.stderr
    assert 'fix: pip install -e ".[data]"' in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_extra_installed_but_broken_says_why_instead_of_to_install_it(tmp_path, monkeypatch):
    """A library built for another NumPy, say: installing the extra again changes nothing."""
    from gpt_classifier.data.tables import read_table
    from gpt_classifier.extras import import_extra

    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "__init__.py").write_text(
        "raise ImportError('pyarrow requires NumPy 2.0 or newer, found 1.24.0')\n"
    )
    (tmp_path / "half_extra.py").write_text("import absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\nfine,a\n")
    with pytest.raises(ImportError, match=rf"^data.path={data} needs datasets, which is "
                       r"installed but fails to import \(ImportError: pyarrow requires NumPy "
                       r"2.0 or newer, found 1.24.0\): repair that installation$"):  # fmt: skip
        read_table(data, "data.path")
    with pytest.raises(
        ImportError,
        match=r"^x needs half_extra, which is installed but fails to "
        r"import \(ModuleNotFoundError: No module named 'absent_dependency'\)",
    ):
        import_extra("half_extra", "data", "x")
    with pytest.raises(ImportError, match=r'^x needs surely_absent_extra, which is not installed: '
                                          r'pip install -e "\.\[data\]"$'):  # fmt: skip
        import_extra("surely_absent_extra.sub", "data", "x")


def test_own_data_with_a_broken_datasets_install_is_named_by_the_preflight(tmp_path, sms_file):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "__init__.py").write_text("raise ImportError('pyarrow breaks')\n")
    result = run_entry("train.py", "model.pretrained=false", "model=gpt2-tiny", "data=files",
                       f"data.path={sms_file}", f"hydra.run.dir={tmp_path / 'run'}",
                       env={"PYTHONPATH": str(tmp_path)}, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Cannot start: 1 thing(s) missing" in result.stderr
    assert ("data=files needs datasets, which is installed but fails to import (ImportError: "
            "pyarrow breaks)\n     fix: repair that installation") in result.stderr  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("option", "extra"), [("hparams_search=optuna", "hparams"),
                                                ("hydra/launcher=submitit_slurm", "slurm"),
                                                ("logger=mlflow", "mlflow")])  # fmt: skip
def test_an_option_whose_extra_is_missing_names_it(tmp_path, option, extra):
    """Hydra's own answer is that the option does not exist, or a traceback."""
    modules = ("hydra_plugins", "mlflow")  # hydra_plugins: no Hydra plugin installed at all
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nfor m in {modules}:\n"
                                               "    sys.modules[m] = None\n")  # fmt: skip
    result = run_entry("train.py", "-m", option, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    said = f'is not installed: pip install -e ".[{extra}]"\n'
    assert result.stderr.endswith(said), result.stderr[-2000:]


def test_resuming_a_folder_without_checkpoints_names_the_latest_run_that_has_some(tmp_path):
    runs = tmp_path / "runs"
    for name, age in (("older", 60), ("latest", 0)):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"")
        os.utime(runs / name / "checkpoints" / "last.ckpt", (time.time() - age,) * 2)
    (runs / "failed" / "checkpoints").mkdir(parents=True)  # a failed start: no checkpoint
    result = run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={runs / 'new'}", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"ckpt_path=last resumes the run in hydra.run.dir, but {runs / 'new'} holds no "
        "checkpoint" in result.stderr
    )
    assert (
        f"fix: hydra.run.dir={runs / 'latest'} (the latest run there with checkpoints)"
        in result.stderr
    )
    assert not (runs / "new").exists()


@pytest.mark.parametrize("entry", ["predict.py", "eval.py", "export.py", "serve.py"])
def test_the_model_tasks_check_their_model_path_and_tokenizer(tmp_path, offline, entry):
    missing = tmp_path / "no-such-run"
    text = ["text=hello"] if entry == "predict.py" else []
    result = run_entry(entry, f"ckpt_path={missing}", f"hydra.run.dir={tmp_path / 'out'}", *text,
                       env=offline, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Cannot start: 2 thing(s) missing" in result.stderr
    assert f"ckpt_path={missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("entry", ["predict.py", "serve.py"])
def test_a_model_task_without_ckpt_path_names_the_latest_run(tmp_path, entry):
    runs = tmp_path / "outputs" / "train" / "runs"
    for age, name in enumerate(["2026-01-02_10-00-00", "2026-01-01_09-00-00"]):  # newest last
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"")
        os.utime(runs / name / "checkpoints" / "last.ckpt", (1e9 + age, 1e9 + age))
    (runs / "2026-01-03_08-00-00").mkdir()  # started, never saved a checkpoint
    text = ["text=hello"] if entry == "predict.py" else []
    result = run_entry(REPO / entry, *text, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "1. ckpt_path is not given: which trained model to use" in result.stderr
    latest = Path("outputs/train/runs/2026-01-01_09-00-00")
    assert f"fix: ckpt_path={latest} (the latest training run here)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_old_accelerator_keys_are_named_with_their_new_names(tmp_path, sms_file):
    result = run_entry("train.py", f"hydra.run.dir={tmp_path / 'run'}", "model=gpt2-tiny",
                       f"data.path={sms_file}", "+accelerator.precision=32-true",
                       timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "trainer.precision=" in result.stderr
    assert "Cannot start: 1 thing(s) missing" in result.stderr  # not also as an unread key


def test_a_key_that_hydras_plus_brings_in_and_nothing_reads_is_refused(tmp_path, sms_file):
    """Hydra answers ``optimiser.lr=1e-4`` (a typo) with "use +optimiser.lr=1e-4", which
    would train with the value ignored."""
    result = run_entry("train.py", f"hydra.run.dir={tmp_path / 'run'}", "model=gpt2-tiny",
                       f"data.path={sms_file}", "+optimiser.lr=1e-4", "+optimiser.betas=[0,0]",
                       "+trainer.gradient_clip_val=1", "+optimizer.foreach=false", "+bogus=1",
                       "+model.dropout=0.1", "+callbacks.mine._target_=x", "+hydra.job.env_set.A=1",
                       timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Cannot start: 3 thing(s) missing" in result.stderr  # added keys that are read pass
    assert "+optimiser.lr=1e-4, +optimiser.betas=[0,0]: nothing reads optimiser" in result.stderr
    assert "fix: optimizer.lr=1e-4 (did you mean optimizer?)" in result.stderr
    assert "+bogus=1: nothing reads bogus" in result.stderr
    assert "fix: model.drop_rate=0.1 (did you mean model.drop_rate?)" in result.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "last.ckpt").write_bytes(b"")
    resume = run_entry("train.py", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'old'}",
                       "+optimiser.lr=1", timeout=120)  # fmt: skip
    assert resume.returncode == 2 and "+optimiser.lr=1: nothing reads optimiser" in resume.stderr
    predict = run_entry("predict.py", f"ckpt_path={tmp_path}", "+colum=text", "text=hi",
                        f"hydra.run.dir={tmp_path / 'p'}", timeout=120)  # fmt: skip
    assert predict.returncode == 2 and "+colum=text: nothing reads colum" in predict.stderr
    assert "fix: column=text (did you mean column?)" in predict.stderr


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="this machine has the GPU that the test asks for in vain")  # fmt: skip
@pytest.mark.parametrize("accelerator", ["accelerator=cuda", "trainer.accelerator=mps"])
def test_a_gpu_this_torch_cannot_see_is_named_before_any_work(tmp_path, sms_file, accelerator):
    result = run_entry("train.py", f"hydra.run.dir={tmp_path / 'run'}", "model=gpt2-tiny",
                       f"data.path={sms_file}", accelerator, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]  # not Lightning's error, after its import
    kind = "gpu" if accelerator.endswith("cuda") else "mps"
    assert f"1. trainer.accelerator={kind}: " in result.stderr
    assert "fix: accelerator=auto" in result.stderr and "Traceback" not in result.stderr
    if kind == "gpu" and torch.version.cuda is None:
        assert "built without CUDA" in result.stderr and "install a CUDA build" in result.stderr
    assert not (tmp_path / "run").exists()


def test_lightnings_trainer_keys_reach_the_trainer():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(__file__).parents[1] / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.accelerator=cpu", "trainer.precision=16-mixed",
                                          "trainer.devices=1", "paths.cache_dir=null",
                                          "trainer.val_check_interval=0.25"])  # fmt: skip
        chosen = compose("train", overrides=["accelerator=cuda"])
    from gpt_classifier.tasks.components import trainer_settings

    settings = trainer_settings(cfg)
    assert (settings["accelerator"], settings["precision"], settings["devices"]) == (
        "cpu", "16-mixed", 1)  # fmt: skip
    from lightning.pytorch import Trainer  # every key of configs/trainer is Lightning's

    assert Trainer(**settings, logger=False).val_check_interval == 0.25
    assert chosen.trainer.accelerator == "gpu"  # the group still picks the device


@pytest.mark.parametrize(("typed", "hydra_says", "key"), [
    ("data.path=my data (v2).csv", "mismatched input ' ('", "data"),
    ("text=Sorry, I'll call later!", "it cannot read \"'\" there", "text"),
    ('text=say "hi" and don\'t', "mismatched input", "text"),
])  # fmt: skip
def test_an_override_hydra_cannot_read_is_named_with_its_quoted_form_which_works(
    tmp_path, typed, hydra_says, key
):
    """A path with parentheses or a text with ' or ! (Hydra names neither the override
    nor the fix): the entry point names it and prints a quoted form that, pasted into a
    shell, gives the value as typed."""
    entry = "train.py" if key == "data" else "predict.py"
    refused = run_entry(entry, "ckpt_path=x", typed)
    assert refused.returncode == 2
    said, fix = refused.stderr.strip().splitlines()[0], refused.stderr.strip().splitlines()[-1]
    assert said.startswith("Cannot read ") and typed.split("=")[0] in said and hydra_says in said
    pasted = subprocess.run(f"{shlex.quote(sys.executable)} {entry} --cfg job {fix.strip()}",
                            shell=True, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    composed = yaml.safe_load(pasted.stdout)
    value = composed["data"]["path"] if key == "data" else composed["text"]
    assert value == typed.split("=", 1)[1]


def test_several_values_without_m_name_both_fixes():
    """``text=Hi, call me`` is a sweep to Hydra, whose advice prints ``key=\\'a,b\\'``."""
    from gpt_classifier.tasks.command_line import check_overrides

    refused = run_entry("predict.py", "ckpt_path=x", "text=Hi, call me")
    assert refused.returncode == 2
    assert "'text=Hi, call me' is several values: add -m to run a job for each" in refused.stderr
    fix = refused.stderr.strip().rsplit(": ", 1)[1]
    pasted = subprocess.run(f"{shlex.quote(sys.executable)} predict.py --cfg job {fix}",
                            shell=True, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert yaml.safe_load(pasted.stdout)["text"] == "Hi, call me"
    check_overrides(["-m", "optimizer.lr=1e-5,1e-4"])  # a sweep: let through
    check_overrides(["hparams_search=optuna", "optimizer.lr=interval(1e-5,1e-3)"])


def test_an_override_without_a_quoted_form_says_what_an_override_is():
    refused = run_entry("train.py", "data.labels=[ham,spam")
    assert refused.returncode == 2
    assert "Cannot read 'data.labels=[ham,spam'" in refused.stderr
    assert "An override is key=value" in refused.stderr


def test_hydras_flags_and_their_values_are_not_taken_for_overrides(tmp_path):
    ran = run_entry("train.py", "-cn", "train", "--cfg", "job", "--package", "_global_", "seed=7")
    assert ran.returncode == 0 and yaml.safe_load(ran.stdout)["seed"] == 7
