"""Already-quantized models as inputs (onnx_fwlr.quant.dequantize / requantize): detection of every quantized
weight use, its exact float value (checked against ONNX Runtime), the float model, and the round trip back
through ONNX Runtime's own quantizers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, matmul_model, run, vinfo
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.quant.dequantize import dequantize_model, detect_quantized, weight_matrix
from onnx_fwlr.quant.int8_kernels import int8_saturates
from onnx_fwlr.quant.requantize import requantize
from onnx_fwlr.rewrite.lowrank import Factors, apply_factors
from onnx_fwlr.sites.find import weight_matrix as float_weight_matrix
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.workflows.listing import inspect_model

K, H, N = 64, 48, 16
SEQ, BATCH, INPUT, HIDDEN = 5, 3, 16, 8


def _mlp(seed: int = 0, weights=None) -> onnx.ModelProto:
    """x [n, 64] → MatMul W1 [64, 48] → Relu → Gemm(W2 [16, 48] transB, bias) → y [n, 16]."""
    rng = np.random.default_rng(seed)
    W1, W2, b2 = weights or (rng.standard_normal((K, H)) / 8, rng.standard_normal((N, H)) / 7, rng.standard_normal(N))
    inits = [numpy_helper.from_array(np.asarray(w, np.float32), name)
             for w, name in ((W1, "W1"), (W2, "W2"), (b2, "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1)]
    return make_model(nodes, [vinfo("x", ["n", K])], [vinfo("y", ["n", N])], inits)


def _lstm(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (2, 4 * HIDDEN, INPUT)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.4, (2, 4 * HIDDEN, HIDDEN)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(0, 0.2, (2, 8 * HIDDEN)).astype(np.float32), "B")]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "y_h"], name="lstm", hidden_size=HIDDEN,
                            direction="bidirectional")
    return make_model([node], [vinfo("x", [SEQ, "b", INPUT])], [vinfo("y", [SEQ, 2, "b", HIDDEN]),
                                                                   vinfo("y_h", [2, "b", HIDDEN])], inits)


def _inputs(model: onnx.ModelProto, seed: int = 1, rows: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    shape = (SEQ, BATCH, INPUT) if model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == SEQ else (rows, K)
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def _dynamic(model, tmp_path, per_channel=True, op_types=None, name="dynamic", reduce_range=None) -> onnx.ModelProto:
    """A shipped dynamic int8 model, made as ONNX Runtime advises for this CPU: 7-bit weights where its u8s8
    kernels saturate on 8-bit ones (quant.int8_kernels), so that the runtime's output is exact integer arithmetic
    on the stored weights on every x86 CPU."""
    source, target = tmp_path / f"{name}_float.onnx", tmp_path / f"{name}.onnx"
    onnx.save(model, source)
    quantize_dynamic(source, target, per_channel=per_channel, weight_type=QuantType.QInt8,
                     op_types_to_quantize=op_types,
                     reduce_range=int8_saturates() if reduce_range is None else reduce_range)
    return onnx.load(target)


def _fused(quantized, tmp_path) -> onnx.ModelProto:
    """What ONNX Runtime's optimizer makes of a dynamic model (DynamicQuantizeMatMul, MatMulIntegerToFloat)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "fused.onnx")


class _Reader(CalibrationDataReader):
    def __init__(self):
        self.feeds = iter([_inputs(_mlp(), seed) for seed in range(8)])

    def get_next(self):
        return next(self.feeds, None)


def _qdq(model, tmp_path, per_channel=True) -> onnx.ModelProto:
    source, target = tmp_path / "qdq_float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, source)
    quantize_static(source, target, _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel)
    return onnx.load(target)


def _nbits(model, bits=4, block=32, symmetric=True, qdq=False) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                     quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    quantizer.process()
    return quantizer.model.model


def _cast_mul(per_channel=True, zero_point=False, float_original=False) -> onnx.ModelProto:
    """The MLP's weights stored as int8/uint8 with Mul(Cast(q), scale) (and Sub(zero point)), built by hand;
    `float_original`: a float MLP this is the round-to-nearest quantization of (each weight within half a step)."""
    rng = np.random.default_rng(3)
    q1 = rng.integers(0 if zero_point else -127, 256 if zero_point else 128, (K, H))
    s1 = (rng.random(H if per_channel else 1) * 0.02 + 0.005).astype(np.float32)
    q2 = rng.integers(-127, 128, (N, H)).astype(np.int8)
    # as a min/max quantizer makes them: every scale's range reaches the ends of the integer range
    q1[0] = 127 if not zero_point else q1[0]
    q1[0, :2] = (0, 255) if zero_point else (127, -127)
    q2[:, 0] = 127
    s2 = (rng.random((N, 1) if per_channel else 1) * 0.02 + 0.005).astype(np.float32)
    if float_original:
        offset = 121 if zero_point else 0
        noise = [rng.uniform(-0.49, 0.49, shape) for shape in ((K, H), (N, H))]
        return _mlp(weights=((q1 - offset + noise[0]) * s1, (q2 + noise[1]) * s2, np.ones(N)))
    inits = [numpy_helper.from_array(q1.astype(np.uint8 if zero_point else np.int8), "W1_q"),
             numpy_helper.from_array(s1, "W1_s"), numpy_helper.from_array(q2, "W2_q"),
             numpy_helper.from_array(s2, "W2_s"), numpy_helper.from_array(np.ones(N, np.float32), "b2")]
    nodes = [helper.make_node("Cast", ["W1_q"], ["W1_c"], to=TensorProto.FLOAT)]
    w1 = "W1_c"
    if zero_point:
        inits.append(numpy_helper.from_array(np.array(121.0, np.float32), "W1_z"))
        nodes.append(helper.make_node("Sub", ["W1_c", "W1_z"], ["W1_shifted"]))
        w1 = "W1_shifted"
    nodes += [helper.make_node("Mul", [w1, "W1_s"], ["W1"], name="W1_dequantize"),
              helper.make_node("Cast", ["W2_q"], ["W2_c"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["W2_s", "W2_c"], ["W2"], name="W2_dequantize"),
              helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1)]
    return make_model(nodes, [vinfo("x", ["n", K])], [vinfo("y", ["n", N])], inits)


def _quantized(kind: str, tmp_path) -> onnx.ModelProto:
    if kind == "dynamic-per-channel":
        return _dynamic(_mlp(), tmp_path, per_channel=True)
    if kind == "dynamic-per-tensor":
        return _dynamic(_mlp(), tmp_path, per_channel=False)
    if kind == "dynamic-fused":
        return _fused(_dynamic(_mlp(), tmp_path), tmp_path)
    if kind == "qdq-per-channel":
        return _qdq(_mlp(), tmp_path, per_channel=True)
    if kind == "qdq-per-tensor":
        return _qdq(_mlp(), tmp_path, per_channel=False)
    if kind == "cast-mul":
        return _cast_mul()
    if kind == "cast-mul-zero-point":
        return _cast_mul(per_channel=False, zero_point=True)
    if kind == "nbits-4-b32":
        return _nbits(_mlp())
    if kind == "nbits-4-b16-zero-point":
        return _nbits(_mlp(), block=16, symmetric=False)
    if kind == "qdq-int4-b32":
        return _nbits(_mlp(), qdq=True)
    if kind == "lstm-dynamic":
        return _dynamic(_lstm(), tmp_path, per_channel=True, op_types=["LSTM"], name="lstm")
    raise AssertionError(kind)


KINDS = ["dynamic-per-channel", "dynamic-per-tensor", "dynamic-fused", "qdq-per-channel", "qdq-per-tensor",
         "cast-mul", "cast-mul-zero-point", "nbits-4-b32", "nbits-4-b16-zero-point", "qdq-int4-b32", "lstm-dynamic"]
# (op found, float op, granularity, bits, block size, symmetric) of each kind's site with that float op
EXPECTED = {
    "dynamic-per-channel": ("MatMulInteger", "MatMul", "per-channel", 8, None, True),
    "dynamic-per-tensor": ("MatMulInteger", "MatMul", "per-tensor", 8, None, True),
    "dynamic-fused": ("DynamicQuantizeMatMul", "MatMul", "per-channel", 8, None, True),
    "qdq-per-channel": ("DequantizeLinear", "Gemm", "per-channel", 8, None, True),
    "qdq-per-tensor": ("DequantizeLinear", "Gemm", "per-tensor", 8, None, True),
    "cast-mul": ("Cast+Mul", "MatMul", "per-channel", 8, None, True),
    "cast-mul-zero-point": ("Cast+Mul", "MatMul", "per-tensor", 8, None, False),
    "nbits-4-b32": ("MatMulNBits", "MatMul", "block", 4, 32, True),
    "nbits-4-b16-zero-point": ("MatMulNBits", "MatMul", "block", 4, 16, False),
    "qdq-int4-b32": ("DequantizeLinear", "MatMul", "block", 4, 32, True),
    "lstm-dynamic": ("DynamicQuantizeLSTM", "LSTM", "per-channel", 8, None, True),
}


@pytest.mark.parametrize("kind", KINDS)
def test_detection_finds_each_quantized_weight_with_its_scheme(kind, tmp_path):
    found = detect_quantized(_quantized(kind, tmp_path))
    op, consumer, granularity, bits, block, symmetric = EXPECTED[kind]
    expected_count = 1 if kind.startswith(("nbits", "lstm", "qdq-int4")) else 2  # MatMulNBitsQuantizer: MatMul only
    assert len(found) == expected_count and all(s.supported for s in found)
    site = next(s for s in found if s.consumer == consumer)
    assert (site.op_type, site.consumer, site.scheme.granularity, site.scheme.bits) == (op, consumer, granularity, bits)
    assert (site.scheme.block_size, site.scheme.symmetric) == (block, symmetric)
    assert {(s.K, s.N) for s in found} <= {(K, H), (H, N), (INPUT, 2 * 4 * HIDDEN)}


def _ort_weight(model: onnx.ModelProto, site) -> np.ndarray:
    """The weight as ONNX Runtime computes it: the dequantized tensor itself (QDQ, Cast+Mul) or, for ops that
    multiply inside, the op on an identity input."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if site.op_type in ("DequantizeLinear", "Cast+Mul"):
        probe.graph.ClearField("output")
        probe.graph.output.append(vinfo(site.tensors["output"], None))
        values = run(probe, _inputs(model))[0]
        return values.T if values.shape != (site.K, site.N) else values
    assert probe.graph.input[0].name == site.tensors["x"], "the probe feeds the site's own input"
    probe.graph.ClearField("output")
    probe.graph.output.append(vinfo(site.tensors["output"], None))
    return run(probe, {"x": np.eye(site.K, dtype=np.float32)})[0]


@pytest.mark.parametrize("kind", ["dynamic-per-channel", "dynamic-per-tensor", "dynamic-fused", "qdq-per-channel",
                                  "qdq-per-tensor", "cast-mul", "cast-mul-zero-point", "nbits-4-b32",
                                  "nbits-4-b16-zero-point", "qdq-int4-b32"])
def test_dequantized_weight_is_what_onnx_runtime_computes(kind, tmp_path):
    model = _quantized(kind, tmp_path)
    checked = 0
    for site in detect_quantized(model):
        if site.op_type not in ("DequantizeLinear", "Cast+Mul") and site.tensors["x"] != "x":
            continue  # an op inside the graph: its input cannot be set to the identity
        W = weight_matrix(model, site)
        assert W.shape == (site.K, site.N) and W.dtype == np.float64
        np.testing.assert_allclose(_ort_weight(model, site), W, rtol=1e-6, atol=1e-6 * np.abs(W).max())
        checked += 1
    assert checked >= 1


def test_lstm_weights_are_the_originals_within_half_a_step(tmp_path):
    """DynamicQuantizeLSTM: round to nearest, so each dequantized weight is within half its scale of the float."""
    original = _lstm()
    model = _quantized("lstm-dynamic", tmp_path)
    (site,) = detect_quantized(model)
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == site.tensors["W_scale"]))
    W = numpy_helper.to_array(original.graph.initializer[0]).astype(np.float64)  # [dirs, 4H, input]
    recovered = dequantize_model(model)
    W_float = numpy_helper.to_array(next(t for t in recovered.model.graph.initializer
                                         if t.name == recovered.sites[0].float_weight))
    assert W_float.shape == W.shape
    assert np.all(np.abs(W_float - W) <= scale[:, :, None] / 2 * (1 + 1e-6))


def _dynamic_step_bound(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """|Δy| of X @ W when X is quantized by DynamicQuantizeLinear (uint8, range including 0): half a step per
    input, times Σ_k |W_kn|."""
    step = (max(x.max(), 0) - min(x.min(), 0)) / 255
    return step / 2 * np.abs(W).sum(axis=0)


@pytest.mark.parametrize("kind", ["dynamic-per-channel", "dynamic-per-tensor", "dynamic-fused",
                                  "dynamic-per-channel-7-bit"])
def test_dynamic_float_model_is_within_the_activation_step(kind, tmp_path):
    W = np.random.default_rng(4).standard_normal((K, H)).astype(np.float32) / 8
    model = matmul_model(W)
    quantized = {"dynamic-per-channel": lambda: _dynamic(model, tmp_path),
                 "dynamic-per-tensor": lambda: _dynamic(model, tmp_path, per_channel=False),
                 "dynamic-fused": lambda: _fused(_dynamic(model, tmp_path), tmp_path),
                 "dynamic-per-channel-7-bit": lambda: _dynamic(model, tmp_path, reduce_range=True)}[kind]()
    recovered = dequantize_model(quantized)
    assert {n.op_type for n in recovered.model.graph.node} == {"MatMul"}
    x = np.random.default_rng(5).standard_normal((8, K)).astype(np.float32)
    y_q, y_f = run(quantized, {"x": x})[0], run(recovered.model, {"x": x})[0]
    bound = _dynamic_step_bound(x, weight_matrix(quantized, detect_quantized(quantized)[0]))
    assert np.all(np.abs(y_q - y_f) <= bound + 1e-5)
    assert np.abs(y_q - y_f).max() > 0  # the activation quantization really was removed


def test_shared_activation_quantizer_is_removed_with_its_last_site(tmp_path):
    """MatMulIntegerToFloat pairs sharing one DynamicQuantizeLinear (what ORT fuses Q/K-like projections into)."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((K, H)).astype(np.float32), name) for name in ("Wa", "Wb")]
    nodes = [helper.make_node("MatMul", ["x", "Wa"], ["a"], name="a"), helper.make_node("MatMul", ["x", "Wb"], ["b"],
                                                                                         name="b"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = _fused(_dynamic(make_model(nodes, [vinfo("x", ["n", K])], [vinfo("y", ["n", H])], inits), tmp_path),
                   tmp_path)
    assert [s.op_type for s in detect_quantized(model)] == ["MatMulIntegerToFloat"] * 2
    recovered = dequantize_model(model)
    assert [n.op_type for n in recovered.model.graph.node] == ["MatMul", "MatMul", "Add"]
    x = np.random.default_rng(7).standard_normal((8, K)).astype(np.float32)
    bound = sum(_dynamic_step_bound(x, weight_matrix(model, s)) for s in detect_quantized(model))
    assert np.all(np.abs(run(model, {"x": x})[0] - run(recovered.model, {"x": x})[0]) <= bound + 1e-4)


@pytest.mark.parametrize("kind", ["qdq-per-channel", "qdq-per-tensor", "cast-mul", "cast-mul-zero-point",
                                  "nbits-4-b32", "nbits-4-b16-zero-point", "qdq-int4-b32"])
def test_weight_only_float_model_gives_the_same_outputs(kind, tmp_path):
    model = _quantized(kind, tmp_path)
    recovered = dequantize_model(model)
    onnx.checker.check_model(recovered.model)
    for site in recovered.sites:
        assert site.float_weight in {t.name for t in recovered.model.graph.initializer}
    assert not any(n.op_type in ("MatMulNBits", "Cast") for n in recovered.model.graph.node)
    sites, _ = find_all_sites(recovered.model, None, None, fisher=False)
    assert len(sites) == 2  # both weights are plain float constants now, so the float pipeline sees them
    feed = _inputs(model)
    y_q, y_f = run(model, feed)[0], run(recovered.model, feed)[0]
    np.testing.assert_allclose(y_f, y_q, rtol=1e-5, atol=1e-5 * np.abs(y_q).max())


def test_lstm_float_model_is_within_the_quantization_error(tmp_path):
    original, model = _lstm(), _quantized("lstm-dynamic", tmp_path)
    recovered = dequantize_model(model)
    assert [n.op_type for n in recovered.model.graph.node] == ["LSTM"]
    feed = _inputs(original)
    y, y_q, y_f = run(original, feed)[0], run(model, feed)[0], run(recovered.model, feed)[0]
    assert np.abs(y_f - y_q).max() <= 2 * np.abs(y_q - y).max()


def _integers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    kinds = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type in kinds}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_gives_back_the_same_integers(kind, tmp_path):
    model = _quantized(kind, tmp_path)
    recovered = dequantize_model(model)
    again = requantize(recovered.model, recovered.sites)
    onnx.checker.check_model(again)
    found_again = [s.describe() for s in detect_quantized(again)]
    if kind == "dynamic-fused":  # quantize_dynamic writes the MatMulInteger chain ORT fuses at load
        reduced = ", reduced range" if int8_saturates() else ""  # the fixture's 7-bit weights on such a CPU
        assert found_again == [f"MatMulInteger int8 per-channel, symmetric{reduced}"] * 2
    else:
        assert found_again == [s.describe() for s in detect_quantized(model)]
    before, after = _integers(model), _integers(again)
    weights = {s.weight for s in detect_quantized(model)}
    for name in weights & set(before):
        assert any(v.shape == before[name].shape and np.array_equal(v, before[name]) for v in after.values()), name
    feed = _inputs(model)
    y_q, y_r = run(model, feed)[0], run(again, feed)[0]
    np.testing.assert_allclose(y_r, y_q, rtol=1e-5, atol=1e-5 * np.abs(y_q).max())


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_full_rank_factors(kind, tmp_path):
    """dequantize → factorise at full rank (exact SVD, Σ split evenly) → requantize every factor with the same
    scheme: the outputs stay within a few times the input model's own quantization error of it (each factor
    carries its own rounding now)."""
    original = {"lstm-dynamic": _lstm(), "cast-mul": _cast_mul(float_original=True),
                "cast-mul-zero-point": _cast_mul(False, True, float_original=True)}.get(kind) or _mlp()
    model = _quantized(kind, tmp_path)
    recovered = dequantize_model(model)
    float_model = recovered.model
    sites, _ = find_all_sites(float_model, None, None, fisher=False)
    factors = {}
    for site in sites:
        U, S, Vt = np.linalg.svd(float_weight_matrix(float_model, site), full_matrices=False)
        factors[site.weight] = Factors(U * np.sqrt(S), np.sqrt(S)[:, None] * Vt)  # Σ split as the methods do
    apply_factors(float_model, sites, factors)
    again = requantize(float_model, recovered.sites)
    onnx.checker.check_model(again)
    quantized_ops = [n.op_type for n in again.graph.node if n.op_type in
                     ("MatMulInteger", "MatMulNBits", "DynamicQuantizeLSTM", "DequantizeLinear", "Cast")]
    assert len(quantized_ops) >= 2 * len(recovered.sites)  # every factor quantized again
    feed = _inputs(model)
    y_q, y_r = run(model, feed)[0], run(again, feed)[0]
    # measured ratios: 1.0–1.6 for the models ORT's quantizers made; 2.7 and 3.4 for the hand-made Cast+Mul ones,
    # whose integers fill the range uniformly while their SVD factors' entries are bell-shaped (coarser steps)
    assert np.linalg.norm(y_r - y_q) <= 4 * np.linalg.norm(run(original, feed)[0] - y_q)


def test_weights_inside_subgraphs_are_found_and_dequantized():
    """A Cast+Mul weight used by a MatMul in an If branch, its integers stored in the main graph."""
    rng = np.random.default_rng(8)
    q = rng.integers(-127, 128, (K, H)).astype(np.int8)
    scale = (rng.random(H) * 0.01 + 0.001).astype(np.float32)
    branch = helper.make_graph([helper.make_node("Cast", ["Wq"], ["Wc"], to=TensorProto.FLOAT),
                                helper.make_node("Mul", ["Wc", "Ws"], ["W"]),
                                helper.make_node("MatMul", ["x", "W"], ["then_y"], name="inner")],
                               "then", [], [vinfo("then_y", ["n", H])])
    other = helper.make_graph([helper.make_node("Identity", ["zeros"], ["else_y"])], "else", [],
                              [vinfo("else_y", ["n", H])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws"),
             numpy_helper.from_array(np.zeros((1, H), np.float32), "zeros")]
    model = make_model(nodes, [vinfo("x", ["n", K]), vinfo("cond", [], TensorProto.BOOL)], [vinfo("y", ["n", H])],
                       inits)
    (site,) = detect_quantized(model)
    assert (site.graph_index, site.op_type, site.consumer) == (2, "Cast+Mul", "MatMul")  # else_branch is graph 1
    recovered = dequantize_model(model)
    sites, _ = find_all_sites(recovered.model, None, None, fisher=False)
    assert [s.uses[0].node_name for s in sites] == ["inner"]
    feed = {"x": np.random.default_rng(9).standard_normal((4, K)).astype(np.float32), "cond": np.array(True)}
    np.testing.assert_allclose(run(recovered.model, feed)[0], run(model, feed)[0], rtol=1e-6, atol=1e-6)


def _nbits_with_g_idx() -> onnx.ModelProto:
    model = _nbits(_mlp())
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    model.graph.initializer.append(numpy_helper.from_array(np.arange(K, dtype=np.int32) // 32, "g_idx"))
    while len(node.input) < 4:
        node.input.append("")
    node.input.append("g_idx")
    return model


def _matmul_integer_without_chain() -> onnx.ModelProto:
    q = np.random.default_rng(0).integers(-127, 128, (K, H)).astype(np.int8)
    nodes = [helper.make_node("MatMulInteger", ["x", "Wq"], ["y"], name="mmi")]
    return make_model(nodes, [vinfo("x", ["n", K], TensorProto.UINT8)], [vinfo("y", ["n", H], TensorProto.INT32)],
                      [numpy_helper.from_array(q, "Wq")])


@pytest.mark.parametrize("build, words", [(_nbits_with_g_idx, "g_idx"),
                                          (_matmul_integer_without_chain, "dynamic quantization chain")])
def test_unsupported_scheme_is_one_sentence(build, words):
    model = build()
    assert any(not s.supported for s in detect_quantized(model))
    with pytest.raises(FwlrError) as error:
        dequantize_model(model)
    message = str(error.value)
    assert words in message and "\n" not in message and message.count(". ") == 0


@pytest.mark.parametrize("kind", ["dynamic-per-channel", "cast-mul", "nbits-4-b32", "lstm-dynamic"])
def test_inspect_names_each_quantized_node(kind, tmp_path):
    model = _quantized(kind, tmp_path)
    listing = inspect_model(model)
    text = listing.format()
    assert "the model is quantized" in text
    for site in detect_quantized(model):
        assert site.node in text and site.scheme.describe() in text
    assert "computed at run time (no constant weight)" not in text
    if kind == "cast-mul":
        assert "quantized constants (Cast+Mul)" in text
    data = listing.to_dict()["quantized"]
    assert data and all(q["dequantized_by_compress"] for q in data)


def test_static_qoperator_ops_are_listed_and_left_alone(tmp_path):
    source, target = tmp_path / "float.onnx", tmp_path / "qop.onnx"
    onnx.save(_mlp(), source)
    quantize_static(source, target, _Reader(), quant_format=QuantFormat.QOperator)
    model = onnx.load(target)
    recovered = dequantize_model(model)
    assert recovered.sites == [] and recovered.model is model
    assert {s.op_type for s in recovered.left} >= {"QLinearMatMul"} and all("left as it is" in s.reason
                                                                             for s in recovered.left)


def test_requantize_with_the_scheme_asked_for(tmp_path):
    """An int8 dynamic model dequantized, then quantized as int4 blocks of 32 by MatMulNBitsQuantizer."""
    from onnx_fwlr.quant.quantized_site import QuantScheme

    model = _quantized("dynamic-per-channel", tmp_path)
    recovered = dequantize_model(model)
    int4 = QuantScheme("nbits", 4, True, "block", True, 0, 32)
    again = requantize(recovered.model, recovered.sites, scheme=int4)
    assert [s.describe() for s in detect_quantized(again)] == ["MatMulNBits int4 block 32, symmetric"] * 2
    feed = _inputs(model)
    y, y_int8, y_int4 = run(_mlp(), feed)[0], run(model, feed)[0], run(again, feed)[0]
    # int4 blocks of 32 keep about 1/15 of each block's range per step: a few % of output error, more than int8's
    assert np.linalg.norm(y_int8 - y) < np.linalg.norm(y_int4 - y) <= 0.1 * np.linalg.norm(y)


# --- the CLI: compress and inspect a quantized model ----------------------------------------------------------


def _cli(*args) -> int:
    from onnx_fwlr.cli.main import main

    return main([str(a) for a in args])


def test_cli_compress_dequantizes_compresses_and_requantizes(tmp_path, capsys):
    """A dynamic int8 model of rank-8 weights at --rank 8: the factors are exact in float, so the output differs
    from the input only by quantization (a few times the input's own error), and the report says so in a line."""
    from builders import low_rank

    original = _mlp(weights=(low_rank(K, H, 8, seed=1) / 4, low_rank(N, H, 8, seed=2) / 4, np.zeros(N)))
    quantized = _dynamic(original, tmp_path)
    onnx.save(quantized, tmp_path / "int8.onnx")
    code = _cli("compress", tmp_path / "int8.onnx", "-o", tmp_path / "out.onnx", "--rank", 8, "--quiet")
    out = capsys.readouterr().out
    assert code == 0
    line = next(text for text in out.splitlines() if text.startswith("the input was quantized"))
    assert "2 weight(s): MatMulInteger int8 per-channel, symmetric" in line and "with the same scheme" in line
    result = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in result.graph.node].count("MatMulInteger") == 4  # two factors per site
    feed = _inputs(original)
    y, y_q, y_out = run(original, feed)[0], run(quantized, feed)[0], run(result, feed)[0]
    assert np.linalg.norm(y_out - y_q) <= 3 * np.linalg.norm(y_q - y)


def test_cli_unsupported_quantized_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    onnx.save(_nbits_with_g_idx(), tmp_path / "gidx.onnx")
    code = _cli("compress", tmp_path / "gidx.onnx", "-o", tmp_path / "out.onnx", "--ratio", 0.5, "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "g_idx" in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_cli_inspect_says_the_model_is_quantized(tmp_path, capsys):
    onnx.save(_quantized("nbits-4-b32", tmp_path), tmp_path / "int4.onnx")
    assert _cli("inspect", tmp_path / "int4.onnx") == 0
    out = capsys.readouterr().out
    assert "the model is quantized: 1 quantized weight(s)" in out and "int4 block 32, symmetric" in out


def test_cli_quantize_of_an_unsupported_quantized_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    """The --quantize path reads a quantized input as compress does: a scheme it cannot read stops it up front."""
    onnx.save(_nbits_with_g_idx(), tmp_path / "gidx.onnx")
    code = _cli("compress", tmp_path / "gidx.onnx", "-o", tmp_path / "out.onnx", "--quantize", "int4", "--rank", 8,
                "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "g_idx" in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
