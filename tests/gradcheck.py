"""Checking a VJP rule against central finite differences of the ONNX op itself, in float64 (shared by the
rule tests: tests/test_vjp.py, the decoder and structured-training tests)."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnx_fwlr.autodiff.vjp import RULES, shape_only, vjp

RNG = np.random.default_rng(1234)
INT64_MAX = np.iinfo(np.int64).max


def rand(*shape, low=-1.5, high=1.5):
    return RNG.uniform(low, high, size=shape)


def away_from_zero(*shape):
    """Values in ±[0.2, 1.5]: far from the kinks of Relu/Abs/LeakyRelu."""
    return RNG.choice([-1.0, 1.0], size=shape) * RNG.uniform(0.2, 1.5, size=shape)


def build(op, args, attrs, opset, n_out):
    """Single-node model: float64 args are graph inputs, everything else an initializer."""
    names, inputs, inits = [], [], []
    for i, a in enumerate(args):
        if a is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        a = np.asarray(a)
        if a.dtype == np.float64:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, a.shape))
        else:
            inits.append(helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape,
                                            a.ravel().tolist()))
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_empty_tensor_value_info(o) for o in outs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def make_forward(model, engine):
    if engine == "ort":
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda feed: session.run(None, feed)
    evaluator = ReferenceEvaluator(model)
    return lambda feed: evaluator.run(None, feed)


def restrict(rule, wanted, args, outs):
    """What the graph layer would hand the rule: only declared values, shape stand-ins, else None."""
    needs = rule.needs(frozenset(wanted), len(args))
    ins = [None if a is None else np.asarray(a) if i in needs.inputs
           else shape_only(np.shape(a)) if i in needs.input_shapes else None
           for i, a in enumerate(args)]
    return ins, [o if k in needs.outputs else None for k, o in enumerate(outs)]


def check(op, args, attrs=None, opset=17, n_out=1, wanted=None, engine="ref", drop_grads=(), h=1e-6):
    attrs = attrs or {}
    model = build(op, args, attrs, opset, n_out)
    forward = make_forward(model, engine)
    float_idx = [i for i, a in enumerate(args) if a is not None and np.asarray(a).dtype == np.float64]
    feed = {f"in{i}": np.asarray(args[i]) for i in float_idx}
    outs = forward(feed)
    grads = [None if k in drop_grads else RNG.standard_normal(np.shape(o)) for k, o in enumerate(outs)]

    def loss(f):
        return sum(float(np.sum(g * o)) for g, o in zip(grads, forward(f)) if g is not None)

    wanted = float_idx if wanted is None else wanted
    ins, outs_r = restrict(RULES[op], wanted, args, outs)
    rule_attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    got = vjp(op, ins, outs_r, rule_attrs, grads, opset, wanted)
    for i in range(len(args)):
        if i not in wanted:
            assert got[i] is None, f"{op}: unexpected cotangent for input {i}"
            continue
        x = feed[f"in{i}"]
        fd = np.zeros(x.shape)
        for idx in np.ndindex(*x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += h
            minus[idx] -= h
            fd[idx] = (loss({**feed, f"in{i}": plus}) - loss({**feed, f"in{i}": minus})) / (2 * h)
        g = np.asarray(got[i])
        assert g.shape == x.shape, f"{op}: cotangent shape {g.shape} != input shape {x.shape}"
        err = np.linalg.norm(g - fd) / max(np.linalg.norm(fd), 1e-12)
        assert err <= 1e-6, f"{op} input {i}: relative error {err:.2e}"


def ints(*values):
    return np.array(values, dtype=np.int64)
