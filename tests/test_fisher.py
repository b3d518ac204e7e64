"""Loss seeds and per-sample Fisher accumulation."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.autodiff.losses import (
    SeedTarget,
    accumulate_fisher,
    ce_seed,
    default_seed_loss,
    find_seed_target,
    gaussian_seeds,
    make_seeds,
    mc_seeds,
    new_accumulator,
)
from onnx_fwlr.errors import FwlrError


def naive_fisher(X, G):
    """Per-sample dW_n = X_nᵀ G_n in float64, squared and summed, the slow obvious way."""
    row, col = np.zeros(X.shape[-1]), np.zeros(G.shape[-1])
    gram = np.zeros((G.shape[-1],) * 2)
    for x, g in zip(X.astype(np.float64), G.astype(np.float64)):
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        dw = x.T @ g
        row += (dw ** 2).sum(axis=1)
        col += (dw ** 2).sum(axis=0)
        gram += g.T @ g
    return row, col, gram


@pytest.mark.parametrize("shape_x,shape_g", [
    ((5, 7, 6), (5, 7, 4)),            # many positions: forms dW_n directly
    ((5, 6), (5, 4)),                  # one position: via position Grams
    ((3, 2, 3, 6), (3, 2, 3, 4)),      # extra position axes are flattened
    ((4, 3, 40), (4, 3, 30)),          # few positions, wide weight: via position Grams
])
def test_accumulate_matches_per_sample_definition(shape_x, shape_g):
    rng = np.random.default_rng(0)
    X, G = rng.standard_normal(shape_x).astype(np.float32), rng.standard_normal(shape_g).astype(np.float32)
    acc = accumulate_fisher({}, X, G)
    row, col, gram = naive_fisher(X, G)
    assert acc["grad_count"] == X.shape[0]
    assert all(acc[k].dtype == np.float64 for k in ("fisher_row", "fisher_col", "grad_gram"))
    assert np.allclose(acc["fisher_row"], row, rtol=1e-5)
    assert np.allclose(acc["fisher_col"], col, rtol=1e-5)
    assert np.allclose(acc["grad_gram"], gram, rtol=1e-5, atol=1e-5)
    batch_sum = np.einsum("bpk,bpn->kn", X.reshape(X.shape[0], -1, X.shape[-1]).astype(np.float64),
                          G.reshape(G.shape[0], -1, G.shape[-1]).astype(np.float64))
    assert not np.allclose(acc["fisher_row"], (batch_sum ** 2).sum(axis=1))  # per-sample, not batch sum


def test_accumulate_adds_across_calls_and_without_gram():
    rng = np.random.default_rng(1)
    X, G = rng.standard_normal((6, 3, 5)), rng.standard_normal((6, 3, 2))
    acc = new_accumulator(5, 2, with_gram=False)
    accumulate_fisher(acc, X[:2], G[:2])
    accumulate_fisher(acc, X[2:], G[2:])
    row, col, _ = naive_fisher(X, G)
    assert "grad_gram" not in acc and acc["grad_count"] == 6
    assert np.allclose(acc["fisher_row"], row) and np.allclose(acc["fisher_col"], col)
    with pytest.raises(FwlrError):
        accumulate_fisher(acc, X[:3], G[:2])


@pytest.mark.parametrize("k,n", [(6, 4), (40, 30)])  # direct dW_n, and position Grams
def test_accumulate_leaves_padding_positions_out(k, n):
    rng = np.random.default_rng(2)
    X, G = rng.standard_normal((4, 7, k)), rng.standard_normal((4, 7, n))
    lengths = [7, 3, 1, 0]
    keep = np.arange(7)[None, :] < np.array(lengths)[:, None]
    acc = accumulate_fisher({}, X, G, keep=keep.astype(np.int64))  # an int attention mask, as models take it
    row, col = np.zeros(k), np.zeros(n)
    for x, g, length in zip(X, G, lengths):  # the definition on each sample's real positions only
        dw = x[:length].T @ g[:length]
        row, col = row + (dw**2).sum(1), col + (dw**2).sum(0)
    real = G[keep]
    assert acc["grad_count"] == 4
    np.testing.assert_allclose(acc["fisher_row"], row, rtol=1e-10)
    np.testing.assert_allclose(acc["fisher_col"], col, rtol=1e-10)
    np.testing.assert_allclose(acc["grad_gram"], real.T @ real, rtol=1e-10)


def test_ce_seed_is_gradient_of_per_sample_cross_entropy():
    rng = np.random.default_rng(2)
    z, y = rng.standard_normal((4, 5)), np.array([0, 3, 4, 1])

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        return -(z[np.arange(4), y] - np.log(np.exp(z).sum(axis=1))).sum()

    fd = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        e = np.zeros_like(z)
        e[idx] = 1e-6
        fd[idx] = (ce(z + e) - ce(z - e)) / 2e-6
    assert np.allclose(ce_seed(z, y), fd, atol=1e-8)


def test_ce_seed_sequence_weights_and_axis():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 4))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    seed = ce_seed(z, labels, weight=mask)
    assert seed.dtype == np.float32
    assert not seed[0, 3].any() and not seed[1, 2:].any() and seed[0, :3].any()
    assert np.allclose(seed.sum(axis=-1), 0, atol=1e-6)
    moved = ce_seed(np.moveaxis(z, -1, 1), labels, axis=1)
    assert np.allclose(np.moveaxis(moved, 1, -1), ce_seed(z, labels), atol=1e-6)
    with pytest.raises(FwlrError):
        ce_seed(z, labels, weight=np.ones((3, 4)))
    with pytest.raises(FwlrError):
        ce_seed(z, labels + 3)


def test_ce_seed_legacy_softmax_normalises_flattened_trailing_axes():
    z = np.random.default_rng(4).standard_normal((2, 3, 4))
    seed = ce_seed(z, np.array([5, 11]), axis=1, legacy_2d=True)
    flat = seed.reshape(2, 12)
    assert np.allclose(flat.sum(axis=1), 0)
    assert flat[0, 5] < 0 and flat[1, 11] < 0 and (np.delete(flat[0], 5) > 0).all()


def test_mc_seeds_sample_the_model_distribution():
    z = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    seeds = mc_seeds(z, 4000, np.random.default_rng(5))
    p = np.exp(z)
    picked = np.stack([(p - s).round(6) for s in seeds])  # onehot of the sampled class
    assert np.allclose(picked.sum(axis=-1), 1)
    assert np.allclose(picked.mean(axis=0), p, atol=0.03)
    second_moment = np.mean([np.einsum("i,j->ij", s[0], s[0]) for s in seeds], axis=0)
    assert np.allclose(second_moment, np.diag(p[0]) - np.outer(p[0], p[0]), atol=0.03)  # the Fisher of softmax
    again = mc_seeds(z, 3, np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(again, seeds[:3]))


def test_gaussian_seeds_shape_dtype_and_mask():
    seeds = gaussian_seeds((2, 3, 4), 2, np.random.default_rng(6), weight=np.array([[1, 1, 0], [1, 0, 0]]))
    assert len(seeds) == 2 and seeds[0].shape == (2, 3, 4) and seeds[0].dtype == np.float32
    assert not seeds[0][0, 2].any() and not seeds[1][1, 1:].any() and seeds[0][0, :2].all()
    assert not np.array_equal(seeds[0], seeds[1])


def classifier_model(opset=17, softmax=True):
    """X[B,T,6] -> MatMul W1 -> Tanh -> MatMul W2 -> ReduceMean(T) -> Gemm(transB) -> logits [-> Softmax]."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Tanh", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "W2"], ["h2"]),
             helper.make_node("ReduceMean", ["h2"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "Wc", "bc"], ["logits"], transB=1)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 3])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 3])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("W1", (6, 8)), ("W2", (8, 5)), ("Wc", (3, 5)), ("bc", (3,))]]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 6])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_find_seed_target_and_default_loss():
    target = find_seed_target(classifier_model(), "probs")
    assert target == SeedTarget("logits", True, 1, False)
    legacy = find_seed_target(classifier_model(opset=11), "probs")
    assert legacy.tensor == "logits" and legacy.legacy_2d and legacy.axis == 1
    plain = find_seed_target(classifier_model(softmax=False), "logits")
    assert plain == SeedTarget("logits")
    assert default_seed_loss(target, (4, 3), labels_given=True) == "ce"
    assert default_seed_loss(target, (4, 3), labels_given=False) == "mc"
    assert default_seed_loss(plain, (4, 3), labels_given=False) == "mc"
    assert default_seed_loss(plain, (4, 3), labels_given=False, class_scores=True) == "mc"
    assert default_seed_loss(plain, (4, 3), labels_given=False, class_scores=False) == "gaussian"  # an embedding
    assert default_seed_loss(target, (4, 3), labels_given=False, class_scores=False) == "mc"  # its softmax decides
    assert default_seed_loss(SeedTarget("h"), (4, 7, 16), labels_given=False) == "gaussian"
    with pytest.raises(FwlrError):
        make_seeds("ce", np.zeros((2, 3)))


SITES = {"W1": ("x", "h1"), "W2": ("a1", "h2"), "Wc": ("pooled", "logits")}


def fisher_over(runner, target, feeds, labels):
    acc = {site: {} for site in SITES}
    for feed, y in zip(feeds, labels):
        values = runner.forward(feed)
        for seed in make_seeds("ce", values[target.tensor], target=target, labels=y):
            grads = runner.backward(values, seed)
            for site, (x_name, y_name) in SITES.items():
                accumulate_fisher(acc[site], values[x_name], grads[y_name])
    return acc


def test_fisher_batch_one_equals_batch_eight():
    model = classifier_model()
    target = find_seed_target(model, "probs")
    runner = GradientRunner(model, target.tensor, [y for _, y in SITES.values()],
                            extra_outputs=[x for x, _ in SITES.values()])
    rng = np.random.default_rng(8)
    x, labels = rng.standard_normal((8, 4, 6)).astype(np.float32), rng.integers(0, 3, 8)
    one = fisher_over(runner, target, [{"x": x[i:i + 1]} for i in range(8)], [labels[i:i + 1] for i in range(8)])
    eight = fisher_over(runner, target, [{"x": x}], [labels])
    for site in SITES:
        assert one[site]["grad_count"] == eight[site]["grad_count"] == 8
        for key in ("fisher_row", "fisher_col", "grad_gram"):
            assert np.allclose(one[site][key], eight[site][key], rtol=1e-4, atol=1e-7), (site, key)
        assert eight[site]["fisher_row"].min() > 0
