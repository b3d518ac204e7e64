"""Thin wrappers over ONNX Runtime's own quantizers, and deq(Q(W)) exactly as ONNX Runtime computes it.

We never quantize a weight ourselves: MatMulNBits (weight-only, block-wise, 4 or 8 bits) and
GatherBlockQuantized (4-bit embedding tables) come from `onnxruntime.quantization.matmul_nbits_quantizer`,
called one node at a time on a scratch graph; dynamic int8 per-channel (MatMulInteger) and int8 tables come
from `quantize_dynamic`. The dequantized weight is read back from the quantized initializers with each op's
documented formula (tests check it against ONNX Runtime's outputs), so the residual W − deq(Q(W)) that the
low-rank correction fits is the error the runtime really makes.

Traps (docs/quantization.md): the nbits quantizer imports `onnx_ir` (declared in our dependencies), and configures the
root logger at import (guarded here); 4-bit tables need opset 21 and IR 10, reached with ONNX's version
converter (`upgrade_for_int4`) rather than by bumping the opset number.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import message_bytes

logger = logging.getLogger(__name__)

INT4_OPSET = 21  # int4/uint4 tensors (GatherBlockQuantized's table) need opset 21 and IR 10
INT4_IR = 10
MS_DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (float), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations


@dataclass(frozen=True)
class Scheme:
    """How one weight is stored. kind 'nbits': MatMulNBits / GatherBlockQuantized (bits, block_size along K,
    or along the table's row for a Gather); kind 'dynamic': quantize_dynamic int8 (per output channel for a
    MatMul, per tensor for a Gather, as ONNX Runtime does)."""

    kind: str
    bits: int = 8
    block_size: int = 0
    symmetric: bool = False
    accuracy_level: int = 0  # MatMulNBits' compute type: 0 float (as the weight), 4 int8 activations (docs/speed.md)
    outliers: int = 0  # dynamic int8: this many input channels (the largest on calibration data) computed in float

    @property
    def label(self) -> str:
        if self.kind == "dynamic":
            return "int8 dynamic" + (f" o{self.outliers}" if self.outliers else "")
        return (f"int{self.bits} b{self.block_size}" + (" sym" if self.symmetric else "")
                + (f" acc{self.accuracy_level}" if self.accuracy_level else ""))

    def at_level(self, level: int) -> Scheme:
        """The same stored weight computed at MatMulNBits accuracy_level `level` (bytes and deq(Q(W)) unchanged)."""
        return Scheme(self.kind, self.bits, self.block_size, self.symmetric, level, self.outliers)

    def with_outliers(self, count: int) -> Scheme:
        """Dynamic int8 whose `count` largest input channels skip the activation rounding: the int8 MatMul reads
        the input with them zeroed (its per-tensor step then follows the other channels), and their rows of W
        multiply them in float (quant.graph, docs/quantization.md)."""
        return Scheme(self.kind, self.bits, self.block_size, self.symmetric, self.accuracy_level, count)

    def matmul_bytes(self, K: int, N: int) -> int:
        """Bytes of the quantized [K, N] weight as stored (data, scales, zero points)."""
        if self.kind == "dynamic":  # int8 data, float scale and int8 zero point per output channel
            # outliers: their rows in float16, their indices, and the float mask of K
            return K * N + 5 * N + (self.outliers * (2 * N + 8) + 4 * K if self.outliers else 0)
        blocks = math.ceil(K / self.block_size)
        data = N * blocks * math.ceil(self.block_size * self.bits / 8)
        zero_points = 0 if self.symmetric else N * math.ceil(blocks * self.bits / 8)
        return data + 4 * N * blocks + zero_points

    def table_bytes(self, V: int, D: int) -> int:
        """Bytes of a quantized [V, D] embedding table."""
        if self.kind == "dynamic":
            return V * D + 5
        blocks = V * math.ceil(D / self.block_size)
        zero_points = 0 if self.symmetric else math.ceil(blocks * self.bits / 8)
        return math.ceil(V * D * self.bits / 8) + 4 * blocks + zero_points


INT8_DYNAMIC = Scheme("dynamic")


def nbits(bits: int, block_size: int, symmetric: bool = False, accuracy_level: int = 0) -> Scheme:
    check_block_size(block_size)
    if bits not in (4, 8):
        raise FwlrError(f"{bits}-bit weights are not offered; choose 4 or 8 bits.")
    if accuracy_level not in ACCURACY_LEVELS:
        raise FwlrError(f"`accuracy_level` {accuracy_level} is not one of MatMulNBits' levels "
                        f"{', '.join(map(str, ACCURACY_LEVELS))}.")
    return Scheme("nbits", bits, block_size, symmetric, accuracy_level)


def scheme_from_label(label: str) -> Scheme:
    """The Scheme whose `label` this is ("int8 dynamic", "int4 b32", "int8 b128 sym", "int4 b32 acc4"): latency
    tables name forms by it."""
    if label == INT8_DYNAMIC.label:
        return INT8_DYNAMIC
    if label.startswith(INT8_DYNAMIC.label + " o") and label[len(INT8_DYNAMIC.label) + 2:].isdigit():
        return INT8_DYNAMIC.with_outliers(int(label[len(INT8_DYNAMIC.label) + 2:]))
    parts = label.split()
    level = 0
    if parts and parts[-1].startswith("acc") and parts[-1][3:].isdigit():
        level, parts = int(parts[-1][3:]), parts[:-1]
    if len(parts) not in (2, 3) or not parts[0].startswith("int") or not parts[1].startswith("b") \
            or parts[2:] not in ([], ["sym"]):
        raise ValueError(f"not a scheme label: {label!r}")
    return nbits(int(parts[0][3:]), int(parts[1][1:]), symmetric=parts[2:] == ["sym"], accuracy_level=level)


def check_block_size(block_size: int) -> None:
    """MatMulNBits and GatherBlockQuantized take powers of two from 16 on."""
    if block_size < 16 or block_size & (block_size - 1):
        raise FwlrError(f"`block_size` {block_size} is not supported; ONNX Runtime's block quantizers take a "
                        "power of two of at least 16 (16, 32, 64, 128, 256).")


@dataclass
class QuantizedWeight:
    """The node ONNX Runtime's quantizer made for one weight (its inputs after the activation are the
    tensors, in order), and the tensors themselves."""

    node: onnx.NodeProto
    tensors: list[onnx.TensorProto]

    def arrays(self) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in self.tensors}


@contextlib.contextmanager
def _quiet_ort_logging():
    """ORT's quantizers log every node at INFO, and `quantize_dynamic` warns about pre-processing through the
    root logger: keep that noise out of the user's terminal."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _nbits_module():
    """onnxruntime.quantization.matmul_nbits_quantizer, imported without its logging.basicConfig(INFO) side
    effect on an unconfigured root logger (it would print every library INFO message)."""
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        try:
            from onnxruntime.quantization import matmul_nbits_quantizer
        except ModuleNotFoundError as exc:
            raise FwlrError(f"ONNX Runtime's block quantizer needs the '{exc.name}' package; install it with "
                            f"`pip install {exc.name.replace('_', '-')}`.") from None
    finally:
        if guard is not None:
            root.removeHandler(guard)
    return matmul_nbits_quantizer


def _nbits_quantizer(scheme: Scheme, op_type: str):
    module = _nbits_module()
    config = module.DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=scheme.symmetric, bits=scheme.bits,
        op_types_to_quantize=(op_type,), accuracy_level=scheme.accuracy_level or None)
    return module.DefaultWeightOnlyQuantizer(config)


QUANTIZE_COLUMNS = 8192  # columns handed to ONNX Runtime's quantizer at once (its copies of W scale with them)


def quantize_matmul_weight(W: np.ndarray, scheme: Scheme, name: str, dtype=np.float32,
                           columns: int = QUANTIZE_COLUMNS) -> QuantizedWeight:
    """MatMulNBits for X @ W (W [K, N] stored as `dtype`: float32, or float16 for a half-precision model, whose
    scales then come out in float16 as the op's activations need), made by ONNX Runtime's quantizer; tensors
    named from `name`. A wide W goes to the quantizer `columns` at a time: each output column is quantized on
    its own (blocks run along K), so the pieces' tensors, joined along N, are the whole call's (tested), while
    the quantizer's own copies of W (its graph's initializer, the array it reads back, the transposed one) stay
    a piece's size: a vocabulary-wide head took +620 MiB in one call."""
    if scheme.kind != "nbits":
        raise ValueError(f"{scheme.label} is applied by quantize_dynamic, not node by node")
    if W.shape[1] > columns:
        pieces = [_quantize_columns(W[:, j:j + columns], scheme, name, dtype) for j in range(0, W.shape[1], columns)]
        return _joined(pieces, W.shape[1])
    return _quantize_columns(W, scheme, name, dtype)


def _joined(pieces: list[QuantizedWeight], N: int) -> QuantizedWeight:
    """One MatMulNBits from column pieces: each tensor's leading axis (N, or N × blocks when flattened) joined."""
    node = onnx.NodeProto()
    node.CopyFrom(pieces[0].node)
    for attribute in node.attribute:
        if attribute.name == "N":
            attribute.i = N
    tensors = []
    for parts in zip(*(piece.tensors for piece in pieces)):
        joined = np.concatenate([numpy_helper.to_array(t) for t in parts], axis=0)
        tensors.append(numpy_helper.from_array(joined, parts[0].name))
    return QuantizedWeight(node, tensors)


def _quantize_columns(W: np.ndarray, scheme: Scheme, name: str, dtype) -> QuantizedWeight:
    W = np.ascontiguousarray(W, dtype=dtype)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", name], ["Y"], name=f"{name}/matmul")], "scratch",
                              [], [], [numpy_helper.from_array(W, name)])
    with _quiet_ort_logging():
        nodes = _nbits_quantizer(scheme, "MatMul").quantize(graph.node[0], [graph])
    if len(nodes) != 1 or nodes[0].op_type != "MatMulNBits":
        raise RuntimeError(f"ONNX Runtime's quantizer returned {[n.op_type for n in nodes]} for a 2-D MatMul weight")
    return QuantizedWeight(nodes[0], _made_tensors(graph, nodes[0], skip=name))


def quantize_table(T: np.ndarray, scheme: Scheme, name: str) -> QuantizedWeight:
    """GatherBlockQuantized for Gather(T, ids) (T [V, D], blocks along D), made by ONNX Runtime's quantizer."""
    if scheme.kind != "nbits" or scheme.bits != 4:
        raise ValueError("ONNX Runtime block-quantizes embedding tables at 4 bits only")
    T = np.ascontiguousarray(T, dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Gather", [name, "ids"], ["Y"], name=f"{name}/gather")], "scratch",
                              [], [], [numpy_helper.from_array(T, name)])
    with _quiet_ort_logging():
        nodes = _nbits_quantizer(scheme, "Gather").quantize(graph.node[0], [graph])
    if len(nodes) != 1 or nodes[0].op_type != "GatherBlockQuantized":
        raise RuntimeError(f"ONNX Runtime's quantizer returned {[n.op_type for n in nodes]} for an embedding table")
    return QuantizedWeight(nodes[0], _made_tensors(graph, nodes[0], skip=name))


def _made_tensors(graph: onnx.GraphProto, node: onnx.NodeProto, skip: str) -> list[onnx.TensorProto]:
    """The tensors the quantizer added for `node`, copied out of the scratch graph: a message taken from a graph
    keeps the whole graph's protobuf arena alive, here the weight's float copy (a vocabulary-wide head: 113 MB
    held as long as the quantized weight), where the copies hold only their own bytes."""
    by_name = {t.name: t for t in graph.initializer if t.name != skip}
    made = []
    for name in node.input:
        if name in by_name:
            made.append(onnx.TensorProto())
            made[-1].CopyFrom(by_name[name])
    return made


def _unpack(packed: np.ndarray, bits: int, count: int, dtype=np.int32) -> np.ndarray:
    """uint8 [..., bytes] holding `bits`-bit values, low nibble first -> `dtype` [..., count]."""
    if bits == 8:
        return packed[..., :count].astype(dtype)
    values = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=dtype)  # written once, no uint8 copy
    values[..., 0::2] = packed & 0x0F
    values[..., 1::2] = packed >> 4
    return np.ascontiguousarray(values[..., :count])


def dequantize_matmul_weight(q: QuantizedWeight, float64: bool = True) -> np.ndarray:
    """W [K, N] float64 from MatMulNBits' tensors: (q − zero point) · scale per block of K, in float32 as the
    kernel computes it (zero point 2^(bits−1) when absent). `float64` False: the same numbers as float32 (they
    are float32 values), half the memory: a vocabulary-wide head's is 113 MB instead of 226. Made in place from
    the unpacked bytes, so one float32 copy of the weight at a time: q and the zero point are integers below
    256, exact in float32, so q − zero point is the same number as the integer difference converted."""
    attrs = {a.name: helper.get_attribute_value(a) for a in q.node.attribute}
    K, N, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    arrays = [numpy_helper.to_array(t) for t in q.tensors]
    packed, scales = arrays[0], arrays[1].reshape(N, -1).astype(np.float32)
    zero_points = arrays[2] if len(arrays) > 2 else None
    del arrays
    blocks = scales.shape[1]
    W = _unpack(packed.reshape(N, blocks, -1), bits, block, np.float32)  # [N, blocks, block]
    del packed
    if zero_points is not None:
        zero = _unpack(zero_points.reshape(N, -1), bits, blocks, np.float32)
    else:
        zero = np.full((N, blocks), 1 << (bits - 1), dtype=np.float32)
    W -= zero[:, :, None]
    W *= scales[:, :, None]
    W = W.reshape(N, -1)[:, :K].T
    return W.astype(np.float64) if float64 else W


def dequantize_table(q: QuantizedWeight) -> np.ndarray:
    """T [V, D] float64 from GatherBlockQuantized's tensors (quantize_axis 1: blocks along D)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in q.node.attribute}
    if attrs.get("quantize_axis", 1) != 1 or attrs.get("gather_axis", 0) != 0:
        raise RuntimeError("only tables quantized along their rows (quantize_axis 1, gather_axis 0) are read back")
    block = attrs["block_size"]
    arrays = [numpy_helper.to_array(t) for t in q.tensors]
    data = arrays[0].astype(np.int32)
    D = data.shape[1]
    scales = np.repeat(arrays[1].astype(np.float32), block, axis=1)[:, :D]
    zero = np.repeat(arrays[2].astype(np.int32), block, axis=1)[:, :D] if len(arrays) > 2 else 0
    return ((data - zero).astype(np.float32) * scales).astype(np.float64)


def _scratch_model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "scratch", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def dynamic_int8_weight(W: np.ndarray, float64: bool = True) -> np.ndarray:
    """deq(Q(W)) [K, N] float64 for quantize_dynamic int8 per channel: ORT quantizes a one-MatMul model and
    the weight is read back from its initializers, (q − zero point) · scale per output column. `float64` False:
    the same (float32) numbers as float32."""
    K, N = W.shape
    model = _scratch_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="matmul")],
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(np.asarray(W, dtype=np.float32), "W")])
    arrays = {t.name: numpy_helper.to_array(t) for t in quantize_dynamic_nodes(model, ["matmul"]).graph.initializer}
    q, scale, zero = arrays["W_quantized"], arrays["W_scale"], arrays["W_zero_point"]
    W = (q.astype(np.int32) - zero.astype(np.int32)).astype(np.float32) * scale.astype(np.float32)
    return W.astype(np.float64) if float64 else W


def dynamic_int8_table(T: np.ndarray) -> np.ndarray:
    """deq(Q(T)) [V, D] float64 for quantize_dynamic's int8 Gather (one scale and zero point per table)."""
    D = T.shape[1]
    model = _scratch_model(
        [helper.make_node("Gather", ["T", "ids"], ["Y"], name="gather")],
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["M"])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["M", D])],
        [numpy_helper.from_array(np.asarray(T, dtype=np.float32), "T")])
    quantized = quantize_dynamic_nodes(model, ["gather"])
    arrays = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    q, scale, zero = arrays["T_quantized"], arrays["T_scale"], arrays["T_zero_point"]
    return ((q.astype(np.int32) - zero.astype(np.int32)).astype(np.float32) * scale.astype(np.float32)).astype(
        np.float64)


def quantize_dynamic_nodes(model: onnx.ModelProto, node_names: list[str],
                           reduce_range: bool | None = None) -> onnx.ModelProto:
    """`quantize_dynamic` int8 per channel of exactly these MatMul/Gemm/Gather nodes (weights QInt8, as the
    ONNX Runtime documentation recommends for CPUs); every other node is left as it is. reduce_range None: 7-bit
    weights where this CPU's u8s8 kernels saturate on 8-bit ones (quant.int8_kernels), so that the weights read
    back from the written initializers are what the runtime computes with."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnx_fwlr.quant.int8_kernels import int8_saturates

    if reduce_range is None:
        reduce_range = int8_saturates()

    large = message_bytes(model) > 1_800_000_000
    with tempfile.TemporaryDirectory() as folder, _quiet_ort_logging():
        output = Path(folder) / "quantized.onnx"
        quantize_dynamic(model, output, op_types_to_quantize=["MatMul", "Gemm", "Gather"], per_channel=True,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_quantize=list(node_names),
                         use_external_data_format=large,
                         # shape inference cannot type the outputs of com.microsoft ops (MatMulNBits) it reads
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(str(output))


def upgrade_for_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset ≥ 21 and IR ≥ 10, as 4-bit tables need, converted by ONNX's version converter (the
    quantizer's own opset bump leaves ops such as ReduceL2 with attributes the new opset does not accept)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= INT4_OPSET:
        upgraded = onnx.ModelProto()
        upgraded.CopyFrom(model)
    else:
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, INT4_OPSET)
        except Exception as exc:  # noqa: BLE001 - the converter raises many types; the user needs one sentence
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FwlrError(f"4-bit embedding tables need opset {INT4_OPSET} and ONNX's version converter failed on "
                            f"this model ({first}); quantize embeddings to int8 or keep them (`embeddings`).") from None
    upgraded.ir_version = max(upgraded.ir_version, INT4_IR)
    return upgraded


def ensure_ms_domain(model: onnx.ModelProto) -> None:
    """Declare the com.microsoft domain that MatMulNBits and GatherBlockQuantized live in."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# ONNX Runtime's quantizers run on the whole original model, as a new user runs them: the baselines that the
# sweep's frontier and compress's closing sentence measure ours against (config name -> what it is).
BASELINES = {
    "ORT int8 dynamic per-channel": "quantize_dynamic, per_channel=True, QInt8 weights, its default op types",
    "ORT int4 b32 (MatMul only)": "MatMulNBitsQuantizer, block 32, asymmetric; Gemm and embedding tables stay fp32",
    "ORT int4 b128 (MatMul only)": "MatMulNBitsQuantizer, block 128, asymmetric; Gemm and embedding tables stay fp32",
}
# The same int4 models computing with int8 activations (accuracy_level 4): the same bytes and nearly the same
# outputs, a different speed (sweep --latency adds them; docs/speed.md).
LEVEL4_BASELINES = {
    "ORT int4 b32 (MatMul only), accuracy_level 4": "as ORT int4 b32, with MatMulNBits accuracy_level 4",
    "ORT int4 b128 (MatMul only), accuracy_level 4": "as ORT int4 b128, with MatMulNBits accuracy_level 4",
}


def ort_int8_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`quantize_dynamic` int8 per channel of every op it quantizes by default (embeddings included), with
    7-bit weights (reduce_range) where this CPU's u8s8 kernels saturate, as ONNX Runtime advises there."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnx_fwlr.quant.int8_kernels import int8_saturates

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory() as folder, _quiet_ort_logging():
        output = Path(folder) / "int8.onnx"
        quantize_dynamic(copy, output, per_channel=True, weight_type=QuantType.QInt8, reduce_range=int8_saturates(),
                         use_external_data_format=message_bytes(model) > 1_800_000_000)
        return onnx.load(str(output))


def ort_int4_model(model: onnx.ModelProto, block_size: int, accuracy_level: int = 0) -> onnx.ModelProto:
    """`MatMulNBitsQuantizer` int4 (asymmetric) of the MatMul nodes, its defaults otherwise (`accuracy_level` 4:
    its int8-activation compute, as ONNX Runtime's own LLM builder writes for CPUs)."""
    check_block_size(block_size)
    module = _nbits_module()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with _quiet_ort_logging():
        quantizer = module.MatMulNBitsQuantizer(copy, block_size=block_size, is_symmetric=False,
                                                accuracy_level=accuracy_level or None)
        quantizer.process()
    return quantizer.model.model


def ort_baseline(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The baseline `name` (a key of BASELINES or LEVEL4_BASELINES) of the float model."""
    if name not in BASELINES and name not in LEVEL4_BASELINES:
        raise ValueError(f"unknown baseline {name!r}")
    if "int8" in name:
        return ort_int8_model(model)
    return ort_int4_model(model, 32 if "b32" in name else 128, 4 if name in LEVEL4_BASELINES else 0)
