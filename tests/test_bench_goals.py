"""The issue-26 goal lines of tools/bench_quant.py and tools/bench_llm.py, from rows (no timing here): a latency
goal passes only on the direct pairs' upper bound, never on a median alone."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _row(name, cos, vs=None, size=22_000_000, b1=0.4):
    row = {"model": name, "cos_mean": cos, "bytes": size, "latency": {1: {"ratio": b1}, 32: {"ratio": 0.5}}}
    if vs is not None:
        row["vs_int8"] = {b: {"ratio": r, "p10": r - 0.1, "p90": r + 0.1, "upper": u, "pairs": 300, "load": 2.0}
                          for b, (r, u) in vs.items()}
    return row


def test_the_int8_latency_goal_passes_on_the_upper_bound_only():
    bench = _tool("bench_quant")
    int8 = _row("ORT int8 dynamic per-channel", 0.9929, size=23_000_000)
    tight = _row("ours int8, target latency fastest+1%", 0.9941, {1: (1.002, 1.005), 32: (0.995, 1.006)})
    loose = _row("ours int8, target latency fastest+2%", 0.9958, {1: (1.013, 1.022), 32: (1.010, 1.050)})
    lines = bench.goals([_row("fp32 original", 1.0), int8, tight, loose])
    assert lines[0].startswith("PASS  batch 1") and "fastest+1%" in lines[0] and "upper bound 1.005" in lines[0]
    assert lines[1].startswith("PASS  batch 32") and "fastest+1%" in lines[1]
    lines = bench.goals([int8, loose])  # median 1.010 <= 1.02, but the bound 1.050 is not
    assert lines[0].startswith("FAIL  batch 1") and "closest ours int8, target latency fastest+2%" in lines[0]
    assert lines[1].startswith("FAIL  batch 32")
    assert lines[2].startswith("not measured")  # no row at 0.8 x int8's bytes
    small = _row("ours int8, target 0.8 x int8", 0.9917, size=18_000_000, b1=0.52)
    assert bench.goals([int8, small])[2].startswith("PASS")


def test_the_decode_goal_needs_speed_and_perplexity_together():
    bench = _tool("bench_llm")
    int4 = {"key": "ort-int4", "perplexity_ratio": 1.027, "decode_tokens_per_second": 5360.0}
    rows = {"original": {"key": "original", "perplexity_ratio": 1.0, "decode_tokens_per_second": 4832.0},
            "ort-int4": int4,
            "slow": {"key": "slow", "perplexity_ratio": 1.01, "decode_tokens_per_second": 3000.0},
            "worse": {"key": "worse", "perplexity_ratio": 1.2, "decode_tokens_per_second": 9000.0}}
    assert bench.decode_goal(rows).startswith("FAIL")
    rows["int4"] = {"key": "int4", "perplexity_ratio": 1.024, "decode_tokens_per_second": 5452.0}
    assert bench.decode_goal(rows).startswith("PASS") and "(int4: 5452.0 tok/s" in bench.decode_goal(rows)
    assert bench.decode_goal({"original": rows["original"]}).startswith("not measured")


def test_decode_only_times_the_auto_rows_and_a_with_past_model_without_its_no_cache_form(tmp_path, monkeypatch):
    """--decode-only picks every KEY_past.onnx in --work: the auto rows (sized by ORT int4's model there) and a
    with-past model written on its own (its prompt then runs through itself with an empty cache)."""
    import onnx
    from onnx import TensorProto, helper

    bench = _tool("bench_llm")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    for name in ("ort-int4", "ort-int4_past", "auto-half", "auto-half_past", "kfac-0.8_past", "whiten-0.8"):
        onnx.save(helper.make_model(graph), tmp_path / f"{name}.onnx")
    monkeypatch.setattr(sys, "argv", ["bench_llm.py", "--dir", str(tmp_path / "models"), "--work", str(tmp_path)])
    rows = bench.decode_rows(bench.parse_args(), None)
    assert list(rows) == ["original", "ort-int4", "kfac-0.8", "auto-half"]  # whiten-0.8 has no with-past form
    assert rows["auto-half"] == (tmp_path / "auto-half_past.onnx", tmp_path / "auto-half.onnx")
    assert rows["kfac-0.8"] == (tmp_path / "kfac-0.8_past.onnx", None)
    assert list(bench.decode_rows(bench.parse_args(), {"auto-half"})) == ["original", "auto-half"]
