"""`onnx-fwlr inspect`: what can be factorised, what cannot, and why."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_fwlr.io.model import load_model
from onnx_fwlr.io.onnx_utils import walk_graphs
from onnx_fwlr.quant.dequantize import detect_quantized
from onnx_fwlr.sites.find import Site, Skipped, _constants, model_parameters, validate_regex
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.tables import format_table

LEFT_ALONE_MIN = 1024  # elements: smaller constants (biases, scales, shapes) are not weights worth listing
# ops a stored weight passes through on its way to the op that computes with it (int8 storage, layout)
_STORAGE_OPS = {"Cast", "Sub", "Mul", "DequantizeLinear", "Transpose", "Reshape", "Identity", "Unsqueeze", "Squeeze"}
_RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}
_CONV = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"}


@dataclass
class Listing:
    sites: list[Site]
    skipped: list[Skipped]
    model_params: int
    quantized: list = field(default_factory=list)  # QuantizedSite: quantized weight uses and other quantized ops
    left_alone: list = field(default_factory=list)  # Skipped: weights no command factorises, with the reason

    def to_dict(self) -> dict:
        return {
            "model_params": self.model_params,
            "sites": [
                {"name": s.name, "weight": s.weight, "op_type": s.uses[0].op_type, "K": s.K, "N": s.N,
                 "params": s.params, "dtype": s.dtype, "nodes": [u.node_name for u in s.uses]}
                for s in self.sites
            ],
            "skipped": [asdict(s) for s in self.skipped],
            "left_alone": [asdict(s) for s in self.left_alone],
            "quantized": [
                {"node": q.node, "op_type": q.op_type, "weight": q.weight, "K": q.K, "N": q.N,
                 "float_op": q.consumer, "scheme": asdict(q.scheme) if q.scheme else None,
                 "dequantized_by_compress": q.scheme is not None, "reason": q.reason}
                for q in self.quantized
            ],
        }

    def format(self) -> str:
        rows = [
            [
                s.name,
                s.uses[0].op_type,
                s.weight,
                f"{s.K}x{s.N}",
                f"{s.params:,}",
                f"{100 * s.params / max(self.model_params, 1):.1f}%",
                s.dtype + (f" ({len(s.uses)} uses)" if len(s.uses) > 1 else ""),
            ]
            for s in self.sites
        ]
        total = sum(s.params for s in self.sites)
        lines = [
            format_table(["site", "op", "weight", "K x N", "params", "of model", "dtype"], rows, align="lllrrrl"),
            self._headline(total),
        ]
        lines += self._format_quantized()
        if self.skipped:
            skipped_rows = [[s.node, s.op_type, s.weight or "", s.reason] for s in self.skipped]
            lines += ["", "not factorised:", format_table(["node", "op", "weight", "reason"], skipped_rows)]
        if self.left_alone:
            rows = [[s.node, s.op_type, s.weight or "", s.reason] for s in self.left_alone]
            lines += ["", "weights left as they are:", format_table(["node", "op", "weight", "reason"], rows)]
        return "\n".join(lines)

    def _headline(self, total: int) -> str:
        """How many sites compress works on: the float ones above, plus each quantized weight it dequantizes
        (a weight read by several nodes counted once)."""
        float_part = (f"{len(self.sites)} factorisable site(s) holding {total:,} of {self.model_params:,} "
                      f"parameters ({100 * total / max(self.model_params, 1):.1f}%)")
        weights = {(q.graph_index, q.weight) for q in self.quantized if q.scheme is not None}
        quantized = f"{len(weights)} quantized weight(s) that compress dequantizes first (listed below)"
        if not weights:
            return float_part
        if not self.sites:
            return f"{len(weights)} factorisable site(s): {quantized}"
        return f"{len(self.sites) + len(weights)} factorisable site(s): {float_part}, and {quantized}"

    def _format_quantized(self) -> list[str]:
        """Quantized weight uses (what each is and that compress dequantizes it) and quantized ops left alone."""
        from onnx_fwlr.quant.requantize import cannot_requantize

        usable = [q for q in self.quantized if q.scheme is not None and cannot_requantize(q.scheme) is None]
        left = [q if q.scheme is None else dataclasses.replace(q, reason=f"kept as the input has it: "
                                                                        f"{cannot_requantize(q.scheme)}")
                for q in self.quantized if q not in usable]
        lines = []
        if usable:
            rows = [[q.node, q.op_type, q.weight, f"{q.K}x{q.N}", q.scheme.describe(), q.consumer] for q in usable]
            lines += [
                "",
                f"the model is quantized: {len(usable)} quantized weight(s); compress dequantizes each "
                "(float64), compresses it and quantizes it again with the same scheme:",
                format_table(["node", "op", "weight", "K x N", "scheme", "float op"], rows, align="lllrll"),
            ]
        if left:
            lines += [
                "",
                "quantized nodes left as they are:",
                format_table(["node", "op", "reason"], [[q.node, q.op_type, q.reason] for q in left]),
            ]
        return lines


def inspect_model(model, include: str | None = None, exclude: str | None = None) -> Listing:
    validate_regex(include, "`include`")
    validate_regex(exclude, "`exclude`")
    model = load_model(model)
    sites, skipped = find_all_sites(model, include, exclude, fisher=False)
    quantized = detect_quantized(model)
    listed = {s.weight for s in sites} | {s.weight for s in skipped if s.weight}
    return Listing(sites, skipped, model_parameters(model), quantized, left_alone(model, listed, quantized))


def left_alone(model: onnx.ModelProto, listed: set[str], quantized: list) -> list[Skipped]:
    """Every constant weight (>= LEFT_ALONE_MIN elements) that is neither a site nor listed already, with why
    compress leaves it: recurrent weights, convolution kernels (float or stored as integers), tables, ..."""
    graphs = walk_graphs(model)
    constants = _constants(graphs)
    producers = {o: n for g in graphs for n in g.node for o in n.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for graph in graphs:
        for node in graph.node:
            for slot, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, slot))
    taken = set(listed) | {q.weight for q in quantized if q.scheme is not None and q.consumer != "LSTM"}
    taken |= {q.tensors.get("W", "") for q in quantized if q.scheme is not None and q.consumer == "LSTM"}
    found = []
    for name, (_, _, tensor) in constants.items():
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if name in taken or name in producers or count < LEFT_ALONE_MIN or len(tensor.dims) < 2:
            continue
        node, slot, stored = _final_reader(name, readers)
        if node is None:
            continue
        reason = f"{_left_alone_reason(node, slot, stored)} ({count:,} numbers)"
        found.append(Skipped(node.name or node.output[0], node.op_type, name, reason))
    return found


def _final_reader(name: str, readers: dict, depth: int = 0):
    """(node, slot, storage ops passed) of the op that computes with a constant, following int8 storage
    chains (Cast, Sub, Mul, DequantizeLinear) and layout ops; (None, ..) when several ops read it apart."""
    users = readers.get(name, [])
    if len(users) != 1 or depth > 4:
        return (users[0][0], users[0][1], []) if users and depth == 0 else (None, -1, [])
    node, slot = users[0]
    if node.op_type in _STORAGE_OPS and node.output:
        after, after_slot, ops = _final_reader(node.output[0], readers, depth + 1)
        if after is not None:
            return after, after_slot, [node.op_type] + ops
    return node, slot, []


def _left_alone_reason(node: onnx.NodeProto, slot: int, stored: list[str]) -> str:
    how = ""
    if "DequantizeLinear" in stored:
        how = "stored quantized (QDQ); "
    elif "Cast" in stored:
        how = "stored as integers (Cast" + ("+Sub" if "Sub" in stored else "") + "+Mul); "
    if node.op_type in _RECURRENT and slot == 2:
        return (f"{how}recurrent weight R of {node.op_type}: it multiplies the hidden state inside the op at "
                "every step, so it is kept as it is (input weights W are factorised)")
    if node.op_type in _CONV:
        return f"{how}a convolution kernel: compress factorises MatMul/Gemm and LSTM/GRU input weights only"
    if node.op_type in ("Gather", "GatherBlockQuantized"):
        return f"{how}an embedding table: kept by compress (`--quantize` may quantize it)"
    return f"{how}read by {node.op_type} (input {slot}), not as a MatMul/Gemm weight, so it is kept as it is"
