"""The findings table a user acts on is made from the committed results, never typed by hand."""
from pathlib import Path

import pytest

from windtunnel.bench.findings import collect, table, with_table

RESULTS = Path(__file__).resolve().parent.parent / "results" / "windtunnel"


def test_the_results_readme_shows_the_table_the_results_make():
    readme = (RESULTS / "README.md").read_text()
    # a row pasted by hand, or a result changed without `findings --write`, shows here
    assert with_table(readme, table(collect(RESULTS))) == readme, (
        "results/windtunnel/README.md's findings table differs from the results: "
        "run `python -m windtunnel.bench.findings --write`")


def test_the_table_is_replaced_and_nothing_around_it():
    readme = "# Title\n\nintro\n| finding | a |\n|---|---|\n| old | 1 |\n| older | 2 |\n\nafter\n| other | table |\n"
    new = "| finding | a |\n|---|---|\n| new | 3 |"
    assert with_table(readme, new) == "# Title\n\nintro\n" + new + "\n\nafter\n| other | table |\n"


def test_a_readme_without_the_table_is_refused():
    with pytest.raises(SystemExit, match="no table"):
        with_table("# Title\n", "| finding |")
