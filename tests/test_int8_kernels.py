"""Dynamic int8 gives the same results on every x86 CPU: where ONNX Runtime's u8s8 kernels saturate (no VNNI),
weights are written with 7 bits, and what the runtime computes equals exact integer arithmetic on the stored
weights either way. Every assertion compares ONNX Runtime's own output in this process, so the bounds hold on
AVX2-only, VNNI and AMX machines alike; the forced "saturating" verdict reproduces here what an AVX2-only CPU
writes and computes."""

from __future__ import annotations

import numpy as np
import pytest
from builders import matmul_model, run
from onnx import numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.quant import ortquant
from onnx_fwlr.quant.int8_kernels import ENV, int8_saturates, probe_saturation


def _exact_dynamic(quantized, x: np.ndarray) -> np.ndarray:
    """What a non-saturating kernel computes: DynamicQuantizeLinear of x (u8, round half to even) times the stored
    int8 weights, in exact integers, then scaled."""
    arrays = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    q, scale, zero = arrays["W_quantized"], arrays["W_scale"], arrays["W_zero_point"]
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    x_scale = np.float32((hi - lo) / 255)
    x_zero = np.clip(np.round(-lo / x_scale), 0, 255)
    qx = np.clip(np.round(x / x_scale) + x_zero, 0, 255)
    integer = (qx.astype(np.int64) - int(x_zero)) @ (q.astype(np.int64) - zero.astype(np.int64))
    return integer.astype(np.float64) * float(x_scale) * scale.astype(np.float64)


def _overflowing_case(seed: int = 0):
    """Weights of one sign (q mostly 64..127) and activations spread over the whole u8 range, exactly on its
    grid (so no rounding rule of any kernel can differ): many pairs of products overflow int16 on a saturating
    kernel."""
    rng = np.random.default_rng(seed)
    W = rng.uniform(0.5, 1.0, size=(64, 24)).astype(np.float32)
    x = (rng.integers(0, 256, size=(32, 64)) / 64).astype(np.float32)  # on the u8 grid: step 1/64, no rounding
    x[0, :2] = 0.0, 255 / 64
    return W, x


def test_the_probe_agrees_with_a_measurement_on_other_weights(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    W, x = _overflowing_case()
    full = ortquant.quantize_dynamic_nodes(matmul_model(W, ("batch", 64)), ["mm"], reduce_range=False)
    differs = not np.allclose(run(full, {"x": x})[0], _exact_dynamic(full, x), rtol=1e-5, atol=1e-4)
    assert probe_saturation() == differs == int8_saturates()


@pytest.mark.parametrize("forced", [None, "1"], ids=["this-cpu", "forced-saturating"])
def test_written_int8_weights_are_computed_exactly_on_every_cpu(forced, monkeypatch):
    if forced is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, forced)
    W, x = _overflowing_case(1)
    quantized = ortquant.quantize_dynamic_nodes(matmul_model(W, ("batch", 64)), ["mm"])
    q = numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name == "W_quantized"))
    if int8_saturates():
        assert np.abs(q.astype(int)).max() <= 64  # 7 bits: 255 * 64 * 2 fits in int16
    np.testing.assert_allclose(run(quantized, {"x": x})[0], _exact_dynamic(quantized, x), rtol=1e-5, atol=1e-4)
    # the weight the correction is fitted to is the one written
    stored = (q.astype(np.float64) - numpy_helper.to_array(next(
        t for t in quantized.graph.initializer if t.name == "W_zero_point"))) * numpy_helper.to_array(next(
            t for t in quantized.graph.initializer if t.name == "W_scale"))
    np.testing.assert_allclose(ortquant.dynamic_int8_weight(W), stored, atol=1e-7)


def test_forced_saturating_verdict_writes_seven_bit_weights_within_their_step(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    W = np.random.default_rng(2).standard_normal((48, 40)).astype(np.float32)
    deq = ortquant.dynamic_int8_weight(W)
    steps = np.abs(W).max(axis=0) / 63  # symmetric 7-bit per output channel
    assert np.all(np.abs(deq - W) <= steps / 2 + 1e-6)
    monkeypatch.setenv(ENV, "0")
    assert np.abs(ortquant.dynamic_int8_weight(W) - W).max() < np.abs(deq - W).max()  # 8 bits are finer


def test_an_unreadable_override_is_one_sentence(monkeypatch):
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(FwlrError, match="neither 1 nor 0"):
        int8_saturates()


def test_a_probe_that_cannot_run_chooses_the_weights_exact_everywhere(monkeypatch):
    from onnx_fwlr.quant import int8_kernels

    def broken():
        raise RuntimeError("no MatMulInteger kernel")

    monkeypatch.setattr(int8_kernels, "probe_outputs", broken)
    int8_kernels.probe_saturation.cache_clear()
    try:
        assert int8_kernels.probe_saturation() is True
    finally:
        int8_kernels.probe_saturation.cache_clear()
