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
