"""Graph-level reverse mode against finite differences of the whole model.

The reference forward is onnx.reference in float64 (ONNX Runtime lacks float64 kernels for some ops);
one check runs the float32 model through ONNX Runtime end to end.
"""

import numpy as np
import onnx
import pytest
from bert_builder import BATCH, CLASSES, make_bert, make_feed
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_erf
from scipy.special import erf

from onnx_fwlr.autodiff import backward
from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.errors import FwlrError


@pytest.fixture(autouse=True)
def exact_erf(monkeypatch):
    """onnx.reference evaluates Erf in float32; finite differences need float64."""
    monkeypatch.setattr(op_erf.Erf, "_run", lambda self, x: (erf(x).astype(x.dtype),))


def with_perturbation(model, name):
    """Copy of the model where tensor ``name`` becomes ``name + delta`` (delta a new graph input)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    at = next(i for i, n in enumerate(nodes) if name in n.output)
    producer = nodes[at]
    producer.output[list(producer.output).index(name)] = name + ".orig"
    nodes.insert(at + 1, helper.make_node("Add", [name + ".orig", "delta"], [name]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.input.append(helper.make_tensor_value_info("delta", TensorProto.DOUBLE, None))
    return m


def fd_check(model, feed, output, seed, name, grad, rng, entries=12, h=1e-6, tol=1e-5):
    """Central differences of <seed, output> on a random subset of entries of tensor ``name``."""
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    if name in inits:
        base = numpy_helper.to_array(model.graph.initializer[inits[name]]).astype(np.float64)

        def loss(delta):
            m = onnx.ModelProto()
            m.CopyFrom(model)
            m.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(base + delta, name))
            return float(np.sum(seed * ReferenceEvaluator(m).run([output], feed)[0]))
    else:
        evaluator = ReferenceEvaluator(with_perturbation(model, name))

        def loss(delta):
            return float(np.sum(seed * evaluator.run([output], {**feed, "delta": delta})[0]))
    flat = rng.choice(grad.size, size=min(entries, grad.size), replace=False)
    fd, an = [], []
    for f in flat:
        idx = np.unravel_index(f, grad.shape)
        step = np.zeros(grad.shape)
        step[idx] = h
        fd.append((loss(step) - loss(-step)) / (2 * h))
        an.append(grad[idx])
    fd, an = np.array(fd), np.array(an)
    err = np.linalg.norm(an - fd) / np.linalg.norm(fd)
    assert err <= tol, f"{name}: relative error {err:.2e}"


def reference_values(runner, feed):
    """What forward() would return, computed by onnx.reference in float64."""
    names = runner.fetch_names
    return {**feed, **dict(zip(names, ReferenceEvaluator(runner.exposed_model).run(names, feed)))}


WRT = ["word_emb", "l0.q.W", "l1.ln1.g", "head.W", "l0.ln1", "l1.ffn1.mm", "emb"]


def test_bert_backward_matches_finite_differences_float64():
    rng = np.random.default_rng(0)
    model, feed = make_bert(), make_feed(rng)
    runner = GradientRunner(model, "logits", WRT)
    seed = rng.standard_normal((BATCH, CLASSES))
    grads = runner.backward(reference_values(runner, feed), seed)
    for name in WRT:
        assert grads[name].dtype == np.float64
        fd_check(model, feed, "logits", seed, name, grads[name], rng)


def test_bert_backward_through_probabilities_output():
    rng = np.random.default_rng(1)
    model, feed = make_bert(seed=1), make_feed(rng)
    runner = GradientRunner(model, "probs", ["l0.v.W", "l0.ffn2.mm"])
    seed = rng.standard_normal((BATCH, CLASSES))
    grads = runner.backward(reference_values(runner, feed), seed)
    for name in ["l0.v.W", "l0.ffn2.mm"]:
        fd_check(model, feed, "probs", seed, name, grads[name], rng)


def test_bert_float32_onnxruntime_forward_matches_float64_backward():
    rng = np.random.default_rng(2)
    feed = make_feed(rng)
    runner64 = GradientRunner(make_bert(np.float64), "logits", WRT)
    runner32 = GradientRunner(make_bert(np.float32), "logits", WRT)
    seed = rng.standard_normal((BATCH, CLASSES))
    values32 = runner32.forward(feed)
    values64 = reference_values(runner64, feed)
    assert np.allclose(values32["logits"], values64["logits"], rtol=1e-4, atol=1e-5)
    g32 = runner32.backward(values32, seed.astype(np.float32))
    g64 = runner64.backward(values64, seed)
    for name in WRT:
        assert g32[name].shape == g64[name].shape
        err = np.linalg.norm(g32[name] - g64[name]) / np.linalg.norm(g64[name])
        assert err < 1e-4, f"{name}: float32 ORT gradient off by {err:.1e}"


def test_padding_gets_no_gradient_through_attention():
    """Masked key positions receive no cotangent via Softmax, so a padded token's embedding only
    matters through its own (unpooled) position, which the CLS head never reads."""
    rng = np.random.default_rng(3)
    model, feed = make_bert(), make_feed(rng)
    runner = GradientRunner(model, "logits", ["emb"])
    grads = runner.backward(reference_values(runner, feed), rng.standard_normal((BATCH, CLASSES)))
    assert np.abs(grads["emb"][0, -2:]).max() < 1e-12
    assert np.abs(grads["emb"][0, :-2]).max() > 1e-6


def mlp(extra_node=None, opset=17):
    """out = ReduceSum(Relu(X @ W + b)) with an optional extra node."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["pre"]),
             helper.make_node("Relu", ["pre"], ["act"]), helper.make_node("ReduceSum", ["act"], ["out"], keepdims=0)]
    if extra_node is not None:
        nodes.insert(3, extra_node)
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.DOUBLE, [])],
        initializer=[numpy_helper.from_array(rng.normal(size=(4, 3)), "W"),
                     numpy_helper.from_array(rng.normal(size=(3,)), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_initializer_gradient_matches_finite_differences_everywhere():
    rng = np.random.default_rng(5)
    model = mlp()
    feed = {"X": rng.normal(size=(6, 4))}
    runner = GradientRunner(model, "out", ["W", "X", "b"])
    grads = runner.backward(reference_values(runner, feed), np.array(1.0))
    fd_check(model, feed, "out", 1.0, "W", grads["W"], rng, entries=12)
    fd_check(model, feed, "out", 1.0, "b", grads["b"], rng, entries=3)
    # X is a graph input: compare against the closed form instead.
    act = np.maximum(feed["X"] @ numpy_helper.to_array(model.graph.initializer[0]) +
                     numpy_helper.to_array(model.graph.initializer[1]), 0)
    assert np.allclose(grads["X"], (act > 0) @ numpy_helper.to_array(model.graph.initializer[0]).T)


def test_only_needed_tensors_are_exposed():
    runner = GradientRunner(mlp(), "out", ["W"])
    # MatMul reads X (a feed) for dW; Add reads only shapes; Relu reads its output.
    assert set(runner.fetch_names) == {"out", "act", "mm__fwlr_shape"}


def test_onnxruntime_forward_and_backward_agree_with_reference_in_float64():
    rng = np.random.default_rng(6)
    runner = GradientRunner(mlp(), "out", ["W", "b"])
    feed = {"X": rng.normal(size=(5, 4))}
    values = runner.forward(feed)
    ref = reference_values(runner, feed)
    for name in runner.fetch_names:
        assert np.allclose(values[name], ref[name])
    g_ort, g_ref = runner.backward(values, np.array(2.0)), runner.backward(ref, np.array(2.0))
    assert np.allclose(g_ort["W"], g_ref["W"]) and np.allclose(g_ort["b"], g_ref["b"])


def test_missing_rule_raises_naming_the_op_and_tensor():
    model = mlp(helper.make_node("Softplus", ["act"], ["soft"]))
    model.graph.node[4].input[0] = "soft"  # ReduceSum now reads Softplus
    with pytest.raises(FwlrError, match=r"Softplus.*asvd|asvd.*Softplus") as info:
        GradientRunner(model, "out", ["W"])
    assert "'W'" in str(info.value)


def test_unsupported_op_off_the_path_is_fine():
    model = mlp(helper.make_node("Softplus", ["act"], ["unused"]))
    runner = GradientRunner(model, "out", ["W"])
    assert "unused" not in runner.fetch_names


def test_control_flow_on_path_raises():
    then = helper.make_graph([helper.make_node("Identity", ["act"], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.DOUBLE, None)])
    other = helper.make_graph([helper.make_node("Neg", ["act"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.DOUBLE, None)])
    model = mlp(helper.make_node("If", ["flag"], ["branch"], then_branch=then, else_branch=other))
    model.graph.node[4].input[0] = "branch"
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    with pytest.raises(FwlrError, match="If"):
        GradientRunner(model, "out", ["W"])


def test_contrib_op_on_path_names_its_domain():
    model = mlp(helper.make_node("FastGelu", ["act"], ["fg"], domain="com.microsoft"))
    model.graph.node[4].input[0] = "fg"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(FwlrError, match="com.microsoft:FastGelu"):
        GradientRunner(model, "out", ["W"])


def test_unreachable_wrt_gets_zeros_and_bad_requests_raise():
    model = mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 2)), "unused_w"))
    runner = GradientRunner(model, "out", ["unused_w", "W"])
    values = runner.forward({"X": np.ones((2, 4))})
    grads = runner.backward(values, np.array(1.0))
    assert grads["unused_w"].shape == (2, 2) and not grads["unused_w"].any()
    assert grads["W"].any()
    with pytest.raises(FwlrError, match="shape"):
        runner.backward(values, np.ones(3))
    with pytest.raises(FwlrError, match="not in the model"):
        GradientRunner(model, "out", ["nope"])


def test_integer_wrt_raises():
    with pytest.raises(FwlrError, match="not floating point"):
        GradientRunner(make_bert(), "logits", ["input_ids"])


def test_shared_tensor_cotangents_are_summed():
    """y = x*x + x read three times: d/dx = 2x + 1."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Add", ["sq", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3])])
    runner = GradientRunner(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "y", ["x"])
    x = np.array([0.5, -1.0, 2.0])
    grads = runner.backward(runner.forward({"x": x}), np.ones(3))
    assert np.allclose(grads["x"], 2 * x + 1)


def test_cast_to_integer_stops_the_gradient_even_without_type_information(monkeypatch):
    """y = x * Cast(Cast(x, int64), double): the integer detour contributes nothing, so dy/dx = round-trip(x)."""
    monkeypatch.setattr(backward, "_elem_types", lambda model: {})  # as if shape inference had failed
    nodes = [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
             helper.make_node("Cast", ["xi"], ["xf"], to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["x", "xf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3])])
    runner = GradientRunner(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "y", ["x"])
    x = np.array([1.5, -2.25, 3.0])
    grads = runner.backward({"x": x, "xf": np.trunc(x), "y": x * np.trunc(x)}, np.ones(3))
    assert np.allclose(grads["x"], np.trunc(x))


def test_layer_norm_statistics_outputs_on_path_raise():
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], axis=-1),
             helper.make_node("Add", ["y", "mean"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.DOUBLE, [2, 3])],
                              initializer=[numpy_helper.from_array(np.ones(3), "g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(FwlrError, match="LayerNormalization"):
        GradientRunner(model, "z", ["x"])
    GradientRunner(model, "y", ["x"])  # the normalised output alone is fine


def test_too_new_ir_version_is_clamped_for_onnxruntime():
    model = mlp()
    model.ir_version = 99
    runner = GradientRunner(model, "out", ["W"], extra_outputs=["b", "mm"])
    values = runner.forward({"X": np.ones((2, 4))})
    assert np.isfinite(values["out"]) and values["b"].shape == (3,) and values["mm"].shape == (2, 3)
    assert runner.exposed_model.ir_version == 99  # the user's model and the exposed copy keep their version
