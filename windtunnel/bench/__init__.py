"""Benchmark scripts: each prints a table; ratios are measured side by side in one run."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_results(out: str | Path, name: str, rows: list[dict], markdown: str) -> None:
    """NAME.json (the rows) and NAME.md (the table and its command) in out, each replaced whole,
    so a benchmark killed while writing leaves the previous complete file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / f"{name}.json", json.dumps(rows, indent=1)), (out / f"{name}.md", markdown)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
