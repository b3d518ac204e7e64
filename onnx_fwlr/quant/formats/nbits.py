"""MatMulNBits (com.microsoft, `MatMulNBitsQuantizer`): 2/4/8-bit blocks → MatMul (+ Add); written again by
MatMulNBitsQuantizer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnx_fwlr.quant.formats.common import Format, _input, _label, _unsupported, affine
from onnx_fwlr.quant.quantized_site import MS_DOMAIN, QuantizedSite, QuantScheme, _Graph
from onnx_fwlr.sites.find import node_attribute


def _matmul_nbits(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite:
    """MatMulNBits(A, B, scales, zero_points, g_idx, bias) with attributes K, N, bits, block_size."""
    a, b, scale_name, zero_name, g_idx, bias = (_input(node, i) for i in range(6))
    K, N = int(node_attribute(node, "K", 0)), int(node_attribute(node, "N", 0))
    bits, block = int(node_attribute(node, "bits", 4)), int(node_attribute(node, "block_size", 0))
    if view.const(b) is None or view.const(scale_name) is None or (zero_name and view.const(zero_name) is None):
        return _unsupported(view, node, "MatMulNBits", b, "MatMulNBits whose weight, scales or zero points are "
                            "computed at run time is not supported", "MatMul")
    if g_idx:
        return _unsupported(view, node, "MatMulNBits", b, "MatMulNBits with a g_idx input (act-order) is not "
                            "supported; quantize the float model without act-order", "MatMul")
    if bits not in (2, 4, 8) or block <= 0 or view.const(b).data_type != onnx.TensorProto.UINT8:
        return _unsupported(view, node, "MatMulNBits", b, f"MatMulNBits with {bits} bits and block size {block} "
                            "is not supported (2, 4 or 8 bits packed in uint8 are)", "MatMul")
    symmetric = not zero_name
    scheme = QuantScheme("nbits", bits, symmetric, "block", symmetric, 0, block)
    tensors = {"q": b, "scale": scale_name, "zero_point": zero_name, "x": a, "output": node.output[0], "bias": bias}
    return QuantizedSite(_label(node), "MatMulNBits", view.index, b, "MatMul", K, N, scheme, "", (n_index,), tensors)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 [..., bytes] holding `bits`-bit values, lowest bits first -> int64 [..., count]."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.int64)


def _nbits_weight(packed: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                  site: QuantizedSite) -> np.ndarray:
    """MatMulNBits: B [N, blocks, blob] uint8, scales [N, blocks]; zero points packed uint8 [N, ⌈blocks·bits/8⌉]
    or unpacked floats [N, blocks]; absent = 2^(bits−1). Returns W [K, N]."""
    K, N = site.K, site.N
    bits, block = site.scheme.bits, site.scheme.block_size
    blocks = -(-K // block)
    scale = scale.reshape(N, blocks)
    q = unpack_bits(packed.reshape(N, blocks, -1), bits, block)  # [N, blocks, block]
    if zero_point is None:
        zero = np.full((N, blocks), 1 << (bits - 1), dtype=np.float64)
    elif zero_point.dtype == np.uint8:
        zero = unpack_bits(zero_point.reshape(N, -1), bits, blocks)
    else:
        zero = zero_point.reshape(N, blocks)
    W = affine(q, zero[:, :, None], scale[:, :, None])
    return W.reshape(N, blocks * block)[:, :K].T


def _weights(arr: Callable, site: QuantizedSite) -> dict[str, np.ndarray]:
    return {"B": _nbits_weight(arr("q"), arr("scale"), arr("zero_point"), site)}


def _cannot_write(scheme: QuantScheme) -> str | None:
    return None if scheme.bits in (2, 4, 8) else f"MatMulNBitsQuantizer writes 2, 4 or 8 bits, not {scheme.bits}"


FORMAT = Format("nbits", {(MS_DOMAIN, "MatMulNBits"): _matmul_nbits}, _weights, "matmul", lambda scheme: "nbits",
                _cannot_write)
