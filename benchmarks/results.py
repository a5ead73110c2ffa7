"""benchmarks/RESULTS.md is written by several benchmark scripts: each owns one section, between
``<!-- begin NAME -->`` and ``<!-- end NAME -->``, and rewrites only that, so ``make bench`` can run them one after
the other and a script run alone leaves the others' numbers in place."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# Benchmark results\n\nWritten by `make bench` (each section by the script it names).\n"


def write_section(name: str, text: str, path: Path = RESULTS) -> Path:
    """Put ``text`` in section ``name`` of ``path`` (replacing that section, or appending it); returns ``path``."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    current = path.read_text() if path.is_file() else TITLE
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        updated = f"{head}{block}\n{tail}" if tail else f"{head}{block}"
    else:
        updated = f"{current.rstrip()}\n\n{block}"
    path.write_text(updated)
    return path
