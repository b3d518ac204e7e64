"""Dynamic int8 LSTM: DynamicQuantizeLSTM (com.microsoft, `quantize_dynamic` of an LSTM) → LSTM; written again by
quantize_dynamic."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.quant.formats.common import (
    Format,
    _input,
    _integer_kind,
    _is_symmetric,
    _label,
    _unsupported,
    affine,
    eight_bits_only,
)
from onnx_fwlr.quant.quantized_site import MS_DOMAIN, QuantizedSite, QuantScheme, _Graph


def _dynamic_quantize_lstm(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite:
    """DynamicQuantizeLSTM(X, W, R, B, seq_lens, h0, c0, P, W_scale, W_zp, R_scale, R_zp): W [dirs, in, 4H]."""
    names = {"W": _input(node, 1), "R": _input(node, 2), "W_scale": _input(node, 8),
             "W_zero_point": _input(node, 9), "R_scale": _input(node, 10), "R_zero_point": _input(node, 11)}
    tensors = {role: view.const(name) for role, name in names.items()}
    if any(tensors[role] is None for role in ("W", "R", "W_scale", "R_scale")) or any(
            names[z] and tensors[z] is None for z in ("W_zero_point", "R_zero_point")):
        return _unsupported(view, node, "DynamicQuantizeLSTM", names["W"], "DynamicQuantizeLSTM whose weights, "
                            "scales or zero points are computed at run time is not supported", "LSTM")
    W = tensors["W"]
    if W.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or len(W.dims) != 3:
        return _unsupported(view, node, "DynamicQuantizeLSTM", names["W"], "DynamicQuantizeLSTM with weights other "
                            "than 3-D int8/uint8 is not supported", "LSTM")
    dirs, K, gates = W.dims
    scheme = _lstm_scheme(model, view, names, tensors)
    roles = dict(names, x=node.input[0], output=next((o for o in node.output if o), ""))
    return QuantizedSite(_label(node), "DynamicQuantizeLSTM", view.index, names["W"], "LSTM", K, dirs * gates,
                         scheme, "", (n_index,), roles)


def _lstm_scheme(model, view: _Graph, names: dict, tensors: dict) -> QuantScheme:
    bits, signed = _integer_kind(tensors["W"])
    per_channel = len(tensors["W_scale"].dims) == 2
    symmetric = all(_is_symmetric(model, view, names[z], bits, signed) for z in ("W_zero_point", "R_zero_point"))
    reduced = all(_lstm_reduced(model, view, names[w], names[f"{w}_zero_point"], signed) for w in ("W", "R"))
    return QuantScheme("dynamic_lstm", bits, signed, "per-channel" if per_channel else "per-tensor", symmetric,
                       1 if per_channel else None, reduce_range=reduced)


def _lstm_reduced(model, view: _Graph, weight: str, zero_point: str, signed: bool) -> bool:
    """Whether a DynamicQuantizeLSTM weight [dirs, K, 4H] holds 7-bit values (reduce_range), so that it is
    requantized as 7-bit (zero points per direction, or per direction and column)."""
    q = tensor_array(model, view.const(weight)).astype(np.int64)
    zero = view.const(zero_point) if zero_point else None
    z = np.zeros(1, np.int64) if zero is None else tensor_array(model, zero).astype(np.int64)
    z = z.reshape(q.shape[0], 1, -1) if z.size > 1 else z.reshape(())
    return bool(np.abs(q - z).max(initial=0) <= 64 if signed else q.max(initial=0) <= 127)


def _lstm_weight(q: np.ndarray, zero_point: np.ndarray | None, scale: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLSTM stores [dirs, in, 4H] with scales [dirs] or [dirs, 4H]; the LSTM takes [dirs, 4H, in]."""
    expand = (slice(None), None, slice(None)) if scale.ndim == 2 else (slice(None), None, None)
    zero = None if zero_point is None else zero_point[expand]
    return affine(q, zero, scale[expand]).transpose(0, 2, 1)


def _weights(arr: Callable, site: QuantizedSite) -> dict[str, np.ndarray]:
    return {key: _lstm_weight(arr(key), arr(f"{key}_zero_point"), arr(f"{key}_scale")) for key in ("W", "R")}


FORMAT = Format("dynamic_lstm", {(MS_DOMAIN, "DynamicQuantizeLSTM"): _dynamic_quantize_lstm}, _weights, "lstm",
                lambda scheme: "dynamic", eight_bits_only)
