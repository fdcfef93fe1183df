"""The docs' tables of results are what `experiments.doc_tables` makes of the committed result files,
so a figure in the docs cannot drift from the file (and the run) it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import doc_tables

REPO = Path(__file__).resolve().parents[1]
SPLIT_KEYS = {"seed", "fractions", "cases", "images"}  # a split is an input of runs, not a result


@pytest.mark.parametrize("name", list(doc_tables.SECTIONS))
def test_docs_section_is_generated_from_its_result_files(name):
    path, render = doc_tables.SECTIONS[name]
    in_docs = doc_tables.current(path.read_text(encoding="utf-8"), name)
    assert in_docs is not None, f"{path.name} has no {name} markers"
    assert in_docs == render().strip("\n"), (
        f"{path.name} section {name} differs from its result files: run `python -m experiments.doc_tables`")


def test_a_hand_edited_section_is_caught_and_rewritten():
    text = "intro\n<!-- demo:begin -->\n\n| a | 0.500 |\n\n<!-- demo:end -->\noutro\n"
    assert doc_tables.current(text, "demo") == "| a | 0.500 |"
    rewritten = doc_tables.replaced(text, "demo", "| a | 0.501 |")
    assert doc_tables.current(rewritten, "demo") == "| a | 0.501 |"
    assert rewritten.startswith("intro\n") and rewritten.endswith("\noutro\n")
    assert doc_tables.current("<!-- demo:end --> <!-- demo:begin -->", "demo") is None


def test_every_result_file_carries_date_and_commit():
    files = sorted((REPO / "experiments" / "results").rglob("*.json")) + sorted((REPO / "benchmarks" / "results").rglob("*.json"))
    results = [p for p in files if not (isinstance(data := json.loads(p.read_text()), dict) and SPLIT_KEYS <= set(data))]
    assert len(results) >= 10, "the scan found too few result files to mean anything"
    unstamped = [str(p.relative_to(REPO)) for p in results
                 if not {"date", "commit"} <= set(json.loads(p.read_text()))]
    assert not unstamped, f"result files without date and commit: {unstamped}"
