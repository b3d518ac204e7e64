"""Quantized main branch + importance-weighted low-rank correction (onnx_fwlr.quant, pipeline.quantized)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from builders import gemm_model, make_model, matmul_model, run, vinfo
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.allocation import Option, allocate, lower_hull
from onnx_fwlr.methods.lowrank import gram_scaling
from onnx_fwlr.pipeline.quantized import compress_quantized
from onnx_fwlr.quant import budget, compensate, ortquant
from onnx_fwlr.quant.plan import dequantized

INT4 = ortquant.nbits(4, 32)


def _random_gram(K: int, seed: int) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((4 * K, K)) * np.linspace(0.2, 3.0, K)
    return X.T @ X / len(X)


def _run_matmulnbits(q: ortquant.QuantizedWeight, X: np.ndarray) -> np.ndarray:
    attrs = {a.name: helper.get_attribute_value(a) for a in q.node.attribute}
    node = helper.make_node("MatMulNBits", ["x"] + list(q.node.input[1:]), ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [vinfo("x", ["M", attrs["K"]])], [vinfo("y", ["M", attrs["N"]])],
                              q.tensors)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return run(model, {"x": X.astype(np.float32)})[0]


@pytest.mark.parametrize("scheme", [ortquant.nbits(4, 32), ortquant.nbits(4, 16, symmetric=True),
                                    ortquant.nbits(8, 64), ortquant.nbits(4, 128)])
def test_dequantized_matmul_weight_is_what_onnx_runtime_computes(scheme):
    W = np.random.default_rng(0).standard_normal((128, 24)).astype(np.float32)
    q = ortquant.quantize_matmul_weight(W, scheme, "w")
    from_ort = _run_matmulnbits(q, np.eye(128))  # the identity's product is the dequantized weight itself
    np.testing.assert_allclose(ortquant.dequantize_matmul_weight(q), from_ort, rtol=0, atol=1e-6)
    assert 0 < np.abs(from_ort - W).max() < np.abs(W).max() / (2 if scheme.bits == 4 else 50)
    assert scheme.matmul_bytes(128, 24) == sum(numpy_helper.to_array(t).nbytes for t in q.tensors)


def test_dequantized_table_and_dynamic_int8_are_what_onnx_runtime_computes():
    rng = np.random.default_rng(1)
    T = rng.standard_normal((40, 64)).astype(np.float32)
    q = ortquant.quantize_table(T, ortquant.nbits(4, 32), "T")
    attrs = {a.name: helper.get_attribute_value(a) for a in q.node.attribute}
    node = helper.make_node("GatherBlockQuantized", [q.node.input[0], "ids"] + list(q.node.input[2:]), ["y"],
                            domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [vinfo("ids", [40], TensorProto.INT64)], [vinfo("y", [40, 64])], q.tensors)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    from_ort = run(model, {"ids": np.arange(40)})[0]
    np.testing.assert_allclose(ortquant.dequantize_table(q), from_ort, atol=1e-6, rtol=0)

    W = rng.standard_normal((32, 16)).astype(np.float32)
    deq = ortquant.dynamic_int8_weight(W)
    quantized = ortquant.quantize_dynamic_nodes(matmul_model(W, ("batch", 32)), ["mm"])
    arrays = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    q8, scale = arrays["W_quantized"].astype(np.float64), arrays["W_scale"].astype(np.float64)
    np.testing.assert_allclose(deq, (q8 - arrays["W_zero_point"]) * scale, atol=1e-7)
    assert np.abs(deq - W).max() <= scale.max() / 2 + 1e-6


def _weight_on_the_grid_plus_low_rank(K=64, N=20, r=8, seed=0):
    """W = deq(Q(W0)) + A B where quantizing W gives deq(Q(W0)) back: every block of 32 rows holds its
    extremes in its first two rows, A is zero there, and |A B| stays far below half a quantization step."""
    rng = np.random.default_rng(seed)
    W0 = rng.uniform(-0.8, 0.8, size=(K, N))
    W0[0::32], W0[1::32] = 1.0, -1.0
    grid = dequantized(W0.astype(np.float32), INT4)
    assert np.allclose(dequantized(grid.astype(np.float32), INT4), grid, atol=1e-6)  # the grid is a fixed point
    A = rng.standard_normal((K, r))
    A[0::32] = A[1::32] = 0.0
    AB = A @ rng.standard_normal((r, N))
    AB *= 0.02 / np.abs(AB).max()  # a step is 2/15 ≈ 0.13
    return grid + AB, grid


def test_weight_on_the_grid_plus_rank_r_is_reproduced_exactly():
    W, grid = _weight_on_the_grid_plus_low_rank()
    W32 = W.astype(np.float32)
    np.testing.assert_allclose(dequantized(W32, INT4), grid, atol=1e-6)
    left = gram_scaling(_random_gram(64, 1))
    spectrum = compensate.residual_spectrum(W32, dequantized(W32, INT4), left)
    A, B = compensate.correction(spectrum, 8)
    np.testing.assert_allclose(dequantized(W32, INT4) + A @ B, W32, atol=1e-6)
    assert spectrum.dropped_energy(8) < 1e-10 * spectrum.total

    model, report = compress_quantized(matmul_model(W32, ("batch", 64)), quantize="int4", rank=8, method="svd",
                                       factors="float32", progress=False)
    X = np.random.default_rng(2).standard_normal((7, 64)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": X})[0], X @ W32, atol=1e-4)
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 1
    assert report.sites[0].rank == 8


def test_correction_error_falls_with_rank_and_matches_the_dropped_energy():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((96, 48)).astype(np.float32)
    left, right = gram_scaling(_random_gram(96, 4)), gram_scaling(_random_gram(48, 5))
    deq = dequantized(W, INT4)
    spectrum = compensate.residual_spectrum(W, deq, left, right)
    errors = [compensate.weighted_error(W - deq, left, right)]
    for r in (4, 8, 16, 32, 47):
        A, B = compensate.correction(spectrum, r)
        errors.append(compensate.weighted_error(W - deq - A @ B, left, right))
        assert errors[-1] == pytest.approx(spectrum.dropped_energy(r), rel=1e-6)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[2] < 0.8 * errors[0]  # weighting concentrates the error: rank 8 of 48 removes far more than 1/6


def test_alternation_never_makes_the_weighted_error_worse():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((64, 32)).astype(np.float32)
    left = gram_scaling(_random_gram(64, 7))
    result = compensate.alternate(W, lambda M: dequantized(M.astype(np.float32), INT4), 8, 3, left)
    assert len(result.errors) == 4
    assert result.errors[result.chosen_round] == min(result.errors)
    approx = result.dequantized + result.A @ result.B
    assert compensate.weighted_error(W - approx, left) == pytest.approx(min(result.errors), rel=1e-6)


def test_lower_hull_keeps_the_convex_frontier():
    options = [Option("a", 0, 100, 10.0), Option("b", 0, 150, 9.5), Option("c", 0, 200, 4.0),
               Option("d", 0, 300, 3.5), Option("e", 0, 250, 5.0), Option("f", 0, 400, 0.0)]
    assert [o.storage for o in lower_hull(options)] == ["a", "c", "f"]


def test_allocation_respects_the_budget_and_prefers_loss_per_byte():
    steep = [Option("q", 0, 100, 50.0), Option("q", 8, 150, 10.0)]  # 0.8 loss per byte
    shallow = [Option("q", 0, 100, 50.0), Option("q", 8, 150, 40.0)]  # 0.2 loss per byte
    assert [o.rank for o in allocate([shallow, steep], 250)] == [0, 8]
    assert [o.rank for o in allocate([shallow, steep], 300)] == [8, 8]
    assert allocate([shallow, steep], 199) is None
    big = [Option("q", 0, 100, 50.0), Option("q", 8, 400, 0.0)]  # best per byte, but does not fit
    picked = allocate([big, shallow], 260)
    assert [o.rank for o in picked] == [0, 8] and sum(o.bytes for o in picked) <= 260
    assert budget.minimum_bytes([big, shallow]) == 200


def _three_site_model():
    """Gather(T) → MatMul(W1) + b1 → Gemm(W2, C, transB, alpha, beta): an embedding, a MatMul and a Gemm site."""
    rng = np.random.default_rng(8)
    T = rng.standard_normal((50, 64)).astype(np.float32)
    W1 = rng.standard_normal((64, 96)).astype(np.float32) / 8
    b1 = rng.standard_normal(96).astype(np.float32)
    W2 = rng.standard_normal((32, 96)).astype(np.float32) / 8  # stored [N, K] (transB)
    C = rng.standard_normal(32).astype(np.float32)
    nodes = [helper.make_node("Gather", ["T", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
             helper.make_node("Gemm", ["h", "W2", "C"], ["y"], name="head", transB=1, alpha=0.5, beta=2.0)]
    inits = [numpy_helper.from_array(a, n) for a, n in ((T, "T"), (W1, "W1"), (b1, "b1"), (W2, "W2"), (C, "C"))]
    model = make_model(nodes, [vinfo("ids", ["batch"], TensorProto.INT64)], [vinfo("y", ["batch", 32])], inits)
    return model, (T, W1, b1, W2, C)


def _initializers(model, suffix):
    return [numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer if t.name.endswith(suffix)]


def test_output_model_is_valid_and_matches_numpy():
    model, (T, W1, b1, W2, C) = _three_site_model()
    out, report = compress_quantized(model, quantize="int4", rank=8, method="svd", embeddings="int4",
                                     factors="float32", progress=False)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    A1, A2 = _initializers(out, "correction_A")
    B1, B2 = _initializers(out, "correction_B")
    W1_hat = dequantized(W1, INT4) + A1 @ B1
    W2_hat = dequantized(W2.T.copy(), INT4) + A2 @ B2
    table = ortquant.dequantize_table(ortquant.quantize_table(T, INT4, "T"))
    ids = np.array([0, 7, 49, 3])
    expected = 0.5 * ((table[ids] @ W1_hat + b1) @ W2_hat) + 2.0 * C
    np.testing.assert_allclose(run(out, {"ids": ids})[0], expected, rtol=1e-4, atol=1e-4)
    assert {s.op_type for s in report.sites} == {"MatMul", "Gemm", "Gather"}


@pytest.mark.parametrize("saturating", [None, "1"], ids=["this-cpu", "forced-saturating"])
def test_int8_dynamic_sites_store_exactly_the_weights_the_correction_was_fitted_to(saturating, monkeypatch):
    """On every CPU (the forced verdict writes what an AVX2-only one writes: 7-bit weights)."""
    if saturating:
        monkeypatch.setenv("ONNX_FWLR_INT8_SATURATES", saturating)
    else:
        monkeypatch.delenv("ONNX_FWLR_INT8_SATURATES", raising=False)
    rng = np.random.default_rng(9)
    W = rng.standard_normal((48, 40)).astype(np.float32)
    model = gemm_model(W, trans_a=0, trans_b=1, alpha=1.0, beta=1.0, bias=True)
    out, report = compress_quantized(model, quantize="int8", rank=8, method="svd", progress=False)
    onnx.checker.check_model(out)
    from onnx_fwlr.quant.int8_kernels import int8_saturates

    assert any("7-bit weights" in w for w in report.warnings) == int8_saturates()
    arrays = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    name = next(n for n in arrays if n.endswith("_quantized"))
    base = name[: -len("_quantized")]
    stored = (arrays[name].astype(np.float64) - arrays[base + "_zero_point"]) * arrays[base + "_scale"]
    np.testing.assert_allclose(stored, ortquant.dynamic_int8_weight(W), atol=1e-7)
    if saturating:
        assert np.abs(arrays[name].astype(int)).max() <= 64
    X = rng.standard_normal((5, 48)).astype(np.float32)
    exact = X @ W + np.linspace(-1, 1, 40)
    assert np.linalg.norm(run(out, {"x": X})[0] - exact) < 0.02 * np.linalg.norm(exact)


def test_budget_is_met_and_a_larger_budget_keeps_more():
    model, _ = _three_site_model()
    ids = np.random.default_rng(10).integers(0, 50, size=(64,))
    calibration = [{"ids": ids[i:i + 16]} for i in range(0, 64, 16)]
    sizes, errors = [], []
    for ratio in (0.3, 0.5):
        out, report = compress_quantized(model, quantize="auto", ratio=ratio, method="kfac",
                                         calibration=calibration, progress=False)
        sizes.append(out.ByteSize())
        assert out.ByteSize() <= ratio * model.ByteSize()
        errors.append(sum(s.weighted_error or 0.0 for s in report.sites))
    assert sizes[0] < sizes[1] and errors[1] <= errors[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int4", block_size=48), "power of two"),
    (dict(quantize="int4", block_size=128), "does not divide its input size K = 64"),
    (dict(quantize="int4", target_size=2_000), "below the smallest model int4 quantization can reach"),
    (dict(quantize="auto"), "`target_size` or `ratio`"),
    (dict(quantize="int2"), "unknown `quantize`"),
    (dict(quantize="int4", ratio=0.5, method="svd"), "loss units"),
])
def test_bad_inputs_get_one_sentence(kwargs, message):
    model, _ = _three_site_model()
    calibration = [{"ids": np.arange(16)}]
    options = {"method": "kfac", "calibration": calibration, **kwargs}
    with pytest.raises(FwlrError, match=message) as error:
        compress_quantized(model, progress=False, **options)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_cli_quantize_writes_a_model_within_the_target_and_refuses_bad_flags(tmp_path, capsys):
    from onnx_fwlr.cli.main import main

    model, _ = _three_site_model()
    source, output = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, ids=np.random.default_rng(11).integers(0, 50, size=(64,)))
    target = int(0.5 * source.stat().st_size)
    code = main(["compress", str(source), "-o", str(output), "--quantize", "int4", "--target-size", str(target),
                 "--calib", str(calibration), "--quiet", "--json", str(tmp_path / "report.json")])
    assert code == 0 and 0 < output.stat().st_size <= target
    assert "MatMulNBits" in {n.op_type for n in onnx.load(output).graph.node}
    assert '"quantize": "int4"' in (tmp_path / "report.json").read_text()

    capsys.readouterr()
    code = main(["compress", str(source), "-o", str(tmp_path / "bad.onnx"), "--quantize", "int4", "--block-size",
                 "128", "--quiet"])
    error = capsys.readouterr().err
    assert code == 2 and "--block-size 128 does not divide" in error and error.count("\n") == 1
    assert not (tmp_path / "bad.onnx").exists()
    code = main(["compress", str(source), "-o", str(tmp_path / "bad.onnx"), "--quantize", "int4", "--dope", "0.01"])
    assert code == 2 and "--quantize does not combine with --dope" in capsys.readouterr().err


def test_half_precision_factors_halve_the_correction_bytes_and_keep_the_outputs():
    model, _ = _three_site_model()
    ids = np.array([1, 2, 30, 49])
    out32, _ = compress_quantized(model, quantize="int4", rank=8, method="svd", embeddings="keep", factors="float32",
                                  progress=False)
    out16, _ = compress_quantized(model, quantize="int4", rank=8, method="svd", embeddings="keep", factors="float16",
                                  progress=False)
    onnx.checker.check_model(out16, full_check=True)
    halves = [t for t in out16.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert len(halves) == 4 and [n.op_type for n in out16.graph.node][:4] == ["Cast"] * 4
    saved = out32.ByteSize() - out16.ByteSize()
    assert saved > 0.9 * sum(2 * int(np.prod(t.dims)) for t in halves)
    y32, y16 = run(out32, {"ids": ids})[0], run(out16, {"ids": ids})[0]
    assert np.linalg.norm(y16 - y32) < 1e-3 * np.linalg.norm(y32)


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "48"], "--block-size 48 is not supported"),  # MatMulNBits: a power of two
    (["--block-size", "8"], "--block-size 8 is not supported"),  # ... of at least 16
    (["--block-size", "128"], "--block-size 128 does not divide its input size K = 64"),
    (["--target-size", "2000", "--calib", "CALIB"], "below the smallest model int4 quantization can reach"),
    (["--ratio", "0.01", "--calib", "CALIB"], "below the smallest model int4 quantization can reach"),
    (["--quantize", "auto", "--target-size", "500", "--calib", "CALIB"],
     "below the smallest model the options of --quantize auto can reach"),
])
def test_cli_bad_quantized_inputs_are_one_sentence_exit_2_and_write_nothing(flags, message, tmp_path, capsys):
    from onnx_fwlr.cli.main import main

    model, _ = _three_site_model()
    source, output = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, ids=np.random.default_rng(12).integers(0, 50, size=(64,)))
    flags = [str(calibration) if f == "CALIB" else f for f in flags]
    code = main(["compress", str(source), "-o", str(output), "--quantize", "int4", "--quiet", *flags])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1 and "Traceback" not in error, error
    assert not output.exists()


def test_the_quantized_report_counts_bytes_and_says_how_each_site_is_stored():
    from onnx_fwlr.evaluate.report import Report, SiteResult

    def site(name, form, rank, after):
        return SiteResult(name=name, weight=name, op_type="MatMul", K=64, N=64, rank=rank, params_before=4096,
                          params_after=after // 2, form=form, bytes_before=16384, bytes_after=after)

    report = Report(method="kfac", allocation="budget", budget={},
                    sites=[site("a", "low rank", 16, 8192), site("b", "quantized + correction", 8, 6000),
                           site("c", "fp32", None, 16384)])
    text = report.format()
    assert "bytes before" in text and "params before" not in text
    assert "chosen under the byte budget" in text and "allocation budget" not in text
    assert "2/3 sites changed (1 low rank, 1 quantized + correction)" in text and "factorised" not in text
    assert re.search(r"weights \(bytes\) +49,152 +30,576 +0.622", text)
