"""The committed notebooks are what the book renders: they must be fully executed, in order, without errors,
say which data they ran on, and be exactly the chapters the table of contents lists."""

from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            if "root" in node:
                found.append(node["root"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return found


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no chapter"


def test_toc_lists_every_notebook_and_nothing_missing():
    listed = _toc_files()
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.stem}" in listed, f"{nb.name} is not in _toc.yml"
    for entry in listed:
        candidates = [ROOT / f"{entry}{ext}" for ext in ("", ".md", ".ipynb")]
        assert any(c.exists() for c in candidates), f"_toc.yml lists {entry}, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_is_executed_in_order_without_errors(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    counts = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        assert cell.execution_count is not None, f"{path.name}: code cell {i} was never executed"
        counts.append(cell.execution_count)
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{path.name}: cell {i} holds an error output"
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                assert "Traceback" not in out.get("text", ""), f"{path.name}: cell {i} printed a traceback"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: execution counts are out of order: {counts}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_outputs_come_from_the_full_profile_and_name_their_data(path):
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(
        out.get("text", "") if out.get("output_type") == "stream" else str(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    if "load_mnist" not in "".join(c.source for c in nb.cells):
        pytest.skip("this chapter uses no data")
    assert "profile: full" in text, f"{path.name}: committed outputs must come from the full profile"
    assert "MNIST" in text, f"{path.name}: no output says which data the results came from"
