"""A Python that has imported torch, Lightning and Hydra once and forks a child per
entry-point run (``tests/entry_points.py`` starts and uses it).

Most of a short ``python train.py`` run is spent importing Lightning (with torch,
torchmetrics and what they import), and the suite starts about 150 runs. A forked child
sets up what a new process has (arguments, working directory, environment, standard
streams, its own random seeds) and runs the script as ``__main__``.

Run as ``python preloaded_python.py REQUEST_FD REPLY_FD``: a request is a JSON line
(``argv``, ``cwd``, ``env``, and the files of ``stdin``, ``stdout`` and ``stderr``); the
replies are the child's pid, then its return code as ``subprocess`` gives it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import runpy
import sys
from pathlib import Path
from typing import IO


def preload() -> None:
    """Import what every training run imports, as the entry points import it."""
    # An entry point imports Lightning after Hydra has set up logging, and Lightning's
    # loggers then hand their records to the root's handlers instead of printing them.
    stand_in = logging.NullHandler()
    logging.getLogger().addHandler(stand_in)
    import hydra  # noqa: F401
    import lightning  # noqa: F401

    import gpt_classifier.tasks.train  # noqa: F401

    logging.getLogger().removeHandler(stand_in)


def run_child(request: dict, protocol: list[IO]) -> None:
    """In the forked child: become the requested process and run its script; exits."""
    for stream in protocol:
        stream.close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, name, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", written),
                            (2, "stderr", written)):  # fmt: skip
        opened = os.open(request[name], flags)
        os.dup2(opened, fd)
        os.close(opened)
    random.seed()  # seeded from the system, as in a new process, not the parent's state
    import numpy as np

    np.random.seed()
    sys.argv = list(request["argv"])
    sys.path[0] = str(Path(sys.argv[0]).resolve().parent)
    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)  # through the interpreter's shutdown: atexit handlers, flushed streams


def serve(request_fd: int, reply_fd: int) -> None:
    """Fork a child per request, one at a time, and report its pid and return code."""
    preload()
    requests, replies = os.fdopen(request_fd, "r"), os.fdopen(reply_fd, "w")
    for line in requests:  # until the test process closes its end
        request = json.loads(line)
        if (pid := os.fork()) == 0:
            run_child(request, [requests, replies])
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
