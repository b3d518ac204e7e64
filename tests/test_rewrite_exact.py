"""At rank >= the weight's true rank, the compressed model reproduces the original."""

import itertools

import numpy as np
import onnx
import pytest
from builders import gemm_model, low_rank, make_model, matmul_model, rel_error, run, vinfo
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr import compress

RNG = np.random.default_rng(1)


def check_exact(model, feed, rank, tol=1e-5):
    compressed, report = compress(model, rank=rank, progress=False)
    onnx.checker.check_model(compressed, full_check=True)
    assert report.factorised >= 1
    for want, got in zip(run(model, feed), run(compressed, feed)):
        assert rel_error(want, got) <= tol
    return compressed, report


def test_matmul_2d():
    W = low_rank(32, 24, 4)
    compressed, _ = check_exact(matmul_model(W), {"x": RNG.standard_normal((7, 32)).astype(np.float32)}, rank=4)
    assert [n.op_type for n in compressed.graph.node] == ["MatMul", "MatMul"]
    assert "W" not in {t.name for t in compressed.graph.initializer}


def test_matmul_batched():
    W = low_rank(32, 24, 5)
    model = matmul_model(W, x_shape=("batch", "seq", None))
    check_exact(model, {"x": RNG.standard_normal((2, 3, 32)).astype(np.float32)}, rank=6)


@pytest.mark.parametrize("trans_a,trans_b,bias", list(itertools.product([0, 1], [0, 1], [False, True])))
def test_gemm_all_variants(trans_a, trans_b, bias):
    W = low_rank(20, 16, 3, seed=trans_a + 2 * trans_b)
    model = gemm_model(W, trans_a, trans_b, alpha=0.7, beta=1.3, bias=bias)
    x_shape = [20, 5] if trans_a else [5, 20]
    compressed, _ = check_exact(model, {"x": RNG.standard_normal(x_shape).astype(np.float32)}, rank=3)
    last = compressed.graph.node[-1]
    if bias:
        assert last.op_type == "Gemm" and last.input[2] == "C"


def test_float16_weight():
    W = low_rank(32, 24, 4, dtype=np.float16)
    compressed, _ = check_exact(
        matmul_model(W), {"x": RNG.standard_normal((7, 32)).astype(np.float16)}, rank=4, tol=5e-3
    )
    dtypes = {t.data_type for t in compressed.graph.initializer}
    assert dtypes == {TensorProto.FLOAT16}


def test_constant_node_weight():
    W = low_rank(16, 12, 2)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W, "W")),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [vinfo("x", ["b", 16])], [vinfo("y", ["b", 12])])
    compressed, _ = check_exact(model, {"x": RNG.standard_normal((4, 16)).astype(np.float32)}, rank=2)
    assert "Constant" not in [n.op_type for n in compressed.graph.node]


def test_outer_scope_weight_in_if_subgraph():
    W = low_rank(16, 12, 3)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["t_out"], name="then_mm")], "then", [], [vinfo("t_out", ["b", 12])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_neg"]), helper.make_node("MatMul", ["e_neg", "W"], ["e_out"], name="else_mm")],  # noqa: E501
        "else", [], [vinfo("e_out", ["b", 12])],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph)]
    model = make_model(
        nodes, [vinfo("x", ["b", 16]), vinfo("cond", [], TensorProto.BOOL)], [vinfo("y", ["b", 12])],
        [numpy_helper.from_array(W, "W")],
    )
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    for cond in (True, False):
        compressed, report = check_exact(model, {"x": x, "cond": np.array(cond)}, rank=3)
    assert len(report.sites) == 1  # one weight, used in both branches, factorised once


def test_weight_shared_by_two_matmuls():
    W = low_rank(16, 12, 3)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y1"], name="mm1"),
        helper.make_node("Relu", ["x"], ["xr"]),
        helper.make_node("MatMul", ["xr", "W"], ["y2"], name="mm2"),
    ]
    model = make_model(nodes, [vinfo("x", ["b", 16])], [vinfo("y1", ["b", 12]), vinfo("y2", ["b", 12])],
                       [numpy_helper.from_array(W, "W")])
    compressed, report = check_exact(model, {"x": RNG.standard_normal((4, 16)).astype(np.float32)}, rank=3)
    assert len(report.sites) == 1
    factor_inits = [t.name for t in compressed.graph.initializer]
    assert len(factor_inits) == 2  # A and B stored once, used by both


def test_external_data_model(tmp_path):
    from onnx_fwlr.io.model import load_model

    W = low_rank(64, 48, 4)
    model = matmul_model(W)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    check_exact(load_model(path), {"x": RNG.standard_normal((3, 64)).astype(np.float32)}, rank=4)


def test_truncated_rank_is_the_best_approximation():
    """Below the true rank, the error is the Eckart-Young optimum: the dropped singular values."""
    W = low_rank(32, 24, 8)
    compressed, report = compress(matmul_model(W), rank=3, progress=False)
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    assert report.sites[0].weighted_error == pytest.approx(float(np.sum(s[3:] ** 2)), rel=1e-6)
    A, B = (numpy_helper.to_array(t).astype(np.float64) for t in compressed.graph.initializer)
    assert np.linalg.norm(W - A @ B) ** 2 == pytest.approx(float(np.sum(s[3:] ** 2)), rel=1e-4)


@pytest.mark.parametrize("linear", ["gemm", "matmul_add"])
def test_bias_corrections_fold_into_existing_biases(linear):
    """Gemm: the shift joins C; MatMul then Add(bias) (PyTorch's Linear): it joins that bias. No Add is added,
    the replaced bias is not left behind, and the mean output over the calibration data is the original's."""
    rng = np.random.default_rng(11)
    K, N = 24, 16
    if linear == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"),
                 helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias")]
    inits = [numpy_helper.from_array(low_rank(K, N, 8, seed=1), "W"),
             numpy_helper.from_array(np.linspace(-1, 1, N).astype(np.float32), "b")]
    model = make_model(nodes, [vinfo("x", [32, K])], [vinfo("y", [32, N])], inits)
    calib = [{"x": (rng.standard_normal((32, K)) + 2.0).astype(np.float32)} for _ in range(4)]
    small, _ = compress(model, rank=3, method="whiten", calibration=calib, progress=False)
    onnx.checker.check_model(small, full_check=True)
    ops = [n.op_type for n in small.graph.node]
    assert ops.count("Add") == (1 if linear == "matmul_add" else 0)
    assert linear == "matmul_add" or "b" not in {t.name for t in small.graph.initializer}
    y = np.concatenate([run(model, feed)[0] for feed in calib])
    y_small = np.concatenate([run(small, feed)[0] for feed in calib])
    assert rel_error(y.mean(0), y_small.mean(0)) < 1e-4


@pytest.mark.parametrize("options", [dict(method="whiten", rank=4), dict(method="whiten", ratio=0.3, dope=0.05)])
def test_a_weight_used_twice_keeps_one_bias_correction(monkeypatch, options):
    """A weight read at two places (as an unrolled recurrence reads W_hh once per step) gets one shift constant
    that both Adds read, not a copy per use; the outputs are the per-use copies' bit for bit."""
    from onnx_fwlr.rewrite import lowrank as lowrank_rewrite

    rng = np.random.default_rng(5)
    K = 24
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="step1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="step2")]
    inits = [numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32), "W")]
    model = make_model(nodes, [vinfo("x", [16, K])], [vinfo("y", [16, K])], inits)
    calib = [{"x": (rng.standard_normal((16, K)) + 1.5).astype(np.float32)} for _ in range(4)]
    shared, _ = compress(model, calibration=calib, progress=False, **options)
    onnx.checker.check_model(shared, full_check=True)
    shifts = [t.name for t in shared.graph.initializer if "bias_correction" in t.name]
    adds = [n for n in shared.graph.node if n.op_type == "Add" and n.input[1] in shifts]
    assert len(adds) == 2 and len(shifts) == 1
    monkeypatch.setattr(lowrank_rewrite, "_share_bias_corrections", lambda graph: None)
    copies, _ = compress(model, calibration=calib, progress=False, **options)
    assert len([t for t in copies.graph.initializer if "bias_correction" in t.name]) == 2
    for feed in calib:
        assert np.array_equal(run(shared, feed)[0], run(copies, feed)[0])
