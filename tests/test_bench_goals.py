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
