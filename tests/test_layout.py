"""The package's import rules: arrows run one way, and the model can be lifted out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from entry_points import run_entry

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt_classifier"
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")

# What each part may import, of this package and of the training frameworks.
ALLOWED = {
    "model": {"model"},
    "finetuning": {"finetuning", "model"},
    "data": {"data", "files", "extras", "sweep_reuse", "lightning"},
    "checkpoints.py": {"model"},
    "files.py": set(),
    "extras.py": set(),
    "sweep_reuse.py": set(),
    "inference": {"inference", "model", "finetuning", "data", "checkpoints", "files", "extras"},
    "training": {"training", "model", "finetuning", "data", "checkpoints", "reporting",
                 "files", "sweep_reuse", "lightning"},
    "reporting": {"reporting", "files", "hydra", "omegaconf"},
}  # fmt: skip


def imports_of(path: Path) -> set[str]:
    """Top-level names this file imports: a part of ours ("model") or a framework."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "gpt_classifier" and len(parts) > 1:
                names.add(parts[1] if parts[1] != "checkpoints" else "checkpoints")
            elif parts[0] in FRAMEWORKS:
                names.add(parts[0] if parts[0] != "pytorch_lightning" else "lightning")
    return names


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_it_may(part):
    files = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))
    assert files
    for path in files:
        extra = imports_of(path) - ALLOWED[part]
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}"


def test_model_and_inference_load_without_lightning_or_hydra():
    code = (
        "import sys\n"
        "import gpt_classifier.model, gpt_classifier.finetuning, gpt_classifier.inference\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "assert not loaded, loaded\n"
    )
    result = run_entry("-c", code)
    assert result.returncode == 0, result.stderr


def test_the_inference_tasks_start_without_lightning():
    """predict, eval, export and serve load a model, not a Trainer: importing Lightning
    (seconds of every command's start) is left to the paths that need it, such as
    rebuilding a run's split in eval.py."""
    code = (
        "import sys\n"
        "import gpt_classifier.tasks.predict, gpt_classifier.tasks.evaluate\n"
        "import gpt_classifier.tasks.export, gpt_classifier.tasks.serve\n"
        "assert 'lightning' not in sys.modules, 'Lightning was imported'\n"
    )
    result = run_entry("-c", code)
    assert result.returncode == 0, result.stderr


def module_imports(path: Path) -> set[str]:
    """The package's modules this file imports, anywhere in it (function level too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("gpt_classifier."))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpt_classifier"):
            for alias in node.names:  # `from pkg import module` imports that module
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                names.add(sub if is_module else node.module)
    return names


def test_no_import_cycles_among_the_packages_modules():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = module_imports(path) - {name}
    # A package's __init__ may gather its own modules; that is not a cycle.
    edges = {m: {i for i in imps if not m.startswith(i + ".")} for m, imps in modules.items()}
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycle = trail[trail.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done or module not in edges:
            return
        for imported in sorted(edges[module]):
            visit(imported, [*trail, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
