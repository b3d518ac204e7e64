"""Doped structured sites end to end: fit under a budget, rewrite, run in ONNX Runtime."""

import itertools

import numpy as np
import onnx
import pytest
from builders import gemm_model, make_model, matmul_model, rel_error, run, vinfo
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.structured import KronSum, LowRank, Structured, kron_params
from onnx_fwlr.methods.structured_fit import fit_best, fit_site
from onnx_fwlr.rewrite.lowrank import apply_factors
from onnx_fwlr.sites.find import find_sites, weight_matrix

SHAPE = (4, 6, 3, 8)  # K = 24, N = 24
K, N = 24, 24
SPIKES = 10


def kron_plus_sparse(seed=0, dtype=np.float32):
    """W = A ⊗ B + D exactly, D holding SPIKES entries well above the Kronecker part."""
    rng = np.random.default_rng(seed)
    W = np.kron(rng.normal(size=(4, 3)), rng.normal(size=(6, 8)))
    flat = rng.choice(W.size, SPIKES, replace=False)
    W.reshape(-1)[flat] += rng.choice([-1, 1], SPIKES) * rng.uniform(4, 6, SPIKES)
    return W.astype(dtype)


def exact_kron_fit(W):
    """One Kronecker term + SPIKES doping entries: exactly the budget W was built with."""
    budget = kron_params(SHAPE, 1) + 3 * SPIKES
    fit = fit_site(W, "kron", budget, dope=SPIKES / W.size, kron_shape=SHAPE)
    assert fit.params == budget and fit.replacement.nnz == SPIKES
    return fit


def rewritten(model, replacements):
    sites, _ = find_sites(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    apply_factors(out, sites, replacements)
    onnx.checker.check_model(out, full_check=True)
    return out


def test_matmul_recovers_kron_plus_sparse_through_the_rewrite():
    W = kron_plus_sparse()
    fit = exact_kron_fit(W.astype(np.float64))
    assert fit.relative_error < 1e-7  # relative Frobenius error: the float32 rounding of W
    model = matmul_model(W, x_shape=("batch", "seq", None))
    out = rewritten(model, {"W": fit.replacement})
    x = np.random.default_rng(1).normal(size=(2, 3, K)).astype(np.float32)
    assert rel_error(run(model, {"x": x})[0], run(out, {"x": x})[0]) <= 1e-5
    assert "ScatterND" in {n.op_type for n in out.graph.node} and "W" not in {t.name for t in out.graph.initializer}


@pytest.mark.parametrize("trans_a,trans_b,bias", list(itertools.product([0, 1], [0, 1], [False, True])))
def test_gemm_semantics_around_the_structure(trans_a, trans_b, bias):
    W = kron_plus_sparse(seed=2)
    model = gemm_model(W, trans_a, trans_b, alpha=0.7, beta=1.3, bias=bias)
    sites, _ = find_sites(model)
    fit = exact_kron_fit(weight_matrix(model, sites[0]))
    out = rewritten(model, {"W": fit.replacement})
    x = np.random.default_rng(3).normal(size=(K, 5) if trans_a else (5, K)).astype(np.float32)
    assert rel_error(run(model, {"x": x})[0], run(out, {"x": x})[0]) <= 1e-5


def test_bias_correction_shift_is_added_with_alpha():
    W = kron_plus_sparse(seed=4)
    model = gemm_model(W, 0, 1, alpha=0.5, beta=2.0, bias=True)
    sites, _ = find_sites(model)
    fit = exact_kron_fit(weight_matrix(model, sites[0]))
    shift = np.linspace(-1, 1, N)
    fit.replacement.shift = shift
    out = rewritten(model, {"W": fit.replacement})
    x = np.random.default_rng(5).normal(size=(5, K)).astype(np.float32)
    want = run(model, {"x": x})[0] + 0.5 * shift
    assert rel_error(want, run(out, {"x": x})[0]) <= 1e-5


@pytest.mark.parametrize("use_gram", [False, True])
def test_doped_low_rank_recovers_low_rank_plus_sparse(use_gram):
    rng = np.random.default_rng(6)
    W = rng.normal(size=(K, 3)) @ rng.normal(size=(3, N))
    W.reshape(-1)[rng.choice(W.size, 8, replace=False)] += 5.0
    X = rng.normal(size=(200, K)) @ rng.normal(size=(K, K))  # correlated inputs
    gram = X.T @ X / len(X) if use_gram else None
    fit = fit_site(W, "lowrank", 3 * (K + N) + 3 * 8, dope=8 / W.size, gram=gram)
    assert isinstance(fit.replacement.structure, LowRank) and fit.replacement.structure.A.shape == (K, 3)
    np.testing.assert_allclose(fit.replacement.dense(), W, atol=1e-6 * np.abs(W).max())
    model = matmul_model(W.astype(np.float32))
    out = rewritten(model, {"W": fit.replacement})
    x = rng.normal(size=(7, K)).astype(np.float32)
    assert rel_error(run(model, {"x": x})[0], run(out, {"x": x})[0]) <= 1e-5


def test_shared_weight_stores_initializers_once_with_unique_node_names():
    W = kron_plus_sparse(seed=7)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y1"], name="mm"),
        helper.make_node("Relu", ["x"], ["xr"]),
        helper.make_node("Gemm", ["xr", "W"], ["y2"], name="mm2", alpha=2.0),
    ]
    model = make_model(nodes, [vinfo("x", ["b", K])], [vinfo("y1", ["b", N]), vinfo("y2", ["b", N])],
                       [numpy_helper.from_array(W, "W")])
    fit = exact_kron_fit(W.astype(np.float64))
    out = rewritten(model, {"W": fit.replacement})
    weights = [t.name for t in out.graph.initializer if t.name.startswith("W/kron/")]
    assert len(weights) == len(set(weights)) and any(n.endswith("dope_vals") for n in weights)
    assert not any(t.name.startswith("mm/") and t.name.endswith("dope_vals") for t in out.graph.initializer)
    names = [n.name for n in out.graph.node]
    outputs = [o for n in out.graph.node for o in n.output]
    assert len(names) == len(set(names)) and len(outputs) == len(set(outputs))
    x = np.random.default_rng(8).normal(size=(4, K)).astype(np.float32)
    for want, got in zip(run(model, {"x": x}), run(out, {"x": x})):
        assert rel_error(want, got) <= 1e-5
    again = rewritten(model, {"W": fit.replacement})
    assert again.SerializeToString() == out.SerializeToString()  # deterministic


def test_names_already_taken_get_a_suffix():
    W = kron_plus_sparse(seed=9)
    nodes = [helper.make_node("Identity", ["x"], ["mm/kron/x3"]),
             helper.make_node("MatMul", ["mm/kron/x3", "W"], ["y"], name="mm")]
    model = make_model(nodes, [vinfo("x", ["b", K])], [vinfo("y", ["b", N])], [numpy_helper.from_array(W, "W")])
    out = rewritten(model, {"W": exact_kron_fit(W.astype(np.float64)).replacement})
    assert any(n.name.startswith("mm/kron_1/") for n in out.graph.node)
    x = np.random.default_rng(10).normal(size=(3, K)).astype(np.float32)
    assert rel_error(run(model, {"x": x})[0], run(out, {"x": x})[0]) <= 1e-5


def test_weight_used_inside_an_if_branch():
    W = kron_plus_sparse(seed=11)
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_mm")], "then", [],
                                   [vinfo("t", ["b", N])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vinfo("e", ["b", N])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                       [vinfo("x", ["b", K]), vinfo("c", [], TensorProto.BOOL)], [vinfo("y", ["b", N])],
                       [numpy_helper.from_array(W, "W")])
    out = rewritten(model, {"W": exact_kron_fit(W.astype(np.float64)).replacement})
    assert any(t.name.startswith("W/kron/") for t in out.graph.initializer)  # stored in the owning graph
    x = np.random.default_rng(12).normal(size=(3, K)).astype(np.float32)
    feed = {"x": x, "c": np.array(True)}
    assert rel_error(run(model, feed)[0], run(out, feed)[0]) <= 1e-5


def test_float16_weight_with_doping_runs():
    W = kron_plus_sparse(seed=13, dtype=np.float16)
    model = matmul_model(W)
    out = rewritten(model, {"W": exact_kron_fit(W.astype(np.float64)).replacement})
    assert {t.data_type for t in out.graph.initializer if t.name.endswith(("/A", "/B", "dope_vals"))} == {TensorProto.FLOAT16}  # noqa: E501
    x = np.random.default_rng(14).normal(size=(4, K)).astype(np.float16)
    assert rel_error(run(model, {"x": x})[0], run(out, {"x": x})[0]) <= 5e-3


def test_parameter_and_byte_counts_match_the_stored_initializers():
    rng = np.random.default_rng(15)
    W = rng.normal(size=(K, N))
    for structure in ("kron", "lowrank"):
        fit = fit_site(W, structure, 0.4 * K * N, dope=0.02)
        k = fit.replacement.nnz
        assert k == round(0.02 * K * N) and fit.params <= 0.4 * K * N
        out = rewritten(matmul_model(W.astype(np.float32)), {"W": fit.replacement})
        tensors = [numpy_helper.to_array(t) for t in out.graph.initializer]
        floats = sum(a.size for a in tensors if a.dtype == np.float32)
        indices = sum(a.size for a in tensors if a.dtype == np.int32)
        assert floats + indices == fit.params and indices == 2 * k
        assert fit.bytes == sum(a.nbytes for a in tensors if a.dtype in (np.float32, np.int32))


def test_budget_too_small_or_too_large_keeps_the_weight_dense():
    W = np.random.default_rng(16).normal(size=(K, N))
    assert fit_site(W, "kron", K * N, kron_shape=SHAPE) is None
    assert fit_site(W, "lowrank", (K + N) - 1) is None
    assert fit_site(W, "kron", 3 * round(0.05 * K * N), dope=0.05) is None  # the doping alone takes the budget
    with pytest.raises(FwlrError, match="kron_shape"):
        fit_site(W, "kron", 300, kron_shape=(5, 5, 3, 8))


def test_weighted_error_is_the_expected_output_error():
    """With the Gram metric, fit.error is E‖x (W − W')‖² over the calibration rows."""
    rng = np.random.default_rng(17)
    W = rng.normal(size=(K, N))
    X = rng.normal(size=(500, K)) * np.linspace(0.1, 3, K)
    gram = X.T @ X / len(X)
    for structure in ("kron", "lowrank"):
        fit = fit_site(W, structure, 0.5 * K * N, gram=gram, dope=0.01)
        measured = np.mean(np.sum((X @ (W - fit.replacement.dense())) ** 2, axis=1))
        assert fit.error == pytest.approx(measured, rel=1e-3)


def test_row_weights_lower_the_weighted_error():
    rng = np.random.default_rng(18)
    W = rng.normal(size=(K, N))
    w = np.linspace(0.05, 3.0, K)
    weighted = fit_site(W, "lowrank", 0.5 * K * N, row_weights=w, dope=0.01)
    plain = fit_site(W, "lowrank", 0.5 * K * N, dope=0.01)
    plain_err = np.sum((w[:, None] * (W - plain.replacement.dense())) ** 2)
    assert weighted.error < plain_err


def test_mixed_choice_picks_the_lower_error():
    rng = np.random.default_rng(19)
    kron_w = np.kron(rng.normal(size=(4, 3)), rng.normal(size=(6, 8)))  # full rank, one Kronecker term
    low_w = rng.normal(size=(K, 2)) @ rng.normal(size=(2, N))  # rank 2, no Kronecker structure
    budget = 2 * (K + N)  # 96: rank 2, or one term (60) of the forced shape
    for W, winner in ((kron_w, "kron"), (low_w, "lowrank")):
        fits = {s: fit_site(W, s, budget, kron_shape=SHAPE) for s in ("kron", "lowrank")}
        best = fit_best(W, ["lowrank", "kron"], budget, kron_shape=SHAPE)
        assert best.structure == winner
        assert best.error == min(f.error for f in fits.values())
        assert best.error < 1e-12 * np.sum(W**2) < fits["kron" if winner == "lowrank" else "lowrank"].error


def test_opset_is_upgraded_when_safe_and_refused_when_not():
    W = kron_plus_sparse(seed=20)
    fit = exact_kron_fit(W.astype(np.float64))
    plain = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [vinfo("x", ["b", K])],
        [vinfo("y", ["b", N])],
        [numpy_helper.from_array(W, "W")],
        opset=13,
        ir_version=7,
    )
    out = rewritten(plain, {"W": fit.replacement})
    assert out.opset_import[0].version == 16 and out.ir_version >= 8
    x = np.random.default_rng(21).normal(size=(3, K)).astype(np.float32)
    assert rel_error(run(plain, {"x": x})[0], run(out, {"x": x})[0]) <= 1e-5

    squeezing = make_model(  # Squeeze takes axes as an input from opset 13: the converter must add a node
        [
            helper.make_node("Unsqueeze", ["x"], ["xu"], axes=[0]),
            helper.make_node("Squeeze", ["xu"], ["xs"], axes=[0]),
            helper.make_node("MatMul", ["xs", "W"], ["y"], name="mm"),
        ],
        [vinfo("x", ["b", K])],
        [vinfo("y", ["b", N])],
        [numpy_helper.from_array(W, "W")],
        opset=12,
        ir_version=7,
    )
    sites, _ = find_sites(squeezing)
    with pytest.raises(FwlrError, match="opset 16"):
        apply_factors(squeezing, sites, {"W": fit.replacement})
    assert squeezing.opset_import[0].version == 12  # left untouched
    undoped = Structured(KronSum(fit.replacement.structure.A, fit.replacement.structure.B))
    out = rewritten(squeezing, {"W": undoped})  # without doping opset 12 is enough
    assert out.opset_import[0].version == 12
