"""The committed notebooks are what the book renders: they must be fully executed, in order, without errors,
say which data they ran on, and be exactly the chapters the table of contents lists."""

import re
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


#: A number at float rounding-noise level (1e-10 and below, in scientific notation), or a negative zero:
#: what one CPU prints there another CPU, thread count or PyTorch build prints differently.
_NOISE = re.compile(r"(?<![\w.])-?\d\.\d+e-(?:1\d|[2-9]\d|\d{3})\b|(?<![\w.])-0(?:\.0+)?(?![\d.])")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_checked_outputs_print_nothing_at_rounding_noise_level(path):
    """A `# NBVAL_CHECK_OUTPUT` cell's output is compared verbatim on every machine that runs the suite,
    so it may only print rounded, platform-stable values."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "NBVAL_CHECK_OUTPUT" not in cell.source:
            continue
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else \
                str(out.get("data", {}).get("text/plain", ""))
            found = _NOISE.findall(text)
            assert not found, f"{path.name}: checked cell {i} prints values at rounding-noise level: {found}"


def test_the_noise_pattern_catches_what_it_must():
    assert _NOISE.search("energy pairing 2.0e-31, logit pairing 49.480")
    assert _NOISE.search("g = -0.0")
    assert not _NOISE.search("x' = 5.0e-07, t = 0.0, 1e-6, step 10.0, [0.0, 1.0, -1.0]")
