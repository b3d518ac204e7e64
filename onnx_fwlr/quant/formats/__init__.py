"""The quantized-weight formats compress reads, one file each, registered here: a new format is one file with a
`FORMAT` (formats/common.Format: its matchers, exact float values, float form and how ONNX Runtime writes it
again) listed in FORMATS, plus its round trip in tests/test_dequantize.py (tests/test_layout.py checks that)."""

from __future__ import annotations

import onnx

from onnx_fwlr.quant.formats import cast_mul, dynamic, dynamic_lstm, nbits, qdq
from onnx_fwlr.quant.formats.common import Format, _unsupported
from onnx_fwlr.quant.quantized_site import OTHER_QUANTIZED_OPS, QuantizedSite, _Graph

FORMATS: dict[str, Format] = {f.name: f for f in (dynamic.FORMAT, dynamic_lstm.FORMAT, qdq.FORMAT, cast_mul.FORMAT,
                                                  nbits.FORMAT)}
MATCHERS = {op: match for f in FORMATS.values() for op, match in f.matchers.items()}  # (domain, op) -> matcher


def match_node(model: onnx.ModelProto, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite | None:
    """The quantized weight use `node` is the main node of, if any."""
    matcher = MATCHERS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
    if matcher is not None:
        return matcher(model, view, n_index, node)
    if node.op_type in OTHER_QUANTIZED_OPS:
        return _unsupported(view, node, node.op_type, "", f"{node.op_type} is a quantized op that compress does not "
                            "dequantize, so it is left as it is")
    return None
