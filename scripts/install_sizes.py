"""What an install takes on disk: the base package and what each extra adds.

Reads the installed distributions of this environment (which must have the extras
installed, as ``pip install -e ".[dev]"`` does): each requirement is followed through the
installed metadata, and a distribution's size is the sum of the files its RECORD lists.
Prints a Markdown table (``--markdown`` writes it into docs/benchmarks.md).

    python scripts/install_sizes.py [--markdown]
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gpt-classifier"
MARK = ("<!-- install-sizes:start -->", "<!-- install-sizes:end -->")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: metadata.Distribution, extra: str | None) -> list[str]:
    """The distributions ``dist`` needs (with ``extra``: only what that extra adds)."""
    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        env = {"extra": extra or ""}
        in_extra = req.marker is not None and "extra" in str(req.marker)
        if (extra is None and in_extra) or (extra is not None and not in_extra):
            continue
        if req.marker is None or req.marker.evaluate(env):
            names.append(canonical(req.name))
    return names


def closure(roots: list[str]) -> set[str]:
    """Every installed distribution ``roots`` need, themselves included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this platform does not install
        seen.add(name)
        todo.extend(requirements(dist, None))
    return seen


def size_mb(name: str) -> float:
    dist = metadata.distribution(name)
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total / 1e6


def table() -> str:
    ours = metadata.distribution(PACKAGE)
    base = closure(requirements(ours, None))
    rows = [("base (`pip install -e .`, CPU torch)", base)]
    extras = [e for e in ours.metadata.get_all("Provides-Extra") or [] if e != "dev"]
    for extra in extras:
        rows.append((f"`.[{extra}]` adds", closure(requirements(ours, extra)) - base))
    torch = metadata.version("torch")
    lines = [
        "| install | MB | distributions (largest first) |",
        "|---|---:|---|",
    ]
    for label, names in rows:
        sizes = sorted(((size_mb(n), n) for n in names), reverse=True)
        more = ", ..." if len(sizes) > 6 else ""
        listed = ", ".join(f"{n} {mb:.0f}" for mb, n in sizes[:6]) + more
        lines.append(f"| {label} | {sum(mb for mb, _ in sizes):,.0f} | {listed} |")
    lines.append("")
    lines.append(f"Installed sizes on disk (torch {torch}, Python {sys.version.split()[0]}), "
                 "from each distribution's RECORD: `python scripts/install_sizes.py`.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="write the table into "
                        "docs/benchmarks.md between its install-sizes markers")  # fmt: skip
    args = parser.parse_args()
    text = table()
    print(text)
    if args.markdown:
        page = REPO / "docs" / "benchmarks.md"
        content = page.read_text()
        start, end = content.index(MARK[0]) + len(MARK[0]), content.index(MARK[1])
        page.write_text(content[:start] + "\n" + text + "\n" + content[end:])


if __name__ == "__main__":
    main()
