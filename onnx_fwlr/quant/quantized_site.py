"""What a quantized weight use is: its scheme, the record of where it is, and the graph lookups the pattern
matchers (quant/formats/) read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from onnx_fwlr.sites.find import constant_tensors, walk_graphs

MS_DOMAIN = "com.microsoft"
INTEGER_TYPES = {  # element type -> (bits, signed)
    onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False),
    onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False),
    onnx.TensorProto.INT16: (16, True), onnx.TensorProto.UINT16: (16, False),
}
# Quantized weight ops whose float form we build: one in a scheme we cannot read is an error, not left alone.
QUANTIZED_WEIGHT_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM",
                        "MatMulNBits"}
# Quantized ops compress leaves as they are (listed by inspect so that a user knows they were seen).
OTHER_QUANTIZED_OPS = {"QLinearMatMul", "QLinearConv", "ConvInteger", "QGemm", "QAttention", "QOrderedMatMul",
                       "GatherBlockQuantized", "MatMulBnb4", "MatMulFpQ4", "QLinearAdd", "QEmbedLayerNormalization"}


@dataclass(frozen=True)
class QuantScheme:
    """How the input model stores one weight, enough to quantize it again the same way.

    axis is in the [K, N] view of the weight (X @ W): 1 = a scale per output column (per-channel),
    0 = scales vary along K (blocks of block_size inputs).
    """

    format: str  # "dynamic", "dynamic_lstm", "qdq", "cast_mul" or "nbits" (which requantizer reproduces it)
    bits: int
    signed: bool
    granularity: str  # "per-tensor", "per-channel" or "block"
    symmetric: bool
    axis: int | None = None
    block_size: int | None = None
    reduce_range: bool = False

    def describe(self) -> str:
        kind = f"{'int' if self.signed else 'uint'}{self.bits}"
        grain = f"block {self.block_size}" if self.granularity == "block" else self.granularity
        zero = "symmetric" if self.symmetric else "zero point"
        return f"{kind} {grain}, {zero}" + (", reduced range" if self.reduce_range else "")

    def matrix_bytes(self, K: int, N: int) -> int:
        """About the bytes a [K, N] matrix (X @ W view) takes in this scheme: the integers packed, and a float
        scale and a zero point per tensor, per channel or per block (what a factor stored this way costs)."""
        if self.granularity == "block":
            blocks = math.ceil(K / self.block_size)
            return N * blocks * (math.ceil(self.block_size * self.bits / 8) + 5)
        groups = 1 if self.granularity == "per-tensor" else (N if self.axis in (1, None) else K)
        return math.ceil(K * N * self.bits / 8) + 5 * groups


@dataclass
class QuantizedSite:
    """One quantized weight use as found, and (after dequantize_model) the float node(s) it became."""

    node: str  # the quantized node's name, or its first output when unnamed
    op_type: str  # as found: MatMulInteger, DynamicQuantizeMatMul, ..., DequantizeLinear, Cast+Mul, MatMulNBits
    graph_index: int
    weight: str  # the integer tensor
    consumer: str  # the float op computing with it: MatMul, Gemm or LSTM
    K: int
    N: int
    scheme: QuantScheme | None  # None: not a scheme we can dequantize (reason says why)
    reason: str = ""
    nodes: tuple[int, ...] = ()  # indices, in its graph of the quantized input, of the nodes the float form
    # replaces (main node first)
    tensors: dict[str, str] = field(default_factory=dict)  # role -> tensor name
    float_nodes: tuple[str, ...] = ()  # set by dequantize_model: the float nodes holding the weight now
    float_weight: str = ""  # set by dequantize_model: the float initializer

    @property
    def supported(self) -> bool:
        return self.scheme is not None

    def describe(self) -> str:
        if self.scheme is None:
            return self.reason
        return f"{self.op_type} {self.scheme.describe()}"


# --- detection -------------------------------------------------------------------------------------------------


def same_domain(node: onnx.NodeProto, domain: str) -> bool:
    return node.domain == domain or (domain == "" and node.domain == "ai.onnx")


@dataclass
class _Graph:
    """One graph's lookups: who produces and who reads each tensor, and the constants visible in it."""

    index: int
    graph: onnx.GraphProto
    constants: dict
    producer: dict[str, int]
    readers: dict[str, list[tuple[int, int, int]]]  # tensor -> (graph, node, input slot), all graphs; node -1 =
    # a graph output
    all_graphs: list[onnx.GraphProto]

    def const(self, name: str) -> onnx.TensorProto | None:
        entry = self.constants.get(name) if name else None
        return entry[2] if entry else None

    def node_of(self, tensor: str, op_type: str, domain: str = "") -> onnx.NodeProto | None:
        index = self.producer.get(tensor)
        node = None if index is None else self.graph.node[index]
        return node if node is not None and node.op_type == op_type and same_domain(node, domain) else None

    def sole_reader(self, tensor: str) -> onnx.NodeProto | None:
        """The one node of this graph reading the tensor, if exactly one node anywhere reads it."""
        found = self.readers.get(tensor, [])
        if len(found) == 1 and found[0][0] == self.index and found[0][1] >= 0:
            return self.graph.node[found[0][1]]
        return None


def graph_views(model: onnx.ModelProto) -> list[_Graph]:
    """One _Graph per graph, in walk_graphs order."""
    graphs = walk_graphs(model)
    constants = constant_tensors(graphs)
    readers: dict[str, list[tuple[int, int, int]]] = {}
    producers = []
    for index, graph in enumerate(graphs):
        producer = {}
        for n_index, node in enumerate(graph.node):
            for out in node.output:
                producer[out] = n_index
            for slot, name in enumerate(node.input):
                if name:
                    readers.setdefault(name, []).append((index, n_index, slot))
        for out in graph.output:
            readers.setdefault(out.name, []).append((index, -1, -1))
        producers.append(producer)
    return [_Graph(i, g, constants, producers[i], readers, graphs) for i, g in enumerate(graphs)]
