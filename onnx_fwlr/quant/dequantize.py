"""Already-quantized models as inputs: find each quantized weight use, read its exact float value, and turn it
back into a plain float MatMul/Gemm/LSTM so the whole float pipeline applies (requantize.py goes back).

Recognised weight uses (the integer weight, its scales and zero points all constants), one file each in
quant/formats/ (registered in formats/__init__.py FORMATS), as found → float form:
- dynamic: DynamicQuantizeLinear → MatMulInteger → Cast → Mul(x_scale·w_scale) (`quantize_dynamic`), and
  DynamicQuantizeMatMul / MatMulIntegerToFloat (com.microsoft: what ORT fuses that chain into) → MatMul (+ Add);
- dynamic_lstm: DynamicQuantizeLSTM (com.microsoft, `quantize_dynamic` of an LSTM) → LSTM;
- qdq: DequantizeLinear of constants feeding MatMul/Gemm weights → a float initializer in its place;
- cast_mul: Mul(Cast(int), scale), or Cast → Sub(zero point) → Mul, feeding weights → a float initializer;
- nbits: MatMulNBits (com.microsoft, `MatMulNBitsQuantizer`) → MatMul (+ Add).

Every value is `(q − zero_point) · scale` per the op's documentation, computed in float64 (exactly the float32
product ONNX Runtime forms, rounded once). Dynamic schemes also quantize the activation at run time; their float
form drops that step, so outputs differ from the quantized model's by the activation's quantization step.
Activation QuantizeLinear/DequantizeLinear pairs of QDQ models are activations, not weights: they stay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.quant.formats import FORMATS, match_node
from onnx_fwlr.quant.formats.nbits import unpack_bits
from onnx_fwlr.quant.quantized_site import QUANTIZED_WEIGHT_OPS, QuantizedSite, QuantScheme, graph_views
from onnx_fwlr.quant.requantize import cannot_requantize
from onnx_fwlr.sites.find import constant_tensors, walk_graphs

__all__ = [
    "Dequantized",
    "QuantScheme",
    "QuantizedSite",
    "dequantize_model",
    "dequantized_weights",
    "detect_quantized",
    "unpack_bits",
    "weight_matrix",
]


def detect_quantized(model: onnx.ModelProto) -> list[QuantizedSite]:
    """Every quantized weight use (main graph, then subgraphs), supported or not, plus other quantized ops."""
    found = []
    for view in graph_views(model):
        for n_index, node in enumerate(view.graph.node):
            site = match_node(model, view, n_index, node)
            if site is not None:
                found.append(site)
    return found


# --- the exact float view ----------------------------------------------------------------------------------------


def dequantized_weights(model: onnx.ModelProto, site: QuantizedSite) -> dict[str, np.ndarray]:
    """float64 weights in the layout the float node takes: {"B": ...} for MatMul/Gemm (for QDQ and Cast+Mul the
    stored layout the consumer reads), {"W": [dirs, 4H, input], "R": [dirs, 4H, hidden]} for an LSTM."""
    if site.scheme is None:
        raise FwlrError(f"{site.node}: {site.reason}")
    constants = constant_tensors(walk_graphs(model))
    t = site.tensors

    def arr(role: str) -> np.ndarray | None:
        name = t.get(role, "")
        return tensor_array(model, constants[name][2]) if name else None

    return FORMATS[site.scheme.format].dequantize(arr, site)


def weight_matrix(model: onnx.ModelProto, site: QuantizedSite) -> np.ndarray:
    """The dequantized weight as float64 [K, N] (X @ W view; an LSTM's input weights stacked by direction)."""
    weights = dequantized_weights(model, site)
    if site.consumer == "LSTM":
        W = weights["W"]
        return W.transpose(2, 0, 1).reshape(W.shape[2], -1)
    B = weights["B"]
    return B.T if B.shape != (site.K, site.N) else B


# --- the float model ---------------------------------------------------------------------------------------------


@dataclass
class Dequantized:
    """The float model and a record of each site's original scheme (for requantize)."""

    model: onnx.ModelProto
    sites: list[QuantizedSite]
    left: list[QuantizedSite]  # quantized ops left as they are (other formats), for the report

    def summary(self) -> str:
        """What was found, in a few words: '2 weight(s): MatMulInteger int8 per-channel, symmetric'."""
        if not self.sites:
            return "no quantized weights"
        schemes = sorted({f"{s.op_type} {s.scheme.describe()}" for s in self.sites})
        return f"{len(self.sites)} weight(s): {'; '.join(schemes)}"


def dequantize_model(model: onnx.ModelProto) -> Dequantized:
    """An equivalent float model (a copy; the input itself when it has no quantized weight): each recognised
    quantized weight use becomes a float MatMul/Gemm/LSTM with a float initializer (dynamic activation
    quantization removed). Raises FwlrError for a recognised op in a scheme we cannot read (one sentence naming
    the node). QDQ and Cast+Mul patterns we cannot read are ordinary float computations on constants: they
    stay, and are listed in `left` with the reason."""
    from onnx_fwlr.quant.dequantize_graph import rewrite_sites

    found = detect_quantized(model)
    bad = [s for s in found if s.scheme is None and s.op_type in QUANTIZED_WEIGHT_OPS]
    if bad:
        raise FwlrError(f"{bad[0].node}: {bad[0].reason}")
    sites, left = [], [s for s in found if s.scheme is None]
    for site in (s for s in found if s.scheme is not None):
        why = cannot_requantize(site.scheme)
        if why is None:
            sites.append(site)
        else:  # not dequantized: it stays exactly as the input has it
            left.append(dataclasses.replace(site, reason=f"kept as the input has it: {why}, so compressing it "
                                                         "could not be written back"))
    if not sites:
        return Dequantized(model, [], left)  # nothing to do: the input itself, not a copy
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weights = [dequantized_weights(copy, s) for s in sites]
    return Dequantized(copy, rewrite_sites(copy, sites, weights), left)
