"""Whether this CPU's ONNX Runtime integer kernels saturate on dynamic int8 (u8 activations x s8 weights).

On x86 CPUs without VNNI (AVX2-only, e.g. many AMD EPYC), ONNX Runtime's u8s8 kernels multiply with VPMADDUBSW,
which adds each pair of u8 x s8 products into a saturating int16: 255 x 127 x 2 = 64,770 does not fit, so a
`quantize_dynamic` model computes something else there than on a VNNI or AMX CPU (whose instructions accumulate
in int32). ONNX Runtime's documentation advises `reduce_range` (7-bit weights, |q| <= 64) on those CPUs:
255 x 64 x 2 = 32,640 fits, and the integer result is exact on every CPU.

The verdict is measured once per process, not guessed from CPU flags: a small `quantize_dynamic` model whose
pairs of products overflow int16 is run in ONNX Runtime and compared with the exact result. The environment
variable ONNX_FWLR_INT8_SATURATES=1|0 overrides it (tests; or to write models for deployment on AVX2-only
CPUs from a VNNI machine).
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from onnx_fwlr.errors import FwlrError

logger = logging.getLogger(__name__)

ENV = "ONNX_FWLR_INT8_SATURATES"
WHY = ("7-bit weights (reduce_range): this CPU's ONNX Runtime u8s8 kernels saturate on full 8-bit weights, as "
       "ONNX Runtime documents for x86 CPUs without VNNI")


def int8_saturates() -> bool:
    """True when dynamic int8 with full 8-bit weights is not computed exactly by ONNX Runtime on this CPU (the
    environment variable ONNX_FWLR_INT8_SATURATES=1|0 decides instead when set)."""
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise FwlrError(f"environment variable {ENV}={forced!r} is neither 1 nor 0; unset it to let the CPU be "
                            "measured.")
        return forced == "1"
    return probe_saturation()


@functools.lru_cache(maxsize=1)
def probe_saturation() -> bool:
    """Measured: does ONNX Runtime's dynamic int8 MatMul on this CPU differ from exact integer arithmetic where
    pairs of products overflow int16? Once per process, well under a second; a probe that cannot run answers
    True (7-bit weights are exact on every CPU)."""
    try:
        y, exact = probe_outputs()
    except Exception as exc:  # noqa: BLE001 - no verdict: 7-bit weights are exact on every CPU
        logger.info("the int8 kernel probe failed (%s: %s); dynamic int8 uses 7-bit weights", type(exc).__name__, exc)
        return True
    return not np.allclose(y, exact, rtol=1e-4, atol=0)


def probe_outputs() -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime's output, the exact result) of the probe: activations that quantize to u8 255 exactly
    (scale 1, zero point 0) times weight columns of one sign each (+1 or -1, quantized to s8 +-127 exactly), so
    that every pair of products is +-64,770 and a saturating kernel returns about half of the exact sum."""
    import onnx
    from onnx import helper, numpy_helper

    from onnx_fwlr.io.runtime import make_session
    from onnx_fwlr.quant.ortquant import quantize_dynamic_nodes

    M, K, N = 16, 64, 16
    W = np.ones((K, N), dtype=np.float32)
    W[:, 1::2] = -1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="probe")], "int8_probe",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [M, N])],
        [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    quantized = quantize_dynamic_nodes(model, ["probe"], reduce_range=False)
    X = np.full((M, K), 255.0, dtype=np.float32)
    X[0] = 0.0  # the range [0, 255]: scale 1, zero point 0
    y = make_session(quantized).run(None, {"X": X})[0]
    return y, X.astype(np.float64) @ W.astype(np.float64)
