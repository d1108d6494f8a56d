"""The entry points' command line, checked before Hydra reads it."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

# Hydra's flags whose value is the next argument (``python train.py --help``).
_VALUE_FLAGS = frozenset({"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn",
                          "--config-name", "-cd", "--config-dir", "-i", "--info",
                          "--experimental-rerun"})  # fmt: skip
# Options that need an extra: without it, Hydra says only that a sweeper or launcher
# option does not exist (or fails in a traceback), and a logger fails after the start.
_EXTRAS = (("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "hparams"),
           ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "hparams"),
           ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm"),
           ("logger=mlflow", "mlflow", "mlflow"), ("logger=wandb", "wandb", "wandb"))  # fmt: skip


def check_overrides(args: Sequence[str]) -> None:
    """Exit with status 2 and the fix where an override needs an extra that is not
    installed, Hydra cannot read it, or it is several values without ``-m``: Hydra's
    message names neither the override (for most syntax errors) nor a fix that works, and
    paths with parentheses and texts with ``!``, ``'`` or commas are common."""
    parser = OverridesParser.create()
    sweep = any(arg in ("-m", "--multirun") or arg.startswith(("hparams_search=", "hydra.mode="))
                for arg in args)  # fmt: skip
    after_flag = False
    for arg in args:
        if after_flag or arg.startswith("-"):
            after_flag = arg in _VALUE_FLAGS and not after_flag
            continue
        for option, module, extra in _EXTRAS:
            if arg.startswith(option) and not _installed(module):
                print(f"{arg} needs {module}, which is not installed: pip install -e "
                      f'".[{extra}]"', file=sys.stderr)  # fmt: skip
                raise SystemExit(2)
        try:
            [override] = parser.parse_overrides([arg])
        except OverrideParseException as err:
            print(_unreadable(arg, err.message, parser), file=sys.stderr)
            raise SystemExit(2) from None
        if override.is_sweep_override() and not sweep:  # Hydra's fix shows \' for '
            quoted = _quoted(arg, parser)
            one = f", or quote a value that has commas: {quoted}" if quoted else ""
            print(f"{_shell_quoted(arg)} is several values: add -m to run a job for each{one}",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(2)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent (hydra_plugins: no plugin at all) is not there
        return False


def _unreadable(arg: str, hydra_says: str, parser: OverridesParser) -> str:
    said = hydra_says.splitlines()
    lexer = "LexerNoViableAltException: "
    if said[0].startswith(lexer) and len(said) > 1:  # a caret under the character
        at = len(said[1]) - 1 - len(lexer)
        said[0] = f"it cannot read {arg[at : at + 1]!r} there" if 0 <= at < len(arg) else said[0]
    detail = said[1] if said[0].startswith("Error parsing") else said[0]
    lines = [f"Cannot read {_shell_quoted(arg)} on the command line (Hydra: {detail})"]
    if quoted := _quoted(arg, parser):
        lines.append("Hydra reads characters such as ( ) [ ] { } = , ! ' \" in a value as "
                     f"syntax: quote the value, as in\n  {quoted}")  # fmt: skip
    else:
        lines.append("An override is key=value (model=gpt2-medium, "
                     "'data.path=\"my file (1).csv\"'): "
                     "https://hydra.cc/docs/advanced/override_grammar/basic/")  # fmt: skip
    return "\n".join(lines)


def _quoted(arg: str, parser: OverridesParser) -> str | None:
    """``arg`` with its value quoted for Hydra and the shell, where Hydra then reads the
    value exactly as typed."""
    key, _, value = arg.partition("=")
    if not key or not value or value.startswith(("[", "{")):
        return None
    quoted = _hydra_quoted(key, value)
    try:
        [override] = parser.parse_overrides([quoted])
    except OverrideParseException:
        return None
    same = override.value() == value and not override.is_sweep_override()
    return _shell_quoted(quoted) if same else None


def _hydra_quoted(key: str, value: str) -> str:
    if '"' not in value:
        return f'{key}="{value}"'
    if "'" not in value:
        return f"{key}='{value}'"
    return key + '="' + value.replace('"', '\\"') + '"'


def _shell_quoted(arg: str) -> str:
    """``arg`` for a POSIX shell, in double quotes where it holds a single quote."""
    if "'" not in arg:
        return f"'{arg}'"
    if not any(char in arg for char in "$`\\!"):
        return '"' + arg.replace('"', '\\"') + '"'
    return shlex.quote(arg)
