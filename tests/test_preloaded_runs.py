"""A run in the preloaded Python (``tests/preloaded_python.py``, which most of the suite's
entry-point runs go through) answers as the same command in a new interpreter does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from entry_points import PRELOADED, REPO


@pytest.mark.parametrize(
    "args",
    [
        # the working directory, the environment, the config printed to standard output
        ("--cfg", "job", "--resolve", "+probe=${oc.env:GPT_CLASSIFIER_PROBE}"),
        # refused on its command line, with exit status 2
        ("text=I'll be late",),
        # refused by the task once Lightning has logged its start, with exit status 1
        (
            "model=gpt2-tiny",
            "model.pretrained=false",
            "accelerator=cpu",
            "classifier.num_classes=3",
            "data.path={sms_file}",
        ),
    ],
    ids=["config", "command-line", "task-error"],
)
def test_a_preloaded_run_answers_as_a_new_interpreter(tmp_path, sms_file, args):
    args = tuple(arg.replace("{sms_file}", str(sms_file)) for arg in args)
    script = "predict.py" if args[0].startswith("text=") else "train.py"
    command = (str(REPO / script), *args, f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPT_CLASSIFIER_PROBE": str(tmp_path)}
    preloaded = PRELOADED.run(command, tmp_path, env, timeout=300, stdin="")
    assert preloaded is not None, "the run went to a new interpreter"
    fresh = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, text=True,
                           capture_output=True, timeout=300)  # fmt: skip
    assert preloaded.returncode == fresh.returncode
    for stream in ("stdout", "stderr"):  # the same lines, logged at other times
        said, said_fresh = (getattr(result, stream).splitlines() for result in (preloaded, fresh))
        assert [line.split("]", 1)[-1] for line in said] == [
            line.split("]", 1)[-1] for line in said_fresh]  # fmt: skip
    if args[0] == "--cfg":
        assert f"probe: {tmp_path}" in preloaded.stdout
