"""TensorBoard event files: written without importing TensorFlow, with an HParams session."""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from typing import Any

from gpt_classifier.reporting.reports import flatten

# TensorBoard's own switch: when a module of this name exists, tensorboard.compat.tf
# resolves to TensorBoard's TensorFlow stub instead of importing TensorFlow.
_NO_TENSORFLOW = "tensorboard.compat.notf"


def skip_tensorflow_import() -> None:
    """Make ``torch.utils.tensorboard`` use TensorBoard's stub even where TensorFlow is installed.

    Importing ``torch.utils.tensorboard`` touches ``tensorboard.compat.tf``, which
    imports the whole of TensorFlow when it is installed (7 s of a run's start-up on a
    2-core CPU) although writing event files never needs it. Where TensorFlow is
    already imported, nothing changes.
    """
    if "tensorflow" in sys.modules or _NO_TENSORFLOW in sys.modules:
        return
    sys.modules[_NO_TENSORFLOW] = types.ModuleType(_NO_TENSORFLOW)


# Config subtrees that say where files go or how a run is watched, not what was trained:
# listed in the HParams dashboard they would be columns that differ between every two jobs.
_NOT_HPARAMS = (
    "paths", "logger", "callbacks", "hydra", "ckpt_path", "task_name",
    "data/data_dir", "data/urls", "data/sha256", "data/size", "prefix_cache/dir",
)  # fmt: skip


def hparams_for_dashboard(config: Mapping[str, Any], choices: Mapping[str, Any]) -> dict[str, Any]:
    """A run's hyperparameters for TensorBoard's HParams dashboard: each config group's
    choice (``choice/model: gpt2-small``) and the config's values (``optimizer/lr``)."""
    params = {f"choice/{group}": str(choice) for group, choice in sorted(choices.items())
              if not group.startswith("hydra")}  # fmt: skip
    for key, value in flatten(config).items():
        if key.rsplit("/", 1)[-1] in ("_target_", "_partial_"):
            continue
        if any(key == p or key.startswith(p + "/") for p in _NOT_HPARAMS):
            continue
        params[key] = value
    return params


def log_final_hparams(logger: Any, params: Mapping[str, Any],
                      metrics: Mapping[str, Any]) -> None:  # fmt: skip
    """Write the run's HParams session (its hyperparameters and final metrics) through
    Lightning's ``TensorBoardLogger`` and close the event file, so that TensorBoard's
    HParams dashboard lists the run.

    Lightning closes its writer when ``trainer.test`` ends; logging after that opens a new
    event file, which nothing would flush or close before a sweep's next job.
    """
    numbers = {f"hparams/{k}": v for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
    logger.log_hyperparams(dict(params), numbers)
    logger.finalize("success")
