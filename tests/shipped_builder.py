"""Synthetic already-quantized ("shipped") models, one per format ONNX Runtime and exporters write: the same
float MLP quantized as MatMulInteger (quantize_dynamic), QDQ (quantize_static), Cast+Mul (by hand, as some
exporters store int8 weights), 8-bit MatMulNBits, a DynamicQuantizeLSTM model, and a model whose one weight
is read by 12 MatMul nodes (ALBERT-style shared layers). Used by tests/test_shipped.py and
tools/bench_shipped.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from builders import make_model, vinfo
from onnx import TensorProto, helper, numpy_helper

WIDTHS = (256, 512, 256, 64)
FORMATS = ("dynamic", "qdq", "cast_mul", "nbits8")


def spectrum_weight(K: int, N: int, seed: int, decay: float = 0.03) -> np.ndarray:
    """[K, N] float32 with singular values exp(−decay·i): what trained layers look like to a low-rank fit."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((K, K)))
    V, _ = np.linalg.qr(rng.standard_normal((N, N)))
    m = min(K, N)
    return ((U[:, :m] * np.exp(-decay * np.arange(m))) @ V[:, :m].T * np.sqrt(K) / 4).astype(np.float32)


def _mlp_nodes(weights: list[str]) -> list[onnx.NodeProto]:
    nodes, x = [], "x"
    for i, w in enumerate(weights):
        last = i == len(weights) - 1
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, w], [out], name=f"fc{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    return nodes


def float_mlp() -> onnx.ModelProto:
    weights = [spectrum_weight(WIDTHS[i], WIDTHS[i + 1], seed=i) for i in range(len(WIDTHS) - 1)]
    inits = [numpy_helper.from_array(W, f"W{i}") for i, W in enumerate(weights)]
    return make_model(_mlp_nodes([f"W{i}" for i in range(len(weights))]), [vinfo("x", ["n", WIDTHS[0]])],
                      [vinfo("y", ["n", WIDTHS[-1]])], inits)


def data(rows: int, width: int = WIDTHS[0], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def cast_mul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each MatMul weight stored as int8 per output column, read through Mul(Cast(q), scale)."""
    nodes, inits = [], []
    for tensor in model.graph.initializer:
        W = numpy_helper.to_array(tensor)
        scale = (np.abs(W).max(axis=0) / 127).astype(np.float32)
        q = np.clip(np.round(W / scale), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(q, f"{tensor.name}_q"), numpy_helper.from_array(scale, f"{tensor.name}_s")]
        nodes += [helper.make_node("Cast", [f"{tensor.name}_q"], [f"{tensor.name}_c"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{tensor.name}_c", f"{tensor.name}_s"], [tensor.name],
                                   name=f"{tensor.name}_dequantize")]
    graph = model.graph
    return make_model(nodes + list(graph.node), list(graph.input), list(graph.output), inits)


def quantized(model: onnx.ModelProto, fmt: str, folder: Path, calibration: np.ndarray) -> onnx.ModelProto:
    """`model` in one shipped format, by ONNX Runtime's own quantizers where it has one."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    source, target = folder / f"float_{fmt}.onnx", folder / f"quantized_{fmt}.onnx"
    onnx.save(model, source)
    if fmt == "dynamic":
        quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8)
    elif fmt == "qdq":
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter([{"x": calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["MatMul"])
    elif fmt == "cast_mul":
        return cast_mul(model)
    elif fmt == "nbits8":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True)
        quantizer.process()
        return quantizer.model.model
    else:
        raise ValueError(fmt)
    return onnx.load(target)


def shared_layers(width: int = 768, layers: int = 12) -> onnx.ModelProto:
    """h ← h + tanh(h W), `layers` times with one W (ALBERT-style), then a head: one weight, `layers` MatMuls."""
    W = spectrum_weight(width, width, seed=7)
    W = (W * 0.5 / np.linalg.norm(W, 2)).astype(np.float32)
    head = (spectrum_weight(width, 64, seed=8) / np.sqrt(width)).astype(np.float32)
    nodes, h = [], "x"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [h, "W_shared"], [f"m{i}"], name=f"layer{i}"),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"tanh{i}"),
                  helper.make_node("Add", [h, f"t{i}"], [f"a{i}"], name=f"residual{i}")]
        h = f"a{i}"
    nodes.append(helper.make_node("MatMul", [h, "W_head"], ["y"], name="head"))
    inits = [numpy_helper.from_array(W, "W_shared"), numpy_helper.from_array(head, "W_head")]
    return make_model(nodes, [vinfo("x", ["n", width])], [vinfo("y", ["n", 64])], inits)


def lstm_tagger(seq: int = 12, inp: int = 64, hidden: int = 96, classes: int = 20) -> onnx.ModelProto:
    """x [seq, batch, 64] → LSTM → Squeeze → MatMul head → logits [seq, batch, 20] (batch on axis 1)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, inp)) / 8).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) / 10).astype(np.float32), "R"),
             numpy_helper.from_array(spectrum_weight(hidden, classes, seed=9), "head"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["ys"], name="lstm", hidden_size=hidden),
             helper.make_node("Squeeze", ["ys", "axis1"], ["states"], name="squeeze"),
             helper.make_node("MatMul", ["states", "head"], ["logits"], name="classifier")]
    return make_model(nodes, [vinfo("x", [seq, "batch", inp])], [vinfo("logits", [seq, "batch", classes])], inits)
