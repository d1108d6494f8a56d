"""Writing TensorBoard event files without importing TensorFlow."""

from __future__ import annotations

import sys
import types

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
