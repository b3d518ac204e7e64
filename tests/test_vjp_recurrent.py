"""LSTM and GRU VJP rules against central finite differences of the ONNX op itself, in float64.

onnx's reference evaluator runs the op in float64 but ignores ``sequence_lens``; ONNX Runtime honours it
but runs float32 and layout 0 only. The forward used here is the reference evaluator run per batch entry on
that entry's first ``sequence_lens[b]`` steps (zero-padded after), which is what the ONNX spec defines and
what ONNX Runtime computes (checked below against ONNX Runtime in float32).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.autodiff.recurrent_vjp import input_projection_grads, recurrent_forward
from onnx_fwlr.autodiff.vjp import RULES, vjp
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.sites.recurrent import stacked_view

S, B, IN, H = 4, 3, 3, 2
GATES = {"LSTM": 4, "GRU": 3}
LENGTHS = np.array([4, 2, 3], dtype=np.int32)


def op_args(op, direction, layout, rng, lengths=True, peephole=True):
    """Random float64 inputs of the op in ONNX input order (sequence_lens int32)."""
    D, G = (2 if direction == "bidirectional" else 1), GATES[op]
    state = (B, D, H) if layout else (D, B, H)
    args = [rng.normal(size=(B, S, IN) if layout else (S, B, IN)), rng.normal(0, 0.7, (D, G * H, IN)),
            rng.normal(0, 0.7, (D, G * H, H)), rng.normal(0, 0.5, (D, 2 * G * H)),
            LENGTHS.copy() if lengths else None, rng.normal(size=state)]
    if op == "LSTM":
        args += [rng.normal(size=state), rng.normal(0, 0.5, (D, 3 * H)) if peephole else None]
    return args


def reference_forward(op, attrs, like):
    """f(args) -> outputs: onnx.reference per batch entry on its own length (float64, any layout).

    ``like``: the argument list whose missing (None) inputs the model leaves out.
    """
    names = ["" if i == 4 or a is None else f"in{i}" for i, a in enumerate(like)]
    float_names = [n for n in names if n]
    node = helper.make_node(op, names,
                            ["y", "y_h"] + (["y_c"] if op == "LSTM" else []), **attrs)
    inputs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in float_names]
    graph = helper.make_graph([node], "g", inputs, [helper.make_empty_tensor_value_info(o) for o in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    evaluator = ReferenceEvaluator(model)
    layout = attrs.get("layout", 0)
    seq_axis, batch_axis = (1, 0) if layout else (0, 1)
    state_batch = 0 if layout else 1

    def forward(args):
        lengths = args[4] if args[4] is not None else np.full(B, S)
        per_entry = []
        for b, length in enumerate(lengths):
            feed = {}
            for i, a in enumerate(args):
                if i == 4 or a is None:
                    continue
                if i == 0:
                    a = np.take(np.take(a, [b], axis=batch_axis), range(length), axis=seq_axis)
                elif i in (5, 6):
                    a = np.take(a, [b], axis=state_batch)
                feed[names[i]] = a
            y, *states = evaluator.run(None, feed)
            pad = [(0, 0)] * y.ndim
            pad[seq_axis] = (0, S - length)
            per_entry.append([np.pad(y, pad)] + states)
        return [np.concatenate([e[0] for e in per_entry], axis=0 if layout else 2)] + [
            np.concatenate([e[k] for e in per_entry], axis=state_batch) for k in range(1, len(per_entry[0]))]
    return forward


def check_rule(op, args, attrs, rng, h=1e-6, drop_grads=()):
    forward = reference_forward(op, attrs, args)
    outs = forward(args)
    np.testing.assert_allclose(recurrent_forward(op, args, attrs)[0], outs[0], atol=1e-12)
    grads = [None if k in drop_grads else rng.normal(size=o.shape) for k, o in enumerate(outs)]

    def loss(a):
        return sum(float(np.sum(g * o)) for g, o in zip(grads, forward(a)) if g is not None)

    rule = RULES[op]
    wanted = [i for i in rule.diff_inputs if i < len(args) and args[i] is not None]
    needs = rule.needs(frozenset(wanted), len(args))
    ins = [a if i in needs.inputs else None for i, a in enumerate(args)]
    got = vjp(op, ins, [None] * len(outs), attrs, grads, 17, wanted)
    for i in range(len(args)):
        if i not in wanted:
            assert got[i] is None
            continue
        x = args[i]
        fd = np.zeros(x.shape)
        for idx in np.ndindex(*x.shape):
            plus, minus = list(args), list(args)
            plus[i], minus[i] = x.copy(), x.copy()
            plus[i][idx] += h
            minus[i][idx] -= h
            fd[idx] = (loss(plus) - loss(minus)) / (2 * h)
        assert got[i].shape == x.shape
        err = np.linalg.norm(got[i] - fd) / max(np.linalg.norm(fd), 1e-12)
        assert err <= 1e-6, f"{op} input {i}: relative error {err:.2e}"
    return got


CASES = [(op, direction, layout) for op in ("LSTM", "GRU") for direction in ("forward", "reverse", "bidirectional")
         for layout in (0, 1)]


@pytest.mark.parametrize("op,direction,layout", CASES)
def test_rule_matches_finite_differences_with_sequence_lens(op, direction, layout):
    rng = np.random.default_rng(CASES.index((op, direction, layout)))
    attrs = dict(hidden_size=H, direction=direction, layout=layout)
    check_rule(op, op_args(op, direction, layout, rng), attrs, rng)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_defaults_and_partial_output_cotangents(op):
    """No bias, lengths, initial states or peepholes; only Y_h (LSTM: and Y_c) carries a cotangent."""
    rng = np.random.default_rng(7)
    args = op_args(op, "bidirectional", 0, rng, lengths=False, peephole=False)
    args[3] = args[5] = None
    if op == "LSTM":
        args[6] = None
    check_rule(op, args, dict(hidden_size=H, direction="bidirectional"), rng, drop_grads=(0,))


@pytest.mark.parametrize("layout", [0, 1])
def test_gru_linear_before_reset(layout):
    rng = np.random.default_rng(11)
    attrs = dict(hidden_size=H, direction="bidirectional", layout=layout, linear_before_reset=1)
    check_rule("GRU", op_args("GRU", "bidirectional", layout, rng), attrs, rng)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_forward_recomputation_matches_onnx_runtime(op):
    """sequence_lens semantics (zero output and frozen state past a sequence's end) as ONNX Runtime has them."""
    rng = np.random.default_rng(3)
    for direction in ("forward", "reverse", "bidirectional"):
        args = [a.astype(np.float32) if a is not None and a.dtype == np.float64 else a
                for a in op_args(op, direction, 0, rng)]
        names = [f"in{i}" for i in range(len(args))]
        attrs = dict(hidden_size=H, direction=direction)
        node = helper.make_node(op, names, ["y", "y_h"] + (["y_c"] if op == "LSTM" else []), **attrs)
        graph = helper.make_graph([node], "g", [], [helper.make_empty_tensor_value_info(o) for o in node.output],
                                  initializer=[numpy_helper.from_array(a, n) for a, n in zip(args, names)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
        for w, g in zip(want, recurrent_forward(op, args, attrs)):
            np.testing.assert_allclose(g, w, atol=2e-6)


@pytest.mark.parametrize("op,layout", [("LSTM", 0), ("LSTM", 1), ("GRU", 0), ("GRU", 1)])
def test_input_projection_grads_are_the_site_output_gradient(op, layout):
    """Xᵀ G is the weight gradient in the stacked [input, dirs·gates·hidden] view, and G Mᵀ the input's."""
    rng = np.random.default_rng(5)
    args = op_args(op, "bidirectional", layout, rng)
    attrs = dict(hidden_size=H, direction="bidirectional", layout=layout)
    grads = [rng.normal(size=o.shape) for o in recurrent_forward(op, args, attrs)]
    dx, dw = vjp(op, args, [None] * len(grads), attrs, grads, 17, {0, 1})[:2]
    G = input_projection_grads(op, args, attrs, grads)
    X = np.swapaxes(args[0], 0, 1) if layout == 0 else args[0]  # batch first
    assert G.shape == (B, S, stacked_view(args[1]).shape[1])
    np.testing.assert_allclose(X.reshape(-1, IN).T @ G.reshape(-1, G.shape[-1]), stacked_view(dw), atol=1e-10)
    dx_batch_first = np.swapaxes(dx, 0, 1) if layout == 0 else dx
    np.testing.assert_allclose(G @ stacked_view(args[1]).T, dx_batch_first, atol=1e-10)
    assert np.all(G[1, LENGTHS[1]:] == 0)  # past the sequence's end


def test_explicit_default_activations_are_accepted_and_clip_is_refused():
    rng = np.random.default_rng(2)
    args = op_args("LSTM", "bidirectional", 0, rng)
    check_rule("LSTM", args, dict(hidden_size=H, direction="bidirectional",
                                  activations=["Sigmoid", "Tanh", "Tanh"] * 2), rng)
    grads = [rng.normal(size=o.shape) for o in recurrent_forward("LSTM", args, dict(hidden_size=H,
                                                                                     direction="bidirectional"))]
    with pytest.raises(ValueError, match="clip"):
        vjp("LSTM", args, [None] * 3, dict(hidden_size=H, direction="bidirectional", clip=3.0), grads, 17, {0})
    with pytest.raises(ValueError, match="activations"):
        vjp("GRU", op_args("GRU", "forward", 0, rng), [None] * 2,
            dict(hidden_size=H, activations=["Relu", "Tanh"]), grads[:2], 17, {0})


def test_gradient_runner_names_the_unsupported_attribute():
    rng = np.random.default_rng(4)
    W = rng.normal(size=(1, 4 * H, IN)).astype(np.float32)
    R = rng.normal(size=(1, 4 * H, H)).astype(np.float32)
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="rnn", hidden_size=H, clip=2.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [S, B, IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [S, 1, B, H])],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    with pytest.raises(FwlrError, match="clip"):
        GradientRunner(model, "y", ["x"])


def test_gradient_runner_differentiates_through_an_lstm():
    """End to end: ONNX Runtime forward (float32), our backward through MatMul → LSTM, vs the rule alone."""
    rng = np.random.default_rng(6)
    args = [a.astype(np.float32) if a is not None and a.dtype == np.float64 else a
            for a in op_args("LSTM", "bidirectional", 0, rng)]
    P = rng.normal(size=(IN, IN)).astype(np.float32)
    names = ["u", "W", "R", "B", "L", "h0", "c0", "P"]
    nodes = [helper.make_node("MatMul", ["x", "proj"], ["u"]),
             helper.make_node("LSTM", names, ["y", "y_h", "y_c"], hidden_size=H, direction="bidirectional")]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(args[1:], names[1:])] + [numpy_helper.from_array(P, "proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [S, B, IN])],
                              [helper.make_tensor_value_info("y_c", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    runner = GradientRunner(model, "y_c", ["u", "x"])
    values = runner.forward({"x": args[0]})
    seed = rng.normal(size=values["y_c"].shape).astype(np.float32)
    got = runner.backward(values, seed)
    u = args[0] @ P
    want = vjp("LSTM", [u] + args[1:], [None] * 3, dict(hidden_size=H, direction="bidirectional"),
               [None, None, seed], 17, {0})[0]
    np.testing.assert_allclose(got["u"], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["x"], want @ P.T, rtol=1e-4, atol=1e-6)
