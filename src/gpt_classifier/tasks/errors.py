"""The errors a user can fix, shown by the entry points as their message alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import CompactHydraException

from gpt_classifier.data.download import DownloadError
from gpt_classifier.inference.loading import ModelLoadError
from gpt_classifier.model.weight_names import WeightLoadError

# Our messages for a bad value, file, path or checkpoint name it and say what to do, and
# a missing extra's says what to install; the layers below the tasks do not know Hydra,
# so they raise these kinds.
FIXABLE = (ValueError, OSError, ImportError, DownloadError, ModelLoadError, WeightLoadError)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to set."""


class ShownAsMessage(CompactHydraException):
    """A fixable error that Hydra prints as its message, without a traceback."""


@contextmanager
def shown_as_messages() -> Iterator[None]:
    """A fixable error escaping the block is printed as ``<kind>: <message>``, not under
    a traceback of our frames (``HYDRA_FULL_ERROR=1`` still shows the whole chain)."""
    try:
        yield
    except FIXABLE as err:
        raise ShownAsMessage(f"{type(err).__name__}: {err}") from err
