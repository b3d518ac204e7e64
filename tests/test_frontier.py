"""The size/fidelity frontier: sweep --quantize with ONNX Runtime's baselines and Pareto points, and compress's
closing comparison with a plain ONNX Runtime quantization (workflows.frontier)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

from onnx_fwlr.cli.main import main
from onnx_fwlr.quant.int8_kernels import int8_saturates
from onnx_fwlr.quant.ortquant import ort_int4_model, ort_int8_model
from onnx_fwlr.workflows.frontier import better_baseline, mark_pareto

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sample_models" / "digits_mlp.onnx"
CALIB = ROOT / "sample_models" / "digits_calib.npz"
TEST = ROOT / "sample_models" / "digits_test.npz"


def _row(config, size, cosine, accuracy=None, latency=None):
    return {"config": config, "bytes": size, "mean_cosine": cosine, "accuracy": accuracy, "latency_ratio": latency,
            "output": "y"}


def test_pareto_points_are_the_rows_nothing_beats():
    rows = [_row("original", 100, 1.0, latency=5.0), _row("a", 30, 0.99, latency=6.0), _row("b", 40, 0.98, latency=2.0),
            _row("c", 30, 0.995, latency=3.0), _row("d", 50, 0.995, latency=None)]
    mark_pareto(rows, "mean_cosine")
    by = {r["config"]: r["pareto"] for r in rows}
    assert by == {"original": ["bytes", "latency"], "a": [], "b": ["latency"], "c": ["bytes", "latency"], "d": []}
    tied = [_row("x", 10, 0.99, accuracy=0.9), _row("y", 10, 0.98, accuracy=0.9), _row("z", 20, 0.97, accuracy=0.95)]
    mark_pareto(tied, "accuracy")  # equal accuracy: the mean cosine decides
    assert [r["pareto"] for r in tied] == [["bytes"], [], ["bytes"]]


def test_better_baseline_needs_fewer_bytes_a_higher_cosine_and_no_lower_accuracy():
    ours = _row("ours", 1000, 0.990, accuracy=0.95)
    assert better_baseline(ours, [_row("ORT int8 dynamic per-channel", 1001, 0.999, accuracy=0.96)]) is None
    assert better_baseline(ours, [_row("ORT int8 dynamic per-channel", 500, 0.985, accuracy=0.99)]) is None
    assert better_baseline(ours, [_row("ORT int8 dynamic per-channel", 500, 0.999, accuracy=0.94)]) is None
    sentence = better_baseline(ours, [_row("ORT int4 b32 (MatMul only)", 1000, 0.995, accuracy=0.95),
                                      _row("ORT int8 dynamic per-channel", 900, 0.999, accuracy=0.95)])
    assert "int8 per-channel" in sentence and "900 bytes" in sentence and "1,000 bytes" in sentence
    assert "0.99900" in sentence and "0.99000" in sentence and sentence.count(". ") == 0
    same = better_baseline(_row("ours", 900, 0.99), [_row("ORT int8 dynamic per-channel", 900, 0.999)], quantized=True)
    assert "at the same bytes" in same and "--quantize" not in same


def test_baselines_are_onnx_runtime_quantizers_of_the_original():
    model = onnx.load(DIGITS)
    int8, int4 = ort_int8_model(model), ort_int4_model(model, 32)
    assert "MatMulInteger" in {n.op_type for n in int8.graph.node}
    assert "MatMulNBits" in {n.op_type for n in int4.graph.node}
    assert int8.ByteSize() < int4.ByteSize() < model.ByteSize()
    assert "MatMulNBits" not in {n.op_type for n in model.graph.node}  # the original is left as it was


@pytest.mark.parametrize("saturating", [None, "1"], ids=["this-cpu", "forced-saturating"])
def test_compress_says_when_plain_int8_would_have_been_better(saturating, tmp_path, capsys, monkeypatch):
    """Low rank alone at half the parameters: ORT's int8 model is smaller and closer to the original, judged by
    what it computes here; on a CPU whose u8s8 kernels saturate (forced: what an AVX2-only CPU computes) the
    baseline has 7-bit weights, as ONNX Runtime advises there, and the sentence says so."""
    if saturating:
        monkeypatch.setenv("ONNX_FWLR_INT8_SATURATES", saturating)
    else:
        monkeypatch.delenv("ONNX_FWLR_INT8_SATURATES", raising=False)
    common = [str(DIGITS), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5", "--calib", str(CALIB), "--val",
              str(TEST), "--quiet", "--force"]
    assert main(["compress", *common, "--json", str(tmp_path / "report.json")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("A plain ONNX Runtime int8 per-channel dynamic quantization") and "fewer bytes" in last
    assert ("reduce_range=True" in last) == int8_saturates()
    report = json.loads((tmp_path / "report.json").read_text())
    int8 = next(r for r in report["ort_baselines"] if "int8" in r["config"])
    assert f"{int8['bytes']:,} bytes" in last and int8["bytes"] < (tmp_path / "out.onnx").stat().st_size
    assert int8["mean_cosine"] > report["validation"]["outputs"][0]["mean_cosine"]
    assert main(["compress", *common, "--no-ort-comparison"]) == 0
    assert "ONNX Runtime" not in capsys.readouterr().out


def test_sweep_quantize_adds_baselines_budgets_and_pareto_points(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(DIGITS), "--calib", str(CALIB), "--val", str(TEST), "--quantize", "int4,auto",
                 "--sizes", "0.8x,100KB", "-o", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "ORT int8 dynamic per-channel" in table and "0.8 x ORT int8" in table and "Pareto" in table
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    configs = [r["config"] for r in rows]
    assert configs[0] == "original" and configs.count("quantize int4") == configs.count("quantize auto") == 2
    assert {"ORT int8 dynamic per-channel", "ORT int4 b32 (MatMul only)", "ORT int4 b128 (MatMul only)"} <= set(configs)
    assert not any(r.get("kind") == "lowrank" for r in rows)  # --quantize alone: no low-rank rows
    int8 = next(r for r in rows if r["config"] == "ORT int8 dynamic per-channel")
    for row in (r for r in rows if r.get("kind") == "quantized"):
        assert row["bytes"] <= row["target_size"] and row["target_size"] in (int(0.8 * int8["bytes"]), 100_000)
    assert data["pareto_metric"] == "accuracy" and any("bytes" in r["pareto"] for r in rows)
    for row in rows:  # no Pareto point is beaten on both size and fidelity
        if "bytes" in row["pareto"]:
            assert not any(o["bytes"] < row["bytes"] and (o["accuracy"], o["mean_cosine"]) > (row["accuracy"],
                                                                                             row["mean_cosine"])
                           for o in rows)
    if importlib.util.find_spec("matplotlib"):
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_quantize_needs_calibration_and_known_modes(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    assert main(["sweep", str(DIGITS), "--val", str(TEST), "--quantize", "int4", "-o", out]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(["sweep", str(DIGITS), "--calib", str(CALIB), "--val", str(TEST), "--quantize", "int3", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "unknown --quantize 'int3'" in err and err.count("\n") == 1
    assert main(["sweep", str(DIGITS), "--calib", str(CALIB), "--val", str(TEST), "--quantize", "int4", "--sizes",
                 "0x", "-o", out]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["sweep", str(DIGITS), "--calib", str(CALIB), "--val", str(TEST), "--quantize", "int4",
                 "--output-name", "probs", "-o", out]) == 2
    assert "output 'probs' is not an output of the model" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_sweep_latency_marks_the_latency_frontier_beside_the_baselines(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(DIGITS), "--val", str(TEST), "--ratios", "0.5", "--methods", "svd", "--latency",
                 "-o", str(out), "--quiet", "--no-plots"])
    assert code == 0
    table = capsys.readouterr().out
    assert "latency x" in table and "median of alternating pairs" in table
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    by = {r["config"]: r for r in rows}
    assert by["original"]["latency_ratio"] == 1.0
    assert {"ORT int8 dynamic per-channel", "ORT int4 b32 (MatMul only)", "svd/uniform"} <= set(by)  # baselines on
    level4 = by["ORT int4 b32 (MatMul only), accuracy_level 4"]  # with --latency, int4 at both compute levels
    assert 0 < level4["bytes"] - by["ORT int4 b32 (MatMul only)"]["bytes"] <= 30  # one attribute per node, 3 nodes
    for row in rows:
        assert row["latency_ratio"] > 0 and row["latency_ms"] > 0 and row["baseline_latency_ms"] > 0
        assert row.get("latency_ratio_p10", 1.0) <= row["latency_ratio"] <= row.get("latency_ratio_p90", 1.0)
    on_front = [r for r in rows if "latency" in r["pareto"]]
    assert on_front  # whatever the timings, the fastest of the most faithful rows is a latency Pareto point
    for row in on_front:  # and no point on it is beaten on both latency and fidelity
        assert not any(o["latency_ratio"] < row["latency_ratio"] and o["accuracy"] > row["accuracy"] for o in rows)
