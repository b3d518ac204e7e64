"""Dynamic int8 with outlier input channels in float (issue 26): the int8 MatMul reads its input with the
largest channels zeroed, so ONNX Runtime's per-tensor step follows the other channels, and those channels'
rows of W multiply them in float. Checked against ONNX Runtime's own outputs; the choice under a latency budget
with a fake timer (no timing here)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.cost import latency as lat
from onnx_fwlr.pipeline import quantized as quantized_module
from onnx_fwlr.pipeline.quantized import compress_quantized, prepare_quantized
from onnx_fwlr.quant import ortquant
from onnx_fwlr.quant.calibration import QuantStats
from onnx_fwlr.quant.graph import SitePlan, rewrite
from onnx_fwlr.quant.ortquant import INT8_DYNAMIC

K, N, HOT = 64, 32, 5  # input channel HOT carries values ~100x the others (the GELU outputs of MiniLM: 25 vs 6)


def _model():
    """x [n, K] -> MatMul W1 -> Relu -> MatMul W2 [.., 10]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    weights = [numpy_helper.from_array((rng.standard_normal((K, N)) / 8).astype(np.float32), "W1"),
               numpy_helper.from_array((rng.standard_normal((N, 10)) / 4).astype(np.float32), "W2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _inputs(rows, seed):
    x = np.random.default_rng(seed).standard_normal((rows, K)).astype(np.float32)
    x[:, HOT] *= 100.0
    return x


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_scheme_label_and_bytes():
    scheme = INT8_DYNAMIC.with_outliers(4)
    assert scheme.label == "int8 dynamic o4" and ortquant.scheme_from_label("int8 dynamic o4") == scheme
    assert scheme.at_level(0) == scheme  # the outliers survive a level change
    assert scheme.matmul_bytes(K, N) == INT8_DYNAMIC.matmul_bytes(K, N) + 4 * (2 * N + 8) + 4 * K
    assert ortquant.scheme_from_label(INT8_DYNAMIC.label) == INT8_DYNAMIC


def test_outlier_channels_leave_the_activation_rounding_and_are_computed_in_float():
    model = _model()
    x = _inputs(200, 1)
    exact = run(model, x)
    plain = rewrite(model, {"W1": SitePlan(INT8_DYNAMIC)}, {})
    split = rewrite(model, {"W1": SitePlan(INT8_DYNAMIC.with_outliers(1), outliers=np.array([HOT]))}, {})
    onnx.checker.check_model(split)
    ops = [n.op_type for n in split.graph.node]
    assert {"MatMulInteger", "Gather", "Mul", "Cast"} <= set(ops)
    keep = next(t for t in split.graph.initializer if t.name.endswith("outlier_keep"))
    assert np.flatnonzero(numpy_helper.to_array(keep) == 0).tolist() == [HOT]

    def error(m):
        return np.linalg.norm(run(m, x) - exact) / np.linalg.norm(exact)

    assert error(split) < 0.2 * error(plain)  # the step follows the ordinary channels: most rounding gone
    # what the graph computes, by hand: int8 of x with the channel zeroed (ORT's quantizer, read back) + float rows
    W1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W1"))
    kept = x.copy()
    kept[:, HOT] = 0.0
    int8_part = rewrite(_model_without_relu(W1), {"W": SitePlan(INT8_DYNAMIC)}, {})
    by_hand = run(int8_part, kept) + x[:, [HOT]] @ W1[[HOT]].astype(np.float16).astype(np.float32)
    after_fc1 = _first_layer(split)
    np.testing.assert_allclose(run(after_fc1, x), by_hand, rtol=1e-4, atol=1e-4)


def _model_without_relu(W):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])],
                              [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _first_layer(model):
    """The model with fc1's output `h` as its output."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", N]))
    return copy


def test_quant_stats_price_the_step_without_the_largest_channels():
    high = np.array([1.0, 50.0, 2.0, 3.0])
    low = np.array([-1.0, -0.5, -2.0, -1.0])
    stats = QuantStats(channel_ranges={"x": [(high, low), (high / 2, low / 2)]}, step_squares={"x": 0.0})
    assert stats.largest_channels("x").tolist() == [1, 3, 2, 0]
    without = stats.rounding_variance_without("x", [1])
    steps = np.array([(3.0 + 2.0) / 255, (1.5 + 1.0) / 255])
    assert without == pytest.approx(np.mean(steps ** 2) / 12)


def _calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_inputs(256, 2))
    return path


def test_the_predicted_rounding_loss_falls_where_a_channel_dominates(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    job = prepare_quantized(str(path), quantize="int8", calibration=str(_calib(tmp_path)), method="kfac",
                            progress=False, outliers=(1, 4))
    quantized_module._options(job)  # each site's losses are priced with its weighting when its options are made
    assert job.outlier_channels["W1"][0] == HOT
    assert job.outlier_loss[("W1", 1)] < 0.1 * job.rounding_loss["W1"]  # the hot channel set the step
    assert job.outlier_loss[("W2", 1)] > 0.3 * job.rounding_loss["W2"]  # Relu outputs: no channel dominates
    labels = [s.label for s in job.site_schemes(job.sites[0])]
    assert labels == ["int8 dynamic", "int8 dynamic o1", "int8 dynamic o4"]
    plain = prepare_quantized(str(path), quantize="int8", calibration=str(_calib(tmp_path)), method="kfac",
                              progress=False)
    assert plain.outliers == () and [s.label for s in plain.site_schemes(plain.sites[0])] == ["int8 dynamic"]


class _Latency(lat.MeasuredLatency):
    """Fake timing: fp32 ms = FLOPs / 1e6, int8 forms 0.5x that, an outlier form `extra` ms more, a correction
    pair at 3x its FLOP share; the whole-model check measures 0.5."""

    def __init__(self, cache_dir, extra):
        def timer(K, N, rank, tokens, form=lat.FP32):
            dense = 2 * tokens * K * N / 1e6
            pair = 0.0 if rank is None else 3 * 2 * tokens * rank * (K + N) / 1e6
            if form == lat.FP32:
                return dense if rank is None else pair
            return 0.5 * dense + pair + (extra if " o" in form else 0.0)

        super().__init__(threads=1, cache_dir=cache_dir, timer=timer)
        self.profiled = 0

    def site_share(self, model, nodes, feed, runs=5):
        self.profiled += 1
        return 0.9

    def model_ratio(self, original, compressed, feed, runs=20):
        return {"pairs": 20, "ratio_p50": 0.5, "ratio_p10": 0.45, "ratio_p90": 0.55}


@pytest.mark.parametrize("extra, chosen", [(0.001, True), (10.0, False)], ids=["cheap", "dear"])
def test_a_latency_budget_takes_the_outlier_option_when_its_loss_per_ms_pays(tmp_path, extra, chosen):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    model, report = compress_quantized(str(path), quantize="int8", target_latency=0.6, method="kfac",
                                       calibration=str(_calib(tmp_path)), latency=_Latency(tmp_path, extra),
                                       progress=False)
    notes = {s.weight: s.note for s in report.sites}
    assert notes["W1"].startswith("int8 dynamic o") == chosen, notes
    x = _inputs(100, 3)
    exact = run(_model(), x)
    error = np.linalg.norm(run(model, x) - exact) / np.linalg.norm(exact)
    plain = rewrite(_model(), {"W1": SitePlan(INT8_DYNAMIC), "W2": SitePlan(INT8_DYNAMIC)}, {})
    plain_error = np.linalg.norm(run(plain, x) - exact) / np.linalg.norm(exact)
    assert (error < 0.5 * plain_error) == chosen


def test_a_budget_just_above_the_fastest_model_is_judged_by_the_same_profile(tmp_path):
    from onnx_fwlr.pipeline.quantized import build_quantized, fastest_latency

    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    latency = _Latency(tmp_path, 0.001)
    job = prepare_quantized(str(path), quantize="int8", calibration=str(_calib(tmp_path)), method="kfac",
                            progress=False, timed=True)
    assert job.outliers == (1, 4)  # offered by default under a latency budget
    fastest = fastest_latency(job, latency)
    assert fastest == pytest.approx(0.1 + 0.9 * 0.5)  # every site at int8 (0.5x fp32) in 90 % of the time
    _, report = build_quantized(job, target_latency=fastest, latency=latency)
    assert {s.note.split(":")[0] for s in report.sites if s.weight in ("W1", "W2")} == {"int8 dynamic"}
    _, report = build_quantized(job, target_latency=fastest * 1.02, latency=latency)
    assert report.budget["speed"]["predicted_ratio"] <= fastest * 1.02
    assert any(s.note.startswith("int8 dynamic o") for s in report.sites)
    assert latency.profiled == 1  # one profile per job: the budget and the fastest model share it
