"""LSTM/GRU input weights as sites: X_t Wᵀ ≈ (X_t P) Q, rewritten as MatMul(X, P) feeding the op with W := Q."""

import numpy as np
import onnx
import pytest
from builders import make_model, rel_error, run, vinfo
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.data import open_data
from onnx_fwlr.methods.structured import LowRank, Structured
from onnx_fwlr.rewrite.lowrank import Factors, apply_factors
from onnx_fwlr.sites.find import weight_matrix
from onnx_fwlr.sites.recurrent import find_recurrent_sites, stacked_view
from onnx_fwlr.stats.activations import collect_activation_stats
from onnx_fwlr.workflows.listing import inspect_model

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 12, 4
GATES = {"LSTM": 4, "GRU": 3}


def recurrent_model(op, direction="forward", layout=0, seed=0, bias=True, extra=None):
    """X -> LSTM/GRU with random W, R, B and initial states; outputs Y and Y_h (and Y_c for LSTM)."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    gh = GATES[op] * HIDDEN
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (dirs, gh, INPUT)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.5, (dirs, gh, HIDDEN)).astype(np.float32), "R"),
    ]
    inputs = ["x", "W", "R", "B" if bias else "", "", "h0"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (dirs, 2 * gh)).astype(np.float32), "B"))
    state = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, state).astype(np.float32), "h0"))
    outputs = ["y", "y_h"]
    if op == "LSTM":
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, state).astype(np.float32), "c0"))
        inputs.append("c0")
        outputs.append("y_c")
    attrs = dict(hidden_size=HIDDEN, direction=direction, layout=layout, **(extra or {}))
    node = helper.make_node(op, inputs, outputs, name="rnn", **attrs)
    x_shape = [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT]
    y_shape = [BATCH, SEQ, dirs, HIDDEN] if layout else [SEQ, dirs, BATCH, HIDDEN]
    outs = [vinfo("y", y_shape)] + [vinfo(name, state) for name in outputs[1:]]
    return make_model([node], [vinfo("x", x_shape)], outs, inits)


def x_feed(model, seed=1):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def svd_factors(M, rank):
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return U[:, :rank] * s[:rank], Vt[:rank]


def replace_initializer(model, name, array):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return copy


def compressed(model, rank, shift=None):
    sites, skipped = find_recurrent_sites(model)
    assert len(sites) == 1 and not skipped
    A, B = svd_factors(weight_matrix(model, sites[0]), rank)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    apply_factors(out, sites, {"W": Factors(A, B, shift)})
    onnx.checker.check_model(out, full_check=True)
    return out, A, B


CASES = [(op, direction, layout) for op in ("LSTM", "GRU") for direction in ("forward", "reverse", "bidirectional")
         for layout in (0, 1)]


def evaluate(model, feed, layout):
    """ONNX Runtime; for layout=1 (batch first), which ORT refuses to load, onnx's reference evaluator."""
    if layout == 0:
        return run(model, feed)
    return ReferenceEvaluator(model).run(None, feed)


@pytest.mark.parametrize("op,direction,layout", CASES)
def test_full_rank_rewrite_reproduces_the_op(op, direction, layout):
    model = recurrent_model(op, direction, layout)
    out, _, _ = compressed(model, rank=INPUT)
    feed = x_feed(model)
    for want, got in zip(evaluate(model, feed, layout), evaluate(out, feed, layout)):
        assert rel_error(want, got) <= 1e-5
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["MatMul", op]
    assert "W" not in {t.name for t in out.graph.initializer}
    w_new = next(t for t in out.graph.initializer if t.name == out.graph.node[1].input[1])
    dirs = 2 if direction == "bidirectional" else 1
    assert list(w_new.dims) == [dirs, GATES[op] * HIDDEN, INPUT]


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_truncated_rank_is_the_op_with_the_factored_weight(op):
    """Below full rank the rewrite computes exactly the op whose W is the low-rank product."""
    model = recurrent_model(op, "bidirectional", extra={"linear_before_reset": 1} if op == "GRU" else None)
    out, A, B = compressed(model, rank=3)
    dirs, gh = 2, GATES[op] * HIDDEN
    W_lr = (A @ B).T.reshape(dirs, gh, INPUT)  # inverse of stacked_view
    reference = replace_initializer(model, "W", W_lr)
    feed = x_feed(model)
    for want, got in zip(run(reference, feed), run(out, feed)):
        assert rel_error(want, got) <= 1e-5
    assert rel_error(run(model, feed)[0], run(out, feed)[0]) > 1e-3  # rank 3 of 12 does change it


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_folds_into_the_input_bias(bias):
    model = recurrent_model("LSTM", "bidirectional", bias=bias)
    shift = np.random.default_rng(3).normal(size=2 * 4 * HIDDEN)
    out, _, _ = compressed(model, rank=INPUT, shift=shift)
    old_B = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "B")) if bias else \
        np.zeros((2, 8 * HIDDEN), np.float32)
    new_B = old_B.copy()
    new_B[:, : 4 * HIDDEN] += shift.reshape(2, -1)
    if bias:
        reference = replace_initializer(model, "B", new_B)
    else:
        reference = onnx.ModelProto()
        reference.CopyFrom(model)
        reference.graph.initializer.append(numpy_helper.from_array(new_B, "B"))
        reference.graph.node[0].input[3] = "B"
    feed = x_feed(model)
    for want, got in zip(run(reference, feed), run(out, feed)):
        assert rel_error(want, got) <= 1e-5


def test_stacked_view_is_the_op_convention():
    """x @ stacked_view(W)[:, d-block] equals x @ W[d]ᵀ for every direction d."""
    W = np.random.default_rng(4).normal(size=(2, 12, 7))
    x = np.random.default_rng(5).normal(size=(3, 7))
    M = stacked_view(W)
    assert M.shape == (7, 24)
    for d in range(2):
        np.testing.assert_allclose(x @ M[:, d * 12:(d + 1) * 12], x @ W[d].T, atol=1e-12)


def test_shared_weight_is_stored_once_and_both_uses_rewired():
    model = recurrent_model("GRU")
    node = model.graph.node[0]
    second = helper.make_node("GRU", ["x2", "W", "R"], ["y2"], name="rnn2", hidden_size=HIDDEN)
    model.graph.node.append(second)
    model.graph.input.append(vinfo("x2", [SEQ, BATCH, INPUT]))
    model.graph.output.append(vinfo("y2", [SEQ, 1, BATCH, HIDDEN]))
    onnx.checker.check_model(model, full_check=True)
    sites, _ = find_recurrent_sites(model)
    assert len(sites) == 1 and [u.node_name for u in sites[0].uses] == [node.name, "rnn2"]
    A, B = svd_factors(weight_matrix(model, sites[0]), INPUT)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    apply_factors(out, sites, {"W": Factors(A, B)})
    onnx.checker.check_model(out, full_check=True)
    assert [t.name for t in out.graph.initializer if t.name.startswith("W/")] == ["W/factor_P", "W/factor_Q"]
    feed = {**x_feed(model), "x2": np.random.default_rng(9).normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)}
    for want, got in zip(run(model, feed), run(out, feed)):
        assert rel_error(want, got) <= 1e-5


def test_skip_reasons():
    computed = recurrent_model("LSTM")
    computed.graph.node[0].input[1] = "w_in"
    computed.graph.input.append(vinfo("w_in", [1, 16, INPUT]))
    sites, skipped = find_recurrent_sites(computed)
    assert not sites and "computed at run time" in skipped[0].reason

    also_output = recurrent_model("LSTM")
    also_output.graph.node.append(helper.make_node("Identity", ["W"], ["w_copy"]))
    also_output.graph.output.append(vinfo("w_copy", [1, 16, INPUT]))
    sites, skipped = find_recurrent_sites(also_output)
    assert not sites and "also read by other nodes" in skipped[0].reason

    sites, skipped = find_recurrent_sites(recurrent_model("GRU"), exclude="rnn")
    assert not sites and "excluded" in skipped[0].reason


def test_inspect_lists_recurrent_input_weights():
    listing = inspect_model(recurrent_model("GRU", direction="bidirectional"))
    [site] = listing.sites
    assert (site.weight, site.uses[0].op_type, site.K, site.N) == ("W", "GRU", INPUT, 2 * 3 * HIDDEN)
    assert "GRU" in listing.format()


def test_structured_replacement_is_refused():
    model = recurrent_model("LSTM")
    sites, _ = find_recurrent_sites(model)
    A, B = svd_factors(weight_matrix(model, sites[0]), 2)
    with pytest.raises(FwlrError, match="low-rank"):
        apply_factors(model, sites, {"W": Structured(LowRank(A, B))})


def test_calibration_statistics_come_from_the_op_input():
    model = recurrent_model("LSTM")
    sites, _ = find_recurrent_sites(model)
    feeds = [x_feed(model, seed) for seed in (11, 12)]
    stats = collect_activation_stats(model, sites, open_data(feeds, model), progress=False)
    rows = np.concatenate([f["x"].reshape(-1, INPUT) for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(stats.input_gram(sites[0]), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.mean_input(sites[0]), rows.mean(axis=0), rtol=1e-5, atol=1e-6)
