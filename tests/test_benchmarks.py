"""The benchmark scripts run, and refuse bad arguments (their numbers are measured by hand, not here)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_benchmark_measures_both_networks_on_every_pass(tmp_path, capsys):
    bench = load("architecture")
    out = tmp_path / "arch.json"
    result = bench.main(["--batch", "4", "--repeats", "1", "--calls", "1", "--json", str(out)])
    assert set(result["rows"]) == {"input gradient", "forward", "training step"}
    for row in result["rows"].values():
        assert row["cnn"] > 0 and row["small_cnn"] > 0
        assert row["ratio"] == pytest.approx(row["small_cnn"] / row["cnn"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "694,402" in printed and "166,406" in printed
    with pytest.raises(SystemExit):
        bench.main(["--batch", "0"])


def test_small_cnn_is_wong_et_al_s_mnist_network():
    import torch
    from utils.models import build_model, count_parameters

    from utils.models import SmallCNN

    m = SmallCNN()
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert "normalize.mean" in m.state_dict()
    # Conv(1→16, 4x4, stride 2) + Conv(16→32, 4x4, stride 2) + Linear(32·7·7 → 100) + Linear(100 → 10)
    assert count_parameters(m) == (16 * 16 + 16) + (32 * 16 * 16 + 32) + (32 * 49 * 100 + 100) + (100 * 10 + 10)
    assert [c.stride for c in m.modules() if isinstance(c, torch.nn.Conv2d)] == [(2, 2), (2, 2)]
    assert not any(isinstance(c, torch.nn.MaxPool2d) for c in m.modules())
    assert m.features(m.normalize(torch.rand(1, 1, 28, 28))).shape == (1, 32, 7, 7)
    assert isinstance(build_model("small_cnn", width=8, hidden=10), SmallCNN)


def test_choose_network_reads_candidates_and_refuses_malformed_ones():
    bench = load("choose_network")
    assert bench.parse_candidate("small_cnn:16:100") == ("small_cnn", 16, 100)
    for bad in ("small_cnn:16", "cnn:0:20", "cnn:32:-1", "cnn:x:20"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            bench.parse_candidate(bad)


def test_choose_network_tables_the_rows_of_several_runs(tmp_path):
    bench = load("choose_network")
    row = {"arch": "small_cnn", "width": 16, "epochs": 100, "lr": 1e-3, "shift": 0, "ema": 0.0, "train_s": 283.0,
           "attack_s": 107.0, "n": 1000, "train_n": 3000, "source": "mnist5k", "clean": 0.973, "FGSM": 0.856,
           "worst case": 0.752, "se": 0.0137}
    rows = [row, dict(row, shift=2, **{"worst case": 0.771})]
    text = bench.markdown(rows)
    lines = text.splitlines()
    assert lines[0] == ("| objective | network | epochs | lr | shift | EMA | worst case | clean | FGSM | training | "
                        "five attacks |"), "the headline first, the times last"
    assert lines[2].endswith("| 75.2% ± 1.4% | 97.3% | 85.6% | 4.7 min | 1.8 min |")
    assert len([line for line in lines if line.startswith("| pgd_at | `small_cnn` width 16 | 100 |")]) == 2
    assert "75.2% ± 1.4%" in text and "77.1% ± 1.4%" in text and "4.7 min" in text
    assert "trained on 3,000 digits, attacked on 1,000 validation digits" in text
    assert "| trades β=6 |" in bench.markdown([dict(row, objective="trades β=6")])
    stored = tmp_path / "rows.json"
    stored.write_text(json.dumps(rows))
    out = tmp_path / "rows.md"
    assert bench.main(["--json", str(stored), "--markdown", str(out)]) == rows
    assert out.read_text() == text
    with pytest.raises(SystemExit):
        bench.main(["--json", str(tmp_path / "missing.json"), "--markdown", str(out)])
