"""The workflow a user runs to pick a model: budgets, validate, sweep, attention detection."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_fwlr import FwlrError, compress
from onnx_fwlr.cli.main import main
from onnx_fwlr.pipeline.compress import calibrate, validate
from onnx_fwlr.sites.find import attention_projections, find_sites

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "sample_models" / "digits_mlp.onnx"
CALIB = ROOT / "sample_models" / "digits_calib.npz"
TEST = ROOT / "sample_models" / "digits_test.npz"


@pytest.fixture(scope="module")
def digits_stats():
    return calibrate(str(DIGITS), str(CALIB), progress=False)


def test_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.onnx"
    assert main(["compress", str(DIGITS), "-o", str(good), "--ratio", "0.9", "--quiet"]) == 0
    broken = onnx.load(str(DIGITS))
    for tensor in broken.graph.initializer:
        if tensor.name == "fc2.weight":
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(tuple(tensor.dims), np.float32), tensor.name))
    onnx.save_model(broken, str(tmp_path / "broken.onnx"))
    common = ["--data", str(TEST), "--min-cosine", "0.9", "--max-accuracy-drop", "5", "--quiet"]  # points
    assert main(["validate", str(DIGITS), str(good), *common]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["validate", str(DIGITS), str(tmp_path / "broken.onnx"), *common,
                 "--json", str(tmp_path / "v.json")]) == 1
    assert "FAIL" in capsys.readouterr().out
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["original_accuracy"] > data["compressed_accuracy"] + 0.05


def test_max_error_meets_its_target(digits_stats):
    target = 0.15
    model, report = compress(str(DIGITS), max_error=target, validation=str(TEST), method="whiten",
                             stats=digits_stats, progress=False)
    found = report.budget["ratio_found"]
    assert 0 < found < 1
    check = validate(str(DIGITS), model, str(TEST), progress=False)
    assert max(o.rel_l2_error for o in check.outputs) <= target
    # the search is tight: the steps just below the found ratio miss the target
    misses = [h for h in report.budget["search"] if h["ratio"] < found]
    assert misses and all(h["rel_error"] > target for h in misses)


def test_max_error_needs_validation_data():
    with pytest.raises(FwlrError, match="`validation`"):
        compress(str(DIGITS), max_error=0.1, progress=False)


def test_target_size_is_met(tmp_path):
    out = tmp_path / "small.onnx"
    assert main(["compress", str(DIGITS), "-o", str(out), "--target-size", "120KB", "--quiet"]) == 0
    assert out.stat().st_size <= 120_000
    assert out.stat().st_size > 0.8 * 120_000  # and it uses most of the allowance
    with pytest.raises(FwlrError, match="too small"):
        compress(str(DIGITS), target_size=500, progress=False)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_a_budget_below_one_rank_step_is_kept(allocation):
    """fc2 (256 x 256) takes ranks in steps of 16, whose first step alone passes a 0.05 budget: the steps give
    way (with a warning) instead of the model silently keeping twice the parameters asked for."""
    calibration = str(CALIB) if allocation == "global" else None
    _, report = compress(str(DIGITS), ratio=0.05, allocation=allocation, calibration=calibration, progress=False)
    assert report.site_params_after <= 0.05 * report.site_params_before
    assert any("below one rank step of 16" in w for w in report.warnings)
    _, report = compress(str(DIGITS), ratio=0.5, allocation=allocation, calibration=calibration, progress=False)
    assert not any("rank step" in w for w in report.warnings)
    assert {s.name: s.rank for s in report.sites}["fc2/MatMul"] % 16 == 0  # steps kept where the budget allows


def test_an_unreachable_budget_is_refused_before_statistics(monkeypatch):
    """Below rank 1 on every site, nothing meets the budget: one sentence, before the calibration pass."""
    from onnx_fwlr.pipeline import prepare as prepare_module

    def no_statistics(*args, **kwargs):
        raise AssertionError("statistics were gathered for a budget the sites' shapes cannot meet")

    monkeypatch.setattr(prepare_module, "_statistics", no_statistics)
    with pytest.raises(FwlrError, match="at least 0.013"):
        compress(str(DIGITS), ratio=0.01, calibration=str(CALIB), progress=False)
    with pytest.raises(FwlrError, match="already makes the model about"):
        compress(str(DIGITS), target_size=5_000, calibration=str(CALIB), progress=False)
    monkeypatch.undo()
    _, report = compress(str(DIGITS), ratio=0.013, calibration=str(CALIB), progress=False)  # the least it named
    assert report.site_params_after <= 0.013 * report.site_params_before


def test_rank_overrides():
    model, report = compress(str(DIGITS), ratio=0.3, ranks={"head/Gemm": 9}, progress=False)
    ranks = {s.name: s.rank for s in report.sites}
    assert ranks["head/Gemm"] == 9 and ranks["fc2/MatMul"] == 32  # uniform 38, in steps of 16 (nearest)
    with pytest.raises(FwlrError, match="no site is named"):
        compress(str(DIGITS), ratio=0.3, ranks={"nope": 3}, progress=False)


def test_budget_options_conflict():
    with pytest.raises(FwlrError, match="given together"):
        compress(str(DIGITS), ratio=0.5, rank=4, progress=False)
    with pytest.raises(FwlrError, match="global"):
        compress(str(DIGITS), ratio=0.5, method="whiten", allocation="global", calibration=str(CALIB), progress=False)


def test_keep_attention_finds_the_projections():
    from transformer_builder import build_transformer

    model = build_transformer(hidden=32, layers=2, heads=4, ffn=64, vocab=50, max_len=16)
    sites, _ = find_sites(model)
    found = attention_projections(model, sites)
    names = {s.weight for s in sites}
    assert len(sites) == 12 and len(found) == 8  # per layer: Q, K, V, output projection; FFN in/out stay
    compressed, report = compress(model, ratio=0.5, keep_attention=True, progress=False)
    assert len(report.sites) == 4 and all(s.weight in names - found for s in report.sites)
    assert sum("attention projection kept dense" in s.reason for s in report.skipped) == 8


def test_sweep_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(DIGITS), "--calib", str(CALIB), "--val", str(TEST), "--ratios", "0.8,0.4",
                 "--methods", "svd,whiten", "-o", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "whiten" in table and "mean cosine" in table
    data = json.loads((out / "sweep.json").read_text())
    reference, *rows = data["rows"]
    assert reference["method"] == "original" and reference["mean_cosine"] == 1.0
    assert {(r["method"], r["ratio"]) for r in rows} == {("svd", 0.8), ("svd", 0.4), ("whiten", 0.8), ("whiten", 0.4)}
    for row in rows:
        assert 0 < row["param_ratio"] <= row["ratio"] + 1e-9
        assert 0 <= row["accuracy"] <= 1 and -1 <= row["mean_cosine"] <= 1
    by = {(r["method"], r["ratio"]): r for r in rows}
    assert by[("whiten", 0.8)]["accuracy"] >= by[("whiten", 0.4)]["accuracy"]
    for png in ("sweep.png", "spectra_whiten_uniform.png"):
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
