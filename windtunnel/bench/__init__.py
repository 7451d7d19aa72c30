"""Benchmark scripts: each prints a table; ratios are measured side by side in one run."""
from __future__ import annotations

from pathlib import Path

from windtunnel.files import write_json, write_text


def write_results(out: str | Path, name: str, rows: list[dict], markdown: str) -> None:
    """NAME.json (the rows) and NAME.md (the table and its command) in out, each replaced whole,
    so a benchmark killed while writing leaves the previous complete file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", rows)
    write_text(out / f"{name}.md", markdown)
