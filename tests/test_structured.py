"""Doped structured matrices: the maths (structured.py) and the ONNX builders (structured_graph.py)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.doping import dope, top_k_doping
from onnx_fwlr.methods.structured import (
    KronSum,
    doping_params,
    kron_macs,
    kron_params,
    kron_shapes,
    nearest_kron,
    nearest_low_rank,
    weighted_error,
    weighted_kron_als,
)
from onnx_fwlr.rewrite.structured import (
    build_doped_kron,
    build_doped_low_rank,
    build_doping,
    build_kron_sum,
    kron_order,
    min_opset,
)

SHAPE = (4, 5, 3, 6)  # K = 20, N = 18


def random_kron_sum(rng, shape, terms):
    m1, m2, n1, n2 = shape
    return rng.normal(size=(terms, m1, n1)), rng.normal(size=(terms, m2, n2))


def kron_dense(A, B):
    return sum(np.kron(a, b) for a, b in zip(A, B))


def sparse_spikes(rng, K, N, k):
    D = np.zeros(K * N)
    where = rng.choice(K * N, k, replace=False)
    D[where] = rng.choice([-1.0, 1.0], k) * rng.uniform(1.0, 3.0, k)
    return D.reshape(K, N)


# --------------------------------------------------------------------------------------------- maths


def test_kron_shapes_are_valid_balanced_and_skip_trivial_splits():
    shapes = kron_shapes(16, 12)
    assert shapes[0] == (4, 4, 3, 4)
    for m1, m2, n1, n2 in shapes:
        assert m1 * m2 == 16 and n1 * n2 == 12 and 1 not in (m1, m2, n1, n2)
    # 7 is prime: only the trivial split is left for K, but N still gets a real one.
    assert all({m1, m2} == {1, 7} and 1 not in (n1, n2) for m1, m2, n1, n2 in kron_shapes(7, 12))


def test_kron_sum_dense_matches_numpy_kron():
    A, B = random_kron_sum(np.random.default_rng(0), SHAPE, 3)
    np.testing.assert_allclose(KronSum(A, B).dense(), kron_dense(A, B), atol=1e-12)


@pytest.mark.parametrize("terms", [1, 2])
def test_nearest_kron_recovers_exact_kron_sum(terms):
    A, B = random_kron_sum(np.random.default_rng(1), SHAPE, terms)
    W = kron_dense(A, B)
    fit = nearest_kron(W, SHAPE, terms)
    assert fit.A.shape == (terms, 4, 3) and fit.B.shape == (terms, 5, 6)
    np.testing.assert_allclose(kron_dense(fit.A, fit.B), W, atol=1e-10)


def test_nearest_kron_error_is_the_dropped_singular_values():
    W = np.random.default_rng(2).normal(size=(20, 18))
    R = W.reshape(4, 5, 3, 6).transpose(0, 2, 1, 3).reshape(12, 30)
    sigma = np.linalg.svd(R, compute_uv=False)
    err = weighted_error(W, nearest_kron(W, SHAPE, 2).dense())
    assert err == pytest.approx(np.sqrt(np.sum(sigma[2:] ** 2)), rel=1e-10)


def test_factorable_weights_are_solved_exactly():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(20, 18))
    w = np.kron(rng.uniform(0.2, 2.0, 4), rng.uniform(0.2, 2.0, 5))
    fit = nearest_kron(W, SHAPE, 2, row_weights=w)
    # diag(a⊗b)(A⊗B) = (diag(a)A)⊗(diag(b)B): the optimum equals the unweighted fit of diag(w) W.
    optimum = weighted_error(w[:, None] * W, nearest_kron(w[:, None] * W, SHAPE, 2).dense())
    assert weighted_error(W, fit.dense(), w) == pytest.approx(optimum, rel=1e-9)
    assert weighted_error(W, fit.dense(), w) < weighted_error(W, nearest_kron(W, SHAPE, 2).dense(), w)


def test_weighted_als_never_increases_the_weighted_error():
    rng = np.random.default_rng(4)
    W = rng.normal(size=(20, 18))
    w = rng.uniform(0.05, 3.0, 20)  # does not factor over (i1, i2)
    start = nearest_kron(W, SHAPE, 2)  # the unweighted solution
    fit, history = weighted_kron_als(W, start, w, sweeps=30, tol=0.0)
    assert len(history) == 31
    assert np.all(np.diff(history) <= 1e-12 * history[0])
    assert history[-1] < 0.99 * history[0]
    assert weighted_error(W, fit.dense(), w) == pytest.approx(history[-1], rel=1e-12)
    # The default path (factorable start + sweeps) is no worse than its own start.
    default = nearest_kron(W, SHAPE, 2, row_weights=w)
    start_only = nearest_kron(W, SHAPE, 2, row_weights=w, sweeps=0)
    assert weighted_error(W, default.dense(), w) <= weighted_error(W, start_only.dense(), w)


def test_top_k_doping_picks_largest_weighted_residuals():
    residual = np.array([[1.0, -5.0, 0.5], [2.0, 0.1, -3.0]])
    coo = top_k_doping(residual, 2, row_weights=[1.0, 2.0])  # weighted: [[1,5,.5],[4,.2,6]]
    assert [(int(r), int(c)) for r, c in zip(coo.rows, coo.cols)] == [(0, 1), (1, 2)]
    np.testing.assert_array_equal(coo.vals, [-5.0, -3.0])
    assert coo.rows.dtype == np.int64 and coo.cols.dtype == np.int64


def test_dope_recovers_kron_plus_sparse():
    rng = np.random.default_rng(5)
    A, B = random_kron_sum(rng, (6, 5, 4, 8), 1)
    D = sparse_spikes(rng, 30, 32, 12)
    W = kron_dense(A, B) + D
    fit = dope(W, lambda M: nearest_kron(M, (6, 5, 4, 8), 1), k=12)
    np.testing.assert_allclose(fit.structure.dense() + fit.doping.dense(), W, atol=1e-5 * np.abs(W).max())
    assert set(zip(fit.doping.rows, fit.doping.cols)) == set(zip(*np.nonzero(D)))
    assert np.all(np.diff(fit.history) <= 0)


def test_dope_recovers_low_rank_plus_sparse():
    rng = np.random.default_rng(6)
    W = rng.normal(size=(30, 3)) @ rng.normal(size=(3, 24)) + sparse_spikes(rng, 30, 24, 10)
    fit = dope(W, lambda M: nearest_low_rank(M, 3), k=10)
    np.testing.assert_allclose(fit.structure.dense() + fit.doping.dense(), W, atol=1e-5 * np.abs(W).max())


def test_weighted_dope_never_increases_the_weighted_error():
    rng = np.random.default_rng(7)
    W = rng.normal(size=(20, 18))
    w = rng.uniform(0.05, 3.0, 20)
    fit = dope(W, lambda M: nearest_kron(M, SHAPE, 2, row_weights=w), k=15, row_weights=w, tol=0.0)
    assert len(fit.history) >= 2
    assert np.all(np.diff(fit.history) <= 0)
    undoped = weighted_error(W, nearest_kron(W, SHAPE, 2, row_weights=w).dense(), w)
    final = weighted_error(W, fit.structure.dense() + fit.doping.dense(), w)
    assert final == pytest.approx(fit.history[-1], rel=1e-12) and final < undoped


def test_parameter_and_cost_counts():
    assert kron_params(SHAPE, 2) == 2 * (4 * 3 + 5 * 6)
    p = doping_params(10, 20, 18)
    assert (p.values, p.indices, p.index_dtype, p.index_bytes) == (10, 20, "int32", 80)
    assert doping_params(10, 2**31, 4).index_bytes == 160
    b_first, a_first = kron_macs(SHAPE, 2)
    assert (b_first, a_first) == (2 * 4 * 6 * (5 + 3), 2 * 5 * 3 * (4 + 6))
    assert kron_order(*SHAPE, 2) == ("a_first" if a_first < b_first else "b_first")


def test_bad_arguments_raise_fwlr_error():
    W = np.zeros((20, 18))
    with pytest.raises(FwlrError):
        nearest_kron(W, (4, 4, 3, 6), 1)
    with pytest.raises(FwlrError):
        nearest_kron(W, SHAPE, 1, row_weights=-np.ones(20))
    with pytest.raises(FwlrError):
        dope(W, lambda M: nearest_low_rank(M, 1), k=1000)


# --------------------------------------------------------------------------------------------- graph


def make_model(nodes, initializers, x_shape, N, opset=17):
    """A one-subgraph model; leading dims of x stay symbolic unless given as ints."""
    y_shape = [*x_shape[:-1], N]
    graph = helper.make_graph(
        nodes,
        "structured",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def run_and_compare(built, W):
    """Check the wrapped subgraph and compare it with x @ W for batched [2, 3, K] and 2-D [5, K] inputs."""
    K, N = W.shape
    rng = np.random.default_rng(11)
    for x_shape, shape in [(["a", "b", K], (2, 3, K)), (["t", K], (5, K))]:
        model = make_model(*built, x_shape, N)
        onnx.checker.check_model(model, full_check=True)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = rng.normal(size=shape).astype(np.float32)
        (y,) = session.run(None, {"x": x})
        expected = x.astype(np.float64) @ W
        assert y.shape == expected.shape
        assert np.linalg.norm(y - expected) <= 1e-5 * np.linalg.norm(expected)


def coo_of(D):
    rows, cols = np.nonzero(D)
    return rows.astype(np.int64), cols.astype(np.int64), D[rows, cols]


@pytest.mark.parametrize("order", ["b_first", "a_first", None])
@pytest.mark.parametrize("terms", [1, 3])
def test_kron_sum_graph_matches_numpy_kron(order, terms):
    A, B = random_kron_sum(np.random.default_rng(12), SHAPE, terms)
    run_and_compare(build_kron_sum("x", "y", "fc1", A, B, order=order), kron_dense(A, B))


@pytest.mark.parametrize("order", ["b_first", "a_first"])
def test_doped_kron_graph_matches_dense(order):
    rng = np.random.default_rng(13)
    A, B = random_kron_sum(rng, SHAPE, 2)
    D = sparse_spikes(rng, 20, 18, 9)
    D[3, 7], D[11, 7] = 1.5, -2.0  # two entries sharing a column exercise reduction="add"
    run_and_compare(build_doped_kron("x", "y", "fc1", A, B, *coo_of(D), order=order), kron_dense(A, B) + D)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_doping_graph_alone_matches_dense(index_dtype):
    D = sparse_spikes(np.random.default_rng(14), 20, 18, 25)
    run_and_compare(build_doping("x", "y", "d", *coo_of(D), 20, 18, index_dtype=index_dtype), D)


@pytest.mark.parametrize("doped", [False, True])
def test_doped_low_rank_graph_matches_dense(doped):
    rng = np.random.default_rng(15)
    A, B = rng.normal(size=(20, 4)), rng.normal(size=(4, 18))
    D = sparse_spikes(rng, 20, 18, 7) if doped else np.zeros((20, 18))
    run_and_compare(build_doped_low_rank("x", "y", "lr", A, B, *coo_of(D)), A @ B + D)


def test_graph_with_static_shape_and_fitted_doping():
    rng = np.random.default_rng(16)
    W = rng.normal(size=(20, 18))
    fit = dope(W, lambda M: nearest_kron(M, SHAPE, 2), k=30)
    nodes, inits = build_doped_kron("x", "y", "p", fit.structure.A, fit.structure.B,
                                    fit.doping.rows, fit.doping.cols, fit.doping.vals)
    model = make_model(nodes, inits, [2, 3, 20], 18)
    onnx.checker.check_model(model, full_check=True)
    x = rng.normal(size=(2, 3, 20)).astype(np.float32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expected = x @ (fit.structure.dense() + fit.doping.dense())
    assert np.linalg.norm(y - expected) <= 1e-5 * np.linalg.norm(expected)


def test_names_are_deterministic_and_prefixed():
    A, B = random_kron_sum(np.random.default_rng(17), SHAPE, 2)
    D = sparse_spikes(np.random.default_rng(18), 20, 18, 4)
    first = build_doped_kron("x", "y", "layer3", A, B, *coo_of(D))
    second = build_doped_kron("x", "y", "layer3", A, B, *coo_of(D))
    names = [n.name for n in first[0]] + [t.name for t in first[1]]
    assert names == [n.name for n in second[0]] + [t.name for t in second[1]]
    assert all(name.startswith("layer3/") for name in names) and len(set(names)) == len(names)
    assert first[0][-1].output == ["y"]


@pytest.mark.parametrize("doping", [False, True])
def test_min_opset_is_the_lowest_the_checker_accepts(doping):
    A, B = random_kron_sum(np.random.default_rng(19), SHAPE, 1)
    D = sparse_spikes(np.random.default_rng(20), 20, 18, 3) if doping else np.zeros((20, 18))
    nodes, inits = build_doped_kron("x", "y", "k", A, B, *coo_of(D))
    opset = min_opset(doping)
    onnx.checker.check_model(make_model(nodes, inits, [5, 20], 18, opset=opset), full_check=True)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(make_model(nodes, inits, [5, 20], 18, opset=opset - 1), full_check=True)
