"""Tests for onnx_fwlr.profile: inputs, FLOP counting from real shapes, ORT measurements, reports, test data."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.cost.flops import measure_node_flops, recurrent_flops
from onnx_fwlr.cost.limits import (
    achievable_ratio,
    factorised_sites,
    format_speed,
    owner,
    paired_ratio,
    ratio_summary,
    speed_limits,
)
from onnx_fwlr.cost.profiling import (
    METRICS,
    compare_profiles,
    format_comparison,
    format_profile,
    matmul_flops,
    parse_ort_profile,
    parse_shape_args,
    profile_model,
    save_test_data,
    symbolic_defaults,
    synthetic_feed,
)
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io import data
from onnx_fwlr.io.model import file_size
from onnx_fwlr.sites.find import model_parameters

B, T, K, N, P, Q = 2, 3, 4, 5, 6, 7
RANK = 1  # of the factorised first weight in the "compressed" model


def _model(factorised=False):
    """x[B,T,K] -> MatMul W1 -> y[B,T,N]; y @ y^T (batched); Reshape(-1,N) -> Gemm(transB) -> Transpose -> Gemm(transA).

    With factorised=True, W1 [K,N] becomes A1 [K,RANK] @ B1 [RANK,N].
    """
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    if factorised:
        first = [helper.make_node("MatMul", ["x", "A1"], ["h"], name="mm1/factor_A"),  # the rewrite's naming
                 helper.make_node("MatMul", ["h", "B1"], ["y"], name="mm1/factor_B")]
        first_weights = [weight("A1", K, RANK), weight("B1", RANK, N)]
    else:
        first = [helper.make_node("MatMul", ["x", "W1"], ["y"], name="mm1")]
        first_weights = [weight("W1", K, N)]
    nodes = first + [
        helper.make_node("Transpose", ["y"], ["yt"], name="tr1", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["y", "yt"], ["scores"], name="mm_batched"),
        helper.make_node("Reshape", ["y", "flat_shape"], ["y2"], name="flatten"),
        helper.make_node("Gemm", ["y2", "W2"], ["z"], name="gemm_tb", transB=1),
        helper.make_node("Relu", ["z"], ["zr"], name="relu"),
        helper.make_node("Transpose", ["zr"], ["zt"], name="tr2", perm=[1, 0]),
        helper.make_node("Gemm", ["zt", "W3", "C3"], ["out"], name="gemm_ta", transA=1, alpha=0.5, beta=2.0),
    ]
    initializers = first_weights + [
        weight("W2", P, N), weight("W3", P, Q), weight("C3", Q),
        numpy_helper.from_array(np.array([-1, N], dtype=np.int64), "flat_shape"),
    ]
    graph = helper.make_graph(
        nodes, "profile_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T, K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["rows", Q]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", T, T])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _expected_flops(factorised=False):
    first = 2 * B * T * RANK * (K + N) if factorised else 2 * B * T * K * N
    return first + 2 * B * T * N * T + 2 * (B * T) * N * P + 2 * (B * T) * P * Q


def _save(model, folder, name):
    """Save with the weights in an external data file (the shape constant stays inline)."""
    path = folder / f"{name}.onnx"
    onnx.save(model, path, save_as_external_data=True, location=f"{name}.data", size_threshold=64)
    return path


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    original = _save(_model(), folder, "original")
    compressed = _save(_model(factorised=True), folder, "compressed")
    feed = synthetic_feed(_model(), {"x": [B, T, K]})
    return {
        "folder": folder,
        "original_path": original,
        "feed": feed,
        "original": profile_model(original, feed, runs=5, warmup=1),
        "compressed": profile_model(compressed, feed, runs=5, warmup=1),
    }


# --- inputs -----------------------------------------------------------------------------------------------


def test_parse_shape_args_reads_names_and_dims():
    assert parse_shape_args(["x:2,3,4", "ids:1"]) == {"x": [2, 3, 4], "ids": [1]}
    assert parse_shape_args(["scope:x:8"]) == {"scope:x": [8]}  # the name may itself hold a colon
    assert parse_shape_args([]) == {}


@pytest.mark.parametrize("item", ["x", "x:", ":2,3", "x:2,a", "x:2,,3", "x:-1"])
def test_parse_shape_args_rejects_malformed(item):
    with pytest.raises(FwlrError):
        parse_shape_args([item])


def test_parse_shape_args_rejects_repeated_name():
    with pytest.raises(FwlrError, match="more than one"):
        parse_shape_args(["x:1", "x:2"])


def test_symbolic_axes_default_to_one_and_are_named():
    assert synthetic_feed(_model())["x"].shape == (1, T, K)  # as onnxruntime_perf_test does
    filled, defaulted = symbolic_defaults(_model())
    assert filled == {"x": [1, T, K]} and defaulted == ["x[0] 'batch'"]
    filled, defaulted = symbolic_defaults(_model(), {"x": [4, T, K]})
    assert filled == {"x": [4, T, K]} and defaulted == []


def test_synthetic_feed_types_and_shapes():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["o1"]), helper.make_node("Identity", ["mask"], ["o2"]),
         helper.make_node("Identity", ["x"], ["o3"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 3]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 100])],
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in ("o1", "o2", "o3")],
    )
    model = helper.make_model(graph)
    feed = synthetic_feed(model, {"ids": [2, 3]}, seed=1)
    assert feed["ids"].dtype == np.int64 and feed["ids"].shape == (2, 3) and (feed["ids"] == 1).all()
    assert feed["mask"].dtype == np.bool_ and feed["mask"].all()
    assert feed["x"].dtype == np.float16 and feed["x"].shape == (2, 100) and feed["x"].std() > 0.5
    np.testing.assert_array_equal(feed["x"], synthetic_feed(model, {"ids": [2, 3]}, seed=1)["x"])
    with pytest.raises(FwlrError, match="fixes it at 2"):
        synthetic_feed(model, {"ids": [2, 3], "mask": [4, 3]})
    with pytest.raises(FwlrError, match="declares 2"):
        synthetic_feed(model, {"ids": [2, 3, 4]})
    with pytest.raises(FwlrError, match="does not have"):
        synthetic_feed(model, {"ids": [2, 3], "idz": [1]})


def test_shared_synthetic_feed_fills_the_batch_dim_and_draws_from_one_stream():
    specs = data.model_inputs(_model())  # x [batch, T, K]
    assert data.synthetic_feed(specs, None, batch_size=5, seed=0)["x"].shape == (5, T, K)
    rng = np.random.default_rng(0)
    first, second = (data.synthetic_feed(specs, None, 5, rng)["x"] for _ in range(2))
    np.testing.assert_array_equal(first, data.synthetic_feed(specs, None, 5, 0)["x"])
    assert not np.array_equal(first, second)


# --- static counts ----------------------------------------------------------------------------------------


def test_matmul_flops_formula():
    assert matmul_flops("Gemm", [3, 4], [4, 5]) == 2 * 3 * 4 * 5
    assert matmul_flops("Gemm", [4, 3], [5, 4], {"transA": 1, "transB": 1}) == 2 * 3 * 4 * 5
    assert matmul_flops("MatMul", [2, 1, 3, 4], [5, 4, 6]) == 2 * (2 * 5) * 3 * 4 * 6  # broadcast batch dims
    assert matmul_flops("MatMul", [4], [4, 6]) == 2 * 4 * 6  # vector @ matrix


def test_model_parameters_includes_subgraphs_and_quantised_weights():
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.ones((3, 3), np.float32)))],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["e_w"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((2,), np.float32), "e_w")],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["r"], then_branch=then_graph, else_branch=else_graph)], "main",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((4, 5), np.float32), "w"),
         numpy_helper.from_array(np.zeros((3, 7), np.int8), "quantised_w"),
         numpy_helper.from_array(np.zeros((6,), np.int64), "shape_not_a_weight")],
    )
    assert model_parameters(helper.make_model(graph)) == 20 + 9 + 2 + 21


# --- measurements in ONNX Runtime ---------------------------------------------------------------------------


def test_matmul_flops_counted_from_runtime_shapes(profiles):
    assert profiles["original"]["matmul_flops"] == _expected_flops()
    assert profiles["compressed"]["matmul_flops"] == _expected_flops(factorised=True)
    assert profiles["original"]["matmul_nodes"] == 4


def test_latency_fields_positive_and_ordered(profiles):
    result = profiles["original"]
    p50, p90, p95, p99 = (result[f"latency_{p}_percentile"] for p in (50, 90, 95, 99))
    assert 0 < p50 <= p90 <= p95 <= p99
    assert result["average_latency_ms"] > 0
    assert result["QPS"] == pytest.approx(B * 1000.0 / result["average_latency_ms"])
    assert result["providers"] == ["CPUExecutionProvider"]
    assert result["peak_rss_mb"] > 0 and result["rss_growth_mb"] >= 0


def test_size_and_parameters_include_external_data(profiles):
    folder = profiles["folder"]
    result = profiles["original"]
    on_disk = (folder / "original.onnx").stat().st_size + (folder / "original.data").stat().st_size
    assert (folder / "original.data").stat().st_size > 0
    assert result["file_size_bytes"] == on_disk == file_size(folder / "original.onnx")
    assert result["parameters"] == K * N + P * N + P * Q + Q


def test_op_profile_has_matmul_and_gemm(profiles):
    op_profile = profiles["original"]["op_profile"]
    op_types = {row["op_type"] for row in op_profile["op_types"]}
    assert {"MatMul", "Gemm"} <= op_types
    assert sum(row["share"] for row in op_profile["op_types"]) == pytest.approx(1.0)
    times = [row["time_ms"] for row in op_profile["top_nodes"]]
    assert 0 < len(times) <= 10 and times == sorted(times, reverse=True)
    text = format_profile(profiles["original"])
    assert "MatMul" in text and "Gemm" in text and "latency p99" in text


def test_unknown_provider_and_bad_feed_are_user_errors(profiles):
    with pytest.raises(FwlrError, match="CPUExecutionProvider"):
        profile_model(profiles["original_path"], profiles["feed"], providers=("NoSuchExecutionProvider",))
    with pytest.raises(FwlrError, match="lack x"):
        profile_model(profiles["original_path"], {})
    wrong_rank = {"x": np.ones((B, K), np.float32)}
    with pytest.raises(FwlrError, match="ONNX Runtime failed"):
        profile_model(profiles["original_path"], wrong_rank, runs=1, warmup=0, op_profile=False)


def test_parse_ort_profile_skips_warmup_and_averages():
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 90},
        node("a", "MatMul", 1, 80),  # warm-up run, skipped
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},
        node("a", "MatMul", 101, 30), node("b", "Relu", 131, 10),
        {"cat": "Node", "name": "a_fence_before", "ts": 131, "dur": 5, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50},
        node("a", "MatMul", 201, 50), node("b", "Relu", 251, 10),
    ]
    parsed = parse_ort_profile(events, skip_runs=1)
    assert parsed["profiled_runs"] == 2
    assert [(r["op_type"], r["time_ms"]) for r in parsed["op_types"]] == [("MatMul", 0.040), ("Relu", 0.010)]
    assert parsed["op_types"][0]["share"] == pytest.approx(0.8)
    assert parsed["top_nodes"][0]["node"] == "a"


# --- comparison -------------------------------------------------------------------------------------------


def test_comparison_ratios_and_table(profiles):
    a, b = profiles["original"], profiles["compressed"]
    comparison = compare_profiles(a, b)
    assert comparison["matmul_flops"]["ratio"] == pytest.approx(_expected_flops(True) / _expected_flops())
    assert comparison["parameters"]["ratio"] == pytest.approx(b["parameters"] / a["parameters"])
    assert "MatMul" in comparison["op_types"] and "Gemm" in comparison["op_types"]
    text = format_comparison(a, b, names=("before", "after"))
    assert "before" in text and "after" in text and "ratio of the medians" in text
    table = text.split("\n\n")[1].splitlines()
    assert table[0].startswith("metric") and len({len(line) for line in table}) == 1  # right-aligned columns


# --- test data for onnx_test_runner -----------------------------------------------------------------------


def test_save_test_data_round_trips(profiles, tmp_path):
    folder = save_test_data(profiles["original_path"], profiles["feed"], tmp_path)
    assert folder == tmp_path / "test_data_set_0"
    x = onnx.load_tensor(str(folder / "input_0.pb"))
    assert x.name == "x"
    np.testing.assert_array_equal(numpy_helper.to_array(x), profiles["feed"]["x"])
    expected = ort.InferenceSession(str(profiles["original_path"]), providers=["CPUExecutionProvider"]).run(
        None, profiles["feed"]
    )
    names = ["out", "scores"]
    for i, (name, value) in enumerate(zip(names, expected)):
        tensor = onnx.load_tensor(str(folder / f"output_{i}.pb"))
        assert tensor.name == name
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), value)
    assert sorted(p.name for p in folder.iterdir()) == ["input_0.pb", "output_0.pb", "output_1.pb"]


# --- the honest limit: achievable vs measured ratio -------------------------------------------------------


def _kernel_events(node_ms, runs=2):
    """A fake ONNX Runtime profile: one warm-up run, then `runs` runs with each node taking node_ms[name] ms."""
    events, ts = [], 0
    for _ in range(1 + runs):
        events.append({"cat": "Session", "name": "model_run", "ts": ts, "dur": 1})
        for name, (op, ms) in node_ms.items():
            ts += 1
            events.append({"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": ms * 1000,
                           "args": {"op_name": op}})
        ts += 10
    return events


def _fake_result(node_ms, node_flops):
    return {"op_profile": parse_ort_profile(_kernel_events(node_ms), skip_runs=1), "node_flops": node_flops}


def test_achievable_ratio_from_a_parsed_profile():
    # Original: a site of 6 ms (its MatMul, fused with its bias by ORT under its own name) and 4 ms elsewhere.
    original = _fake_result(
        {"l/MatMul/MatMulAddFusion": ("Gemm", 6.0), "l/MatMul_1": ("MatMul", 2.0), "act": ("Relu", 2.0)},
        {"l/MatMul": 1000, "l/MatMul_1": 300},
    )
    compressed = _fake_result(
        {"l/MatMul/factor_A": ("MatMul", 1.0), "l/MatMul/factor_B": ("MatMul", 2.0), "l/MatMul_1": ("MatMul", 2.0),
         "act": ("Relu", 2.5)},
        {"l/MatMul/factor_A": 100, "l/MatMul/factor_B": 150, "l/MatMul_1": 300},
    )
    limits = speed_limits(original, compressed)
    assert [row["node"] for row in limits["sites"]] == ["l/MatMul"]  # l/MatMul_1 is not under l/MatMul
    row = limits["sites"][0]
    assert row["dense_ms"] == pytest.approx(6.0) and row["factored_ms"] == pytest.approx(3.0)
    assert row["flop_ratio"] == pytest.approx(0.25) and row["time_ratio"] == pytest.approx(0.5)
    assert limits["site_share"] == pytest.approx(0.6)
    assert limits["achievable_ratio"] == pytest.approx((4.0 + 6.0 * 0.25) / 10.0)
    assert limits["kernel_ratio"] == pytest.approx(7.5 / 10.0)
    assert limits["other_time_ratio"] == pytest.approx(4.5 / 4.0)
    assert achievable_ratio(10.0, {"a": 6.0, "b": 2.0}, {"a": 0.5, "b": 1.0}) == pytest.approx(0.7)
    text = format_speed(limits, ratio_summary([1.0] * 4, [0.8] * 4))
    assert "achievable latency ratio 0.550" in text and "measured latency ratio 0.800" in text
    assert "warning" not in text  # a steady pair and a site at twice its FLOP share: nothing to doubt


def test_profile_compare_warns_when_the_timings_cannot_be_read_per_site():
    """The newcomer's case: a site at 0.038 of its dense time for a FLOP ratio of 0.125 on a loaded machine."""
    original = _fake_result({"l/MatMul": ("MatMul", 8.0), "act": ("Relu", 2.0)}, {"l/MatMul": 1000})
    compressed = _fake_result({"l/MatMul/factor_A": ("MatMul", 0.1), "l/MatMul/factor_B": ("MatMul", 0.204),
                               "act": ("Relu", 2.0)}, {"l/MatMul/factor_A": 50, "l/MatMul/factor_B": 75})
    limits = speed_limits(original, compressed)
    assert limits["sites"][0]["time_ratio"] == pytest.approx(0.038) and limits["sites"][0]["flop_ratio"] == 0.125
    steady = format_speed(limits, ratio_summary([1.0] * 10, [0.3] * 10))
    assert "0.038 *" in steady and "not a speed-up" in steady and "spread" not in steady
    loaded = format_speed(limits, ratio_summary([1.0] * 10, [0.2, 0.25, 0.3, 0.3, 0.3, 0.3, 0.35, 0.4, 0.5, 0.6]))
    assert "per-site ratios are unreliable" in loaded


def test_a_node_belongs_to_the_longest_site_it_is_named_under():
    sites = sorted(["a/MatMul", "a/MatMul/x"], key=len, reverse=True)
    assert owner("a/MatMul/x/factor_A", sites) == "a/MatMul/x"
    assert owner("a/MatMul/factor_B", sites) == "a/MatMul"
    assert owner("a/MatMul_1", sites) is None
    assert factorised_sites({"a": 1, "ab": 1, "c": 1}, {"a/factor_A": 1, "a/factor_B": 1, "ab": 1, "c": 1}) == ["a"]


def test_an_int8_inputs_sites_match_their_requantized_factors():
    # quantize_dynamic names the int8 MatMul `<node>_quant`; compress requantizes its factors `<node>/factor_A_quant`
    original = {"l0/MatMul_quant": 1, "l1/MatMul_quant": 1}
    compressed = {"l0/MatMul/factor_A_quant": 1, "l0/MatMul/factor_B_quant": 1, "l1/MatMul_quant": 1}
    assert factorised_sites(original, compressed) == ["l0/MatMul_quant"]
    sites = ["l0/MatMul_quant", "l1/MatMul_quant"]
    assert owner("l0/MatMul/factor_B_quant", sites) == "l0/MatMul_quant"
    assert owner("l0/MatMul_quant", sites) == "l0/MatMul_quant" and owner("l0/MatMul_1", sites) is None


def test_measured_ratio_headline_is_the_median_of_pairs():
    a = [0.010] * 9 + [0.010]
    b = [0.005] * 9 + [0.300]  # one run of the second model hit by load
    summary = ratio_summary(a, b)
    assert summary["ratio_p50"] == pytest.approx(0.5) and summary["ratio_mean"] > 3
    assert summary["ratio_p10"] <= summary["ratio_p50"] <= summary["ratio_p90"]
    text = format_comparison(_latency_only(10.0, 10.0), _latency_only(5.0, 40.0), paired=summary)
    headline = next(line for line in text.splitlines() if line.startswith("latency ratio"))
    assert "0.500x (median of 10 alternating pairs" in headline
    text = format_comparison(_latency_only(10.0, 10.0), _latency_only(5.0, 40.0))
    headline = next(line for line in text.splitlines() if line.startswith("latency ratio"))
    assert "0.500x (ratio of the medians)" in headline and "4.000x" not in headline


def _latency_only(p50, mean):
    """A profile_model-shaped result whose median and mean latency differ."""
    result = {key: 1.0 for _, key, _ in METRICS}
    result.update(latency_50_percentile=p50, average_latency_ms=mean, model="m.onnx", batch_size=1, runs=10,
                  warmup=1, threads=1, providers=["CPUExecutionProvider"], peak_rss_mb=1.0, rss_growth_mb=1.0)
    return result


def test_speed_limits_on_the_profiled_pair(profiles):
    limits = speed_limits(profiles["original"], profiles["compressed"])
    assert [row["node"] for row in limits["sites"]] == ["mm1"]
    row = limits["sites"][0]
    assert row["flop_ratio"] == pytest.approx(RANK * (K + N) / (K * N))
    assert row["dense_ms"] > 0 and row["factored_ms"] > 0
    assert 0 < limits["achievable_ratio"] < 1
    paired = paired_ratio(profiles["original_path"], profiles["folder"] / "compressed.onnx", profiles["feed"], runs=6,
                          warmup=1, threads=1)
    assert paired["pairs"] == 6 and paired["ratio_p10"] <= paired["ratio_p50"] <= paired["ratio_p90"]


# --- LSTM/GRU FLOPs ---------------------------------------------------------------------------------------

S, BATCH, IN, H = 5, 3, 6, 4


def test_recurrent_flops_count_input_and_recurrent_parts():
    assert recurrent_flops("LSTM", [S, BATCH, IN], [1, 4 * H, IN], [1, 4 * H, H]) == 2 * S * BATCH * 4 * H * (IN + H)
    assert recurrent_flops("LSTM", [BATCH, S, IN], [2, 4 * H, IN], [2, 4 * H, H], {"layout": 1}) == (
        2 * 2 * S * BATCH * 4 * H * (IN + H))
    assert recurrent_flops("GRU", [S, BATCH, IN], [1, 3 * H, IN], [1, 3 * H, H]) == 2 * S * BATCH * 3 * H * (IN + H)
    assert recurrent_flops("RNN", [S, BATCH, IN], [1, H, IN], [1, H, H]) == 2 * S * BATCH * H * (IN + H)


def _lstm_model(rank=None):
    """x [S, batch, IN] -> LSTM (hidden H); with a rank, x @ P [IN, r] feeds an LSTM whose W is [1, 4H, r]."""
    rng = np.random.default_rng(0)
    width = IN if rank is None else rank
    nodes, weights = [], []
    source = "x"
    if rank is not None:
        nodes.append(helper.make_node("MatMul", ["x", "P"], ["xp"], name="lstm/input_projection"))
        weights.append(numpy_helper.from_array(rng.standard_normal((IN, rank)).astype(np.float32), "P"))
        source = "xp"
    nodes.append(helper.make_node("LSTM", [source, "W", "R"], ["y"], name="lstm", hidden_size=H))
    weights += [numpy_helper.from_array(rng.standard_normal((1, 4 * H, width)).astype(np.float32), "W"),
                numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "R")]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "b", IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_lstm_flops_measured_from_runtime_shapes(tmp_path):
    feed = {"x": np.ones((S, BATCH, IN), np.float32)}
    flops = {}
    for name, rank in (("dense", None), ("factored", 2)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(_lstm_model(rank), path)
        flops[name], nested = measure_node_flops(path, _lstm_model(rank), feed, ("CPUExecutionProvider",))
        assert nested == 0
    assert flops["dense"] == {"lstm": 2 * S * BATCH * 4 * H * (IN + H)}
    assert flops["factored"] == {"lstm/input_projection": 2 * S * BATCH * IN * 2,
                                 "lstm": 2 * S * BATCH * 4 * H * (2 + H)}
    assert factorised_sites(flops["dense"], flops["factored"]) == ["lstm"]


def test_cli_profile_compare_defaults_symbolic_axes_and_reports_the_limit(profiles, tmp_path, capsys):
    from onnx_fwlr.cli.main import main

    report = tmp_path / "p.json"
    code = main(["profile", str(profiles["original_path"]), "--compare", str(profiles["folder"] / "compressed.onnx"),
                 "--runs", "4", "--warmup", "1", "--threads", "1", "--json", str(report)])
    text = capsys.readouterr().out
    assert code == 0
    assert "symbolic axes set to 1: x[0] 'batch'" in text  # no --shape needed
    assert "achievable latency ratio" in text and "median of 4 alternating pairs" in text
    data = json.loads(report.read_text())
    assert data["paired"]["pairs"] == 4 and [row["node"] for row in data["limits"]["sites"]] == ["mm1"]


def test_the_median_upper_bound_holds_a_claim_only_where_the_noise_allows():
    from onnx_fwlr.cost.limits import median_upper_bound

    ratios = np.linspace(0.9, 1.1, 101)  # median 1.0
    upper = median_upper_bound(ratios)
    assert 1.0 < upper < 1.02  # rank 50.5 + 1.645 * sqrt(101) / 2 = 58.8 -> the 59th value, 1.016
    assert upper == pytest.approx(ratios[58])
    assert median_upper_bound(ratios[::10]) > upper  # fewer pairs, a wider bound
    assert median_upper_bound([1.0] * 7) == 1.0 and median_upper_bound([2.0]) == 2.0
    assert ratio_summary([1.0] * 101, ratios)["ratio_p50_upper"] == pytest.approx(upper)
