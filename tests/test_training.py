"""The training app through its real entry point, on the real config tree."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from entry_points import ok, run_entry, run_train, start_entry
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]


def scalars(run: Path) -> dict[str, list[float]]:
    """Every scalar of a run's TensorBoard event files, by tag."""
    values: dict[str, list[float]] = {}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hparams_sessions(logdir: Path, timeout: float = 120) -> dict[str, tuple[dict, dict]]:
    """What TensorBoard's HParams dashboard shows for ``logdir``: per run (session), its
    hyperparameters and metrics, from a real ``tensorboard`` server on a loopback port."""
    port = free_port()
    server = start_entry("-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1",
                         f"--port={port}", "--reload_interval=1", stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}/data/plugin/hparams/"
    headers = {"Content-Type": "application/json", "X-XSRF-Protected": "1"}

    def ask(endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(url + endpoint, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                experiment = ask("experiment", {"experimentName": ""})
                names = [h["name"] for h in experiment.get("hparamInfos", [])]
                metric_names = [m["name"] for m in experiment.get("metricInfos", [])]
                groups = ask("session_groups", {
                    "experimentName": "",
                    "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                    "colParams": [{"hparam": n} for n in names]
                    + [{"metric": m} for m in metric_names],
                    "startIndex": 0, "sliceSize": 100,
                })  # fmt: skip
                if names and groups.get("sessionGroups"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "TensorBoard's HParams plugin listed no sessions"
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    sessions = {}
    for group in groups["sessionGroups"]:
        for session in group["sessions"]:
            metrics = {v["name"]["tag"]: v["value"] for v in session["metricValues"]}
            sessions[session["name"]] = (group["hparams"], metrics)
    return sessions


def test_short_run_learns_and_reports_consistently(tmp_path, sms_file):
    result = ok(run_train(tmp_path, sms_file, "logger=many"))
    # Each log line once (Lightning's own console handler is gone), and the final
    # evaluation as a table of the splits, to 4 decimals.
    said = [line for line in (result.stdout + result.stderr).splitlines() if "][" in line]
    assert sum("Seed set to" in line for line in said) == 1, said
    assert not any(line.startswith("INFO: ") for line in result.stderr.splitlines())
    table = result.stdout + result.stderr
    assert re.search(r"\nmetric +train +val +test\n", table), table
    assert re.search(r"\nexamples +1045 +149 +300\n", table), table
    assert re.search(r"\nclass/spam/support +517 +79 +151\n", table), table
    # Lightning's warnings that ask nothing of a user are not shown.
    assert "LeafSpec" not in table and "not supported by the model summary" not in table
    assert "litlogger" not in table  # an advertisement
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    # Two epochs of the last block of gpt2-tiny learn something: chance is 0.5 and ln 2.
    assert metrics["train/loss"] < 0.6 and metrics["test/acc"] > 0.7, metrics
    assert metrics["val/acc"] > 0.7 and metrics["train/acc"] > 0.7, metrics
    for split in ("train", "val", "test"):
        p, r = metrics[f"{split}/precision"], metrics[f"{split}/recall"]
        assert metrics[f"{split}/f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert metrics["params/trainable"] == 50_242  # gpt2-tiny: last block, final norm, head
    assert metrics["params/total"] == 3_333_058
    assert 0 < metrics["time/prefix_s"] < metrics["time/fit_s"] + metrics["time/test_s"]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_checkpoint"]).is_file()
    assert sorted(p.name for p in (run / "splits").iterdir()) == [
        "test.csv", "train.csv", "validation.csv"
    ]  # fmt: skip
    assert (run / "csv" / "metrics.csv").is_file()
    logged = scalars(run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert tag in logged, sorted(logged)
    for split in ("train", "val", "test"):  # macro and micro F1, and per class
        f1s = [metrics[f"{split}/class/{name}/f1"] for name in ("ham", "spam")]
        assert metrics[f"{split}/f1_macro"] == pytest.approx(sum(f1s) / 2, abs=1e-6)
        assert metrics[f"{split}/f1_micro"] == pytest.approx(metrics[f"{split}/acc"], abs=1e-6)
        assert metrics[f"{split}/class/spam/f1"] == metrics[f"{split}/f1"]  # the positive class
    assert len(logged["val/acc"]) == 2  # one per epoch
    assert len(logged["val/class/ham/recall"]) == 2 and "test/f1_macro" in logged
    for split in ("val", "test"):  # the best checkpoint's confusion matrices
        assert (run / f"confusion_matrix_{split}.png").read_bytes()[:4] == b"\x89PNG"
    images = set()
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        images |= set(accumulator.Tags()["images"])
    assert images == {"confusion_matrix/val", "confusion_matrix/test"}
    assert logged["test/acc"][-1] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert logged["final/train/acc"][-1] == pytest.approx(metrics["train/acc"], abs=1e-6)
    plugin_dir = run / "tensorboard"
    assert any(b"hparams" in p.read_bytes() for p in plugin_dir.glob("events.out.tfevents.*"))


def test_tensorboard_logging_does_not_import_tensorflow(tmp_path):
    # Where TensorFlow is installed, TensorBoard's compat layer imports all of it (seconds
    # of every run's start-up); a run writes its event files through TensorBoard's stub
    # instead. A stand-in `tensorflow` package on the path shows whether it is imported.
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(fake.parent)!r})\n"
        "from gpt_classifier.reporting.tensorboard import skip_tensorflow_import\n"
        "skip_tensorflow_import()\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        f"with SummaryWriter({str(tmp_path / 'tb')!r}) as w:\n"
        "    w.add_scalar('a/b', 0.5, 3)\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    ok(run_entry("-c", script))
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("a/b")] == [(3, 0.5)]


def test_two_job_multirun_applies_each_jobs_freeze_and_writes_its_summary(tmp_path, sms_file):
    # Through submitit's local executor: each job in its own process, as on SLURM.
    ok(run_train(tmp_path, sms_file, "freeze=last_block,last_layer",
                 "hydra/launcher=submitit_local", multirun=True))  # fmt: skip
    sweep = tmp_path / "sweep"
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit ran both
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == ["freeze=last_block", "freeze=last_layer"]
    # Each job trained what its freeze option names: the last block, or the head alone.
    assert [int(r["params/trainable"]) for r in rows] == [50_242, 130]
    assert all(0 <= float(r["val/acc"]) <= 1 for r in rows)
    table = (sweep / "summary.md").read_text()
    assert "freeze=last_layer" in table and "val/acc" in table
    # TensorBoard's HParams dashboard, asked by a real TensorBoard server over the sweep:
    # one session per job, with its choices, its settings and its final metrics.
    sessions = hparams_sessions(sweep)
    assert sorted(sessions) == ["0/tensorboard", "1/tensorboard"], sessions
    for job, row in zip(("0/tensorboard", "1/tensorboard"), rows):
        hparams, metrics = sessions[job]
        assert hparams["choice/freeze"] == row["overrides"].removeprefix("freeze=")
        assert hparams["choice/model"] == "gpt2-tiny" and hparams["optimizer/lr"] == 5e-5
        assert not any(k.startswith(("paths/", "callbacks/")) for k in hparams), sorted(hparams)
        assert metrics["hparams/val/acc"] == pytest.approx(float(row["val/acc"]), abs=1e-6)
        assert metrics["hparams/params/trainable"] == int(row["params/trainable"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("freeze=last_blok", "Could not find 'freeze/last_blok'"),
        ("model=gpt2-huge", "Could not find 'model/gpt2-huge'"),
        ("data.batchsize=4", "Key 'batchsize' is not in struct"),
        ("freeze.n=2", "Key 'n' is not in struct"),  # freeze=last_block has no n
    ],
)
def test_config_typos_fail_fast(tmp_path, sms_file, override, message):
    result = run_train(tmp_path, sms_file, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run" / "splits").exists()  # failed before any work


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["freeze=lora", "freeze.rank=0"], "freeze.rank=0 must be a positive integer"),
        (["freeze=lora", "freeze.head=half"], "freeze.head='half'; choose one of"),
        # gpt2-small with its default (Hub) weights: the check comes before any download.
        (["model=gpt2-small", "freeze=last_n_blocks", "freeze.n=13"],
         "freeze.n=13 must be between 1 and the model's 12 blocks (model=gpt2-small)"),
        (["classifier.pooling=middle"], "classifier.pooling='middle'; choose one of"),
        (["prefix_cache.cache_dtype=int8"], "prefix_cache.cache_dtype='int8'; choose auto or"),
        (["optimizer.lr=-1"], "optimizer: Invalid learning rate: -1"),  # torch's own check
        (["+optimizer.momentum=0.9"], "optimizer: AdamW.__init__() got an unexpected keyword"),
    ],
)  # fmt: skip
def test_bad_fine_tuning_values_fail_before_weights_or_data(tmp_path, monkeypatch, overrides,
                                                            message):  # fmt: skip
    from gpt_classifier.data.datamodule import SMSSpamDataModule
    from gpt_classifier.model.gpt import GPT
    from gpt_classifier.tasks.train import train

    def touched(*args, **kwargs):
        raise AssertionError("weights or data were touched before the config was checked")

    monkeypatch.setattr(GPT, "from_preset", touched)
    monkeypatch.setattr(GPT, "from_pretrained", touched)
    monkeypatch.setattr(SMSSpamDataModule, "__init__", touched)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(train_config(tmp_path, overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimize_metric=val/f1macro"], "optimize_metric='val/f1macro' is not a metric that "
         "validation logs; did you mean val/f1_macro? Choose val/acc, "),
        (["callbacks.early_stopping.patience=2", "callbacks.early_stopping.monitor=val/spam/f1"],
         "early_stopping.monitor='val/spam/f1' is not a metric that validation logs; did you "
         "mean val/class/spam/f1?"),
    ],
)  # fmt: skip
def test_a_monitored_metric_that_validation_does_not_log_fails_before_training(
    tmp_path, monkeypatch, sms_file, overrides, message
):
    from gpt_classifier.tasks.train import signals, train

    def fit(*args, **kwargs):
        raise AssertionError("training started before the monitored metrics were checked")

    monkeypatch.setattr(signals, "fit", fit)
    overrides = [*overrides, "model=gpt2-tiny", f"data.path={sms_file}"]
    with pytest.raises(ValueError, match=re.escape(message)):
        train(train_config(tmp_path, overrides))


def train_config(run: Path, overrides: list[str]):  # -> DictConfig
    """The composed config of ``train.py <overrides>`` with its output in ``run``, set up
    as Hydra sets up a run, for calling the training task in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={run}"],
                      return_hydra_config=True)  # fmt: skip
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # what Hydra's runtime fills in for a real run
        cfg.paths.root_dir, cfg.paths.output_dir = str(REPO), str(run)
    return cfg


def test_appendix_e_lora_trains_exactly_its_parameters_on_gpt2_small(tmp_path, sms_file):
    # Every linear layer including the head gets rank-16 adapters; the head's base is
    # frozen: 12 blocks x 221,184 + 12,320 (one batch of each loop is enough to count).
    ok(run_train(tmp_path, sms_file, "model=gpt2-small", "model.pretrained=false",
                 "freeze=lora", "freeze.rank=16", "freeze.head=lora",
                 "trainer.fast_dev_run=true", "data.batch_size=2"))  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["params/trainable"] == 2_666_528
    assert metrics["params/total"] == 124_441_346 + 2_666_528  # the adapters are added


def test_unknown_option_lists_the_choices(tmp_path, sms_file):
    result = run_train(tmp_path, sms_file, "accelerator=tpu")
    assert result.returncode != 0
    assert "Available options" in result.stderr and "cpu" in result.stderr


def test_the_sweep_summary_ranks_jobs_by_the_metric_and_marks_the_best(tmp_path):
    from gpt_classifier.reporting.reports import write_sweep_summary

    for job, (lr, acc) in enumerate([("1e-5", 0.81), ("5e-5", 0.93), ("1e-4", 0.88)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n- seed=1\n")
        metrics = {"val/acc": acc, "test/acc": acc - 0.01, "test/examples": 300.0,
                   "val/loss": 1 - acc}  # fmt: skip
        (folder / "metrics.json").write_text(json.dumps(metrics))
    # A start refused in job 0's folder rewrote its .hydra/; its run_config.yaml keeps the
    # overrides it ran with.
    (tmp_path / "0" / "run_config.yaml").write_text("overrides: [optimizer.lr=1e-5, seed=1]\n")
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=9\n- seed=1\n")
    (tmp_path / "3" / ".hydra").mkdir(parents=True)  # a job that failed: no metrics.json
    (tmp_path / "3" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=-1\n- seed=1\n")
    write_sweep_summary(tmp_path, "val/acc")
    assert "\n- 3: `optimizer.lr=-1`\n" in (tmp_path / "summary.md").read_text()
    table = [line for line in (tmp_path / "summary.md").read_text().splitlines()
             if line.startswith("| ") and "optimizer.lr" in line]  # fmt: skip
    assert [line.split(" | ")[2] for line in table] == ["optimizer.lr=5e-5", "optimizer.lr=1e-4",
                                                         "optimizer.lr=1e-5"]  # fmt: skip
    assert table[0].startswith("| **best** |") and "**best**" not in "".join(table[1:])
    assert "| 300 |" in table[0] and "| 0.9300 |" in table[0]  # counts whole, rates 4 places
    with (tmp_path / "summary.csv").open(newline="") as f:
        assert [row["job"] for row in csv.DictReader(f)] == ["0", "1", "2"]  # jobs in order
    write_sweep_summary(tmp_path, "val/loss")  # a loss ranks low first
    first = next(line for line in (tmp_path / "summary.md").read_text().splitlines()
                 if line.startswith("| **best**"))  # fmt: skip
    assert "optimizer.lr=5e-5" in first


def test_a_sweep_whose_job_fails_still_summarises_the_others(tmp_path, sms_file):
    """Hydra ends a sweep with a failed job without on_multirun_end: the summary is written
    after each job, and it names the jobs that left no metrics.json."""
    result = run_train(tmp_path, sms_file, "optimizer.lr=-1,1e-4", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
                       multirun=True)  # fmt: skip
    assert result.returncode != 0 and "optimizer: Invalid learning rate: -1" in result.stderr
    with (tmp_path / "sweep" / "summary.csv").open(newline="") as f:
        assert [row["job"] for row in csv.DictReader(f)] == ["1"]
    table = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| optimizer.lr=0.0001 |" in table and "\n- 0: `optimizer.lr=-1`\n" in table


def test_a_sweep_job_that_cannot_start_fails_alone(tmp_path, sms_file):
    """A job stopped by the pre-flight (here its data file is missing) fails as a job: the
    jobs after it still run, and the summary lists it with its overrides."""
    result = run_train(tmp_path, sms_file, f"data.path=missing.txt,{sms_file}",
                       "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                       "trainer.limit_val_batches=2", multirun=True)  # fmt: skip
    assert result.returncode != 0 and "1. data.path=missing.txt does not exist" in result.stderr
    assert (tmp_path / "sweep" / "1" / "metrics.json").is_file()
    table = (tmp_path / "sweep" / "summary.md").read_text()
    assert "\n- 0: `data.path=missing.txt`\n" in table


@pytest.mark.parametrize(("override", "says"), [
    ("seed=-1", "\nConfigError: seed=-1: -1 is not in bounds"),
    # torch divides by T_max at the first epoch's end, after that epoch's work.
    ("scheduler=cosine scheduler.T_max=0", "ConfigError: scheduler: integer modulo by zero"),
    # A string is not a list of weights: it was read character by character.
    ("classifier.class_weights=auot", "classifier.class_weights=auot: give 2 positive numbers"),
])  # fmt: skip
def test_a_bad_value_is_named_by_its_key(tmp_path, sms_file, override, says):
    result = run_train(tmp_path, sms_file, *override.split(), "trainer.limit_train_batches=1")
    assert result.returncode != 0 and says in result.stderr
    assert "Traceback" not in result.stderr


def test_early_stopping_is_off_by_default_and_stops_after_patience(tmp_path, sms_file):
    # Learning rate 0: val/acc never improves, so patience 1 stops after the second epoch.
    ok(run_train(tmp_path, sms_file, "optimizer.lr=0.0", "trainer.max_epochs=5",
                 "callbacks.early_stopping.patience=1"))  # fmt: skip
    assert len(scalars(tmp_path / "run")["val/acc"]) == 2
    bad = run_train(tmp_path / "bad", sms_file, "callbacks.early_stopping.patience=0")
    assert bad.returncode != 0 and "callbacks.early_stopping.patience=0" in bad.stderr


def test_logger_mlflow_keeps_the_runs_params_and_final_metrics(tmp_path, sms_file):
    import mlflow  # a dev dependency (the extra is mlflow-skinny)

    store = f"file:{tmp_path / 'mlruns'}"
    ok(run_train(tmp_path, sms_file, "logger=mlflow", f"logger.mlflow.tracking_uri={store}"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(store)
    [run] = mlflow.search_runs(experiment_names=["gpt-classifier"], output_format="list")
    assert run.data.params["choice/model"] == "gpt2-tiny"
    assert run.data.params["optimizer/lr"] == "5e-05"
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert run.data.metrics["final/train/acc"] == pytest.approx(metrics["train/acc"], abs=1e-6)
    assert run.data.tags["run_dir"] == str(tmp_path / "run")
    artifacts = mlflow.MlflowClient().list_artifacts(run.info.run_id)
    assert {a.path for a in artifacts} == {"confusion_matrix_val.png", "confusion_matrix_test.png"}


def test_logger_wandb_logs_offline_into_the_run_folder(tmp_path, sms_file):
    ok(run_train(tmp_path, sms_file, "logger=wandb", "trainer.max_epochs=1"))
    [offline_run] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))
