"""The optional extras (``pip install -e ".[name]"``): importing their modules."""

from __future__ import annotations

import importlib
from types import ModuleType


class ExtraError(ImportError):
    """An extra's module that cannot be imported: what is wrong, and the fix."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}: {fix}")
        self.what, self.fix = what, fix


def import_extra(module: str, extra: str, needed_by: str) -> ModuleType:
    """``module``, else an :class:`ExtraError` that says what to do: install the extra
    where the module is missing; where it is installed but fails to import (pyarrow built
    for another NumPy, say), its own reason, which installing again would not fix."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if isinstance(err, ModuleNotFoundError) and err.name in (module, top):
            what, fix = "which is not installed", f'pip install -e ".[{extra}]"'
        else:
            what = f"which is installed but fails to import ({type(err).__name__}: {err})"
            fix = "repair that installation"
        raise ExtraError(f"{needed_by} needs {top}, {what}", fix) from err
