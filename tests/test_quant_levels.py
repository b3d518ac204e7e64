"""MatMulNBits accuracy_level per site (timed with fake timers, checked on real activations) and merged
corrections of sites that read one tensor (the same outputs as separate pairs)."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.cli.main import main
from onnx_fwlr.cost import levels
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.pipeline.quantized import compress_quantized
from onnx_fwlr.quant import ortquant
from onnx_fwlr.quant.graph import SitePlan, merge_groups, rewrite
from onnx_fwlr.sites.find import find_sites

sys.path.insert(0, str(Path(__file__).resolve().parent))
from builders import run  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
DIGITS, CALIB = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_calib.npz"


def level_timer(level4_ms: float, level0_ms: float = 1.0, calls=None):
    """A fake latency-model timer for the main branch alone: level 4 forms take level4_ms, level 0 level0_ms."""

    def timer(K, N, rank, rows, form="fp32"):
        if calls is not None:
            calls.append((K, rows, form))
        return level4_ms if "acc4" in form else level0_ms

    return timer


def _levels_written(model) -> list[int]:
    return [next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
            for n in model.graph.node if n.op_type == "MatMulNBits"]


def test_scheme_labels_carry_the_level():
    scheme = ortquant.nbits(4, 32).at_level(4)
    assert scheme.label == "int4 b32 acc4" and ortquant.nbits(4, 32).label == "int4 b32"
    assert ortquant.scheme_from_label("int4 b128 sym acc4") == ortquant.nbits(4, 128, True, 4)
    assert scheme.matmul_bytes(64, 10) == ortquant.nbits(4, 32).matmul_bytes(64, 10)
    with pytest.raises(FwlrError, match="accuracy_level` 7"):
        ortquant.nbits(4, 32, accuracy_level=7)


def test_level_4_is_written_as_onnx_runtime_quantizes_it_and_computes_close_to_level_0():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 24)).astype(np.float32)
    X = rng.standard_normal((40, 64)).astype(np.float32)
    outputs = {}
    for level in (0, 4):
        model = levels.site_model(W, ortquant.nbits(4, 32, accuracy_level=level))
        assert _levels_written(model) == ([4] if level else [0])
        outputs[level] = run(model, {"x": X})[0]
    exact = X @ W
    int4_error = np.linalg.norm(outputs[0] - exact)
    assert 0 < np.linalg.norm(outputs[4] - outputs[0]) < 0.3 * int4_error


def test_the_check_keeps_level_0_where_one_huge_activation_shares_a_block():
    """ONNX Runtime issue 29849: a channel 300x the others (its weight row near zero, as where massive
    activations meet a normalised residual) rounds the rest of its block of K to a few steps."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 32)).astype(np.float32)
    W[5] = 0.001
    X = rng.standard_normal((256, 64)).astype(np.float32)
    scheme = ortquant.nbits(4, 32)
    calm = levels.check_ratio(W, scheme, X)
    X[:, 5] *= 300
    wild = levels.check_ratio(W, scheme, X)
    assert calm < levels.LEVEL_BOUND < wild
    assert levels.choose_level({0: 1.0, 4: 0.5}, calm, 40).level == 4
    choice = levels.choose_level({0: 1.0, 4: 0.5}, wild, 40)
    assert choice.level == 0 and "issue 29849" in choice.reason
    assert levels.choose_level({0: 1.0, 4: 1.5}, None, 40).level == 0  # slower: not even checked
    assert levels.choose_level(None, wild, 40, forced=4).level == 0  # asked for, but the check fails


@pytest.mark.parametrize("level4_ms, expected", [(0.5, 4), (2.0, 0)], ids=["level4-faster", "level4-slower"])
def test_auto_level_follows_the_timer_at_the_deployment_rows(level4_ms, expected):
    calls = []
    model, report = compress_quantized(str(DIGITS), quantize="int4", rank=8, calibration=str(CALIB), progress=False,
                                       accuracy_level="auto", level_timer=level_timer(level4_ms, calls=calls))
    assert _levels_written(model) == [expected] * 3
    assert sorted({c[1] for c in calls}) == [32]  # one calibration batch of 32 digits: 32 rows per site
    rows = report.budget["accuracy_levels"]
    assert [r["level"] for r in rows] == [expected] * 3 and all(r["rows"] == 32 for r in rows)
    note = next(w for w in report.warnings if w.startswith("MatMulNBits accuracy_level"))
    assert f"4 (int8 activations) for {3 if expected == 4 else 0} of 3 sites" in note
    assert (expected == 0) == ("measured no faster at 32 rows for 3" in note)
    # the same weights and corrections either way: only the compute attribute differs
    other, _ = compress_quantized(str(DIGITS), quantize="int4", rank=8, calibration=str(CALIB), progress=False)
    assert _levels_written(other) == [0] * 3
    strip = [n for n in model.graph.initializer]
    assert [t.raw_data for t in strip] == [t.raw_data for t in other.graph.initializer]


def _outlier_model(tmp_path):
    """x [., 64] -> MatMul W1 [64, 32]: calibration data whose channel 5 is 300x the others, W1's row 5 tiny."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 32)).astype(np.float32)
    W[5] = 0.001
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                              [numpy_helper.from_array(W, "W1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "outlier.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    x[:, 5] *= 300
    np.savez(tmp_path / "calib.npz", x=x)
    return path, tmp_path / "calib.npz"


def test_a_site_failing_the_check_keeps_level_0_and_the_report_says_why(tmp_path):
    path, calib = _outlier_model(tmp_path)
    model, report = compress_quantized(str(path), quantize="int4", rank=8, method="whiten", calibration=str(calib),
                                       progress=False, accuracy_level="auto", level_timer=level_timer(0.1))
    assert _levels_written(model) == [0]
    row = report.budget["accuracy_levels"][0]
    assert row["level"] == 0 and row["check_ratio"] > levels.LEVEL_BOUND
    note = next(w for w in report.warnings if w.startswith("MatMulNBits accuracy_level"))
    assert "kept at 0 by the check (ONNX Runtime issue 29849" in note and "fc" in note


def test_cli_accuracy_level(tmp_path, monkeypatch, capsys):
    from onnx_fwlr.cost.latency import OrtTimer

    fake = level_timer(0.5)
    monkeypatch.setattr(OrtTimer, "__call__", lambda self, K, N, rank, rows, form="fp32": fake(K, N, rank, rows, form))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["compress", str(DIGITS), "-o", str(out), "--calib", str(CALIB), "--quiet", "--quantize", "int4",
                 "--rank", "8", "--accuracy-level", "auto", "--json", str(report)])
    assert code == 0 and _levels_written(onnx.load(out)) == [4] * 3
    assert "MatMulNBits accuracy_level: 4 (int8 activations) for 3 of 3 sites" in capsys.readouterr().out
    assert [r["level"] for r in json.loads(report.read_text())["budget"]["accuracy_levels"]] == [4] * 3
    code = main(["compress", str(DIGITS), "-o", str(tmp_path / "p.onnx"), "--calib", str(CALIB), "--quiet",
                 "--quantize", "int4", "--rank", "8"])
    assert code == 0 and _levels_written(onnx.load(tmp_path / "p.onnx")) == [0] * 3  # default without timing: 0
    capsys.readouterr()
    for flag in (["--accuracy-level", "4"], ["--merge-corrections"]):
        code = main(["compress", str(DIGITS), "-o", str(tmp_path / "n.onnx"), "--ratio", "0.5", *flag])
        assert code == 2 and not (tmp_path / "n.onnx").exists()
        assert f"{flag[0]} applies to quantized sites" in capsys.readouterr().err


# --- merged corrections ---------------------------------------------------------------------------------------


def _shared_input_model(K=64, N=48, sites=3, opset=17):
    """x -> three MatMuls (q, k, v) reading x, and a fourth reading another tensor (not merged)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"site{i}") for i in range(sites)]
    nodes += [helper.make_node("Relu", ["x"], ["rx"], name="relu"),
              helper.make_node("MatMul", ["rx", "Wother"], ["z"], name="other")]
    weights = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), f"W{i}") for i in range(sites)]
    weights.append(numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "Wother"))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["n", N]) for i in range(sites)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
                              outputs + [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", N])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("scheme", ["int4 b32 acc4", "int8 dynamic", None], ids=["int4", "int8", "low-rank"])
@pytest.mark.parametrize("factor_dtype, opset", [("float16", 17), ("float32", 11)])
def test_merged_corrections_compute_what_separate_pairs_compute(scheme, factor_dtype, opset):
    model = _shared_input_model(opset=opset)
    rng = np.random.default_rng(2)
    main_scheme = None if scheme is None else ortquant.scheme_from_label(scheme)
    plans = {w: SitePlan(main_scheme, rng.standard_normal((64, r)), rng.standard_normal((r, 48)))
             for w, r in (("W0", 8), ("W1", 16), ("W2", 8), ("Wother", 8))}
    separate = rewrite(model, plans, {}, factor_dtype, merge=False)
    merged = rewrite(model, plans, {}, factor_dtype, merge=True)
    onnx.checker.check_model(merged)
    sites = {s.weight: s for s in find_sites(model)[0]}
    assert merge_groups(sites, plans) == [["W0", "W1", "W2"]]
    ops = [n.op_type for n in merged.graph.node]
    assert ops.count("Split") == 1

    def first_factors(m, source):  # fp32 MatMuls reading `source` whose second input is a correction factor
        return [n for n in m.graph.node if n.op_type == "MatMul" and n.input[0] == source and "_A" in n.input[1]]

    assert len(first_factors(separate, "x")) == 3 and len(first_factors(merged, "x")) == 1  # X @ [A_0 | A_1 | A_2]
    assert len(first_factors(merged, "rx")) == 1  # the site reading another tensor keeps its pair
    x = rng.standard_normal((7, 64)).astype(np.float32)
    for a, b in zip(run(separate, {"x": x}), run(merged, {"x": x})):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
    assert rewrite(model, plans, {}, factor_dtype, merge=True).SerializeToString() == merged.SerializeToString()


def test_compress_quantized_merge_keeps_the_outputs(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from transformer_builder import build_transformer, make_token_batch

    model = build_transformer(32, 1, 2, 64, 50, max_len=8)
    path = tmp_path / "bert.onnx"
    onnx.save(model, path)
    calib = make_token_batch(32, 8, 50, seed=0)
    np.savez(tmp_path / "calib.npz", **calib)
    common = dict(quantize="int8", rank=8, method="whiten", calibration=str(tmp_path / "calib.npz"), progress=False)
    separate, _ = compress_quantized(str(path), **common)
    merged, _ = compress_quantized(str(path), merge=True, **common)
    assert [n.op_type for n in merged.graph.node].count("Split") > [n.op_type for n in separate.graph.node].count(
        "Split")
    feed = make_token_batch(4, 8, 50, seed=3)
    for a, b in zip(run(separate, feed), run(merged, feed)):
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(a)), 1e-6)


# --- the budget's cost: energies and leading factors from the smaller Gram -------------------------------------


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_gram_energies_and_leading_factors_match_the_svd(shape):
    from onnx_fwlr.methods.lowrank import weighted_svd
    from onnx_fwlr.quant import compensate

    rng = np.random.default_rng(0)
    M = rng.standard_normal(shape) @ np.diag(np.linspace(0.5, 3.0, shape[1]))
    exact = weighted_svd(M)
    assert np.allclose(compensate.spectrum_energy(M)[:min(shape)], exact.energy, rtol=1e-10, atol=1e-10)
    leading = compensate.leading_svd(M, 12)
    A, B = leading.factors(12)
    A2, B2 = exact.factors(12)
    assert np.max(np.abs(A @ B - A2 @ B2)) <= 1e-10 * np.max(np.abs(A2 @ B2))
    assert leading.dropped_energy(12) == pytest.approx(exact.dropped_energy(12), rel=1e-10)
    # rank deficient: components the Gram cannot resolve come back as zeros, never as noise
    low = rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))
    A, B = compensate.leading_svd(low, 8).factors(8)
    assert np.all(np.isfinite(A)) and np.max(np.abs(A @ B - low)) <= 1e-8 * np.max(np.abs(low))
