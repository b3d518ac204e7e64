"""Small ONNX models for tests, built in a few lines."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def low_rank(K: int, N: int, r: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """A [K, N] matrix of exact rank r."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((K, r)) @ rng.standard_normal((r, N)) / np.sqrt(r)).astype(dtype)


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir_version=9) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def vinfo(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def matmul_model(W: np.ndarray, x_shape=("batch", None)) -> onnx.ModelProto:
    """Y = X @ W, with X of rank len(x_shape) (last dim = K)."""
    K, N = W.shape
    elem = helper.np_dtype_to_tensor_dtype(W.dtype)
    x_shape = list(x_shape[:-1]) + [K]
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [vinfo("x", x_shape, elem)],
        [vinfo("y", x_shape[:-1] + [N], elem)],
        [numpy_helper.from_array(W, "W")],
    )


def gemm_model(W_kn: np.ndarray, trans_a: int, trans_b: int, alpha: float, beta: float, bias: bool, M: int = 5):
    """Y = alpha op(X) op(W) + beta C, W stored as op requires."""
    K, N = W_kn.shape
    stored = W_kn.T.copy() if trans_b else W_kn
    inits = [numpy_helper.from_array(stored, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, N).astype(np.float32), "C"))
        inputs.append("C")
    x_shape = [K, M] if trans_a else [M, K]
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], [vinfo("x", x_shape)], [vinfo("y", [M, N])], inits)


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def write_lstm(work, seq=6, inp=16, hidden=12, classes=10):
    """x [batch, seq, 16] -> Transpose -> LSTM (input weight of rank 6) -> Transpose -> MatMul head -> logits.

    ORT runs only layout 0 (sequence first); the transposes keep samples on the leading axis of the data.
    """
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(4 * hidden, 6)) @ rng.normal(size=(6, inp)) / 3)[None]
    inits = [numpy_helper.from_array(w.astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.4, (1, 4 * hidden, hidden)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(0, 0.3, (1, 8 * hidden)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.normal(0, 0.3, (hidden, classes)).astype(np.float32), "head")]
    nodes = [helper.make_node("Transpose", ["x"], ["x_t"], name="to_seq_first", perm=[1, 0, 2]),
             helper.make_node("LSTM", ["x_t", "W", "R", "B"], ["y"], name="lstm", hidden_size=hidden),
             helper.make_node("Transpose", ["y"], ["y_t"], name="to_batch_first", perm=[2, 0, 1, 3]),
             helper.make_node("MatMul", ["y_t", "head"], ["logits"], name="head/MatMul")]
    graph = helper.make_graph(
        nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, inp])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, 1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(work / "lstm.onnx"))
    for name, n, seed in (("lstm_calib", 64, 1), ("lstm_val", 32, 2)):
        np.savez(work / f"{name}.npz", x=np.random.default_rng(seed).normal(size=(n, seq, inp)).astype(np.float32))
