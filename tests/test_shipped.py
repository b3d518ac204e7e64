"""Shipped (already-quantized) models (issue 30): budgets count the input's bytes, every site may stay as the
input stored it, factors are written back quantized and packed, a weight read by several nodes is one site,
an unreachable budget is refused before any statistics, and a finished compression is judged on the outputs
that can be compared (the others are named, not an error)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from builders import make_model, run, vinfo
from onnx import TensorProto, helper, numpy_helper
from shipped_builder import FORMATS, data, float_mlp, quantized, shared_layers

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import file_size


def _cli(*args) -> int:
    from onnx_fwlr.cli.main import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Each format of the same MLP on disk, with calibration and validation data."""
    folder = tmp_path_factory.mktemp("shipped")
    calibration, validation = data(256, seed=0), data(128, seed=1)
    np.savez(folder / "calib.npz", x=calibration)
    np.savez(folder / "val.npz", x=validation)
    paths = {}
    for fmt in FORMATS:
        paths[fmt] = folder / f"{fmt}.onnx"
        onnx.save(quantized(float_mlp(), fmt, folder, calibration), paths[fmt])
    return folder, paths


BUDGETS = {"plain": ("--ratio", 0.5), "auto": ("--quantize", "auto", "--ratio", 0.5)}


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_half_of_a_quantized_input_is_half_its_bytes(shipped, fmt, budget, tmp_path, capsys):
    """--ratio 0.5 of an int8 model (any format) writes at most 0.55 of its bytes, with the fidelity reported."""
    folder, paths = shipped
    out = tmp_path / "out.onnx"
    code = _cli("compress", paths[fmt], "-o", out, *BUDGETS[budget], "--calib", folder / "calib.npz",
                "--val", folder / "val.npz", "--min-cosine", 0.95, "--quiet", "--no-ort-comparison",
                "--no-latency-check")
    text = capsys.readouterr().out
    assert code == 0, text
    assert file_size(out) <= 0.55 * file_size(paths[fmt])
    assert "cos mean" in text and "PASS" in text
    assert re.search(r"^  fc\d: .*\d -> [\d,]+ bytes", text, re.M)  # each site's bytes before and after
    result = onnx.load(out)
    floats = [t.name for t in result.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
              and min(t.dims) > 1 and "scale" not in t.name]
    assert floats == []  # every factor went back to an integer form (--quantize auto: fp16 factors behind Cast)


@pytest.mark.parametrize("fmt", ["dynamic", "cast_mul"])
def test_no_budget_writes_more_bytes_than_the_input(shipped, fmt, tmp_path, capsys):
    """At the input's own bytes, each site's options include the weight exactly as the input stored it."""
    folder, paths = shipped
    out = tmp_path / "out.onnx"
    code = _cli("compress", paths[fmt], "-o", out, "--quantize", "auto", "--ratio", 1.0, "--calib",
                folder / "calib.npz", "--quiet", "--no-latency-check")
    text = capsys.readouterr().out
    assert code == 0
    assert file_size(out) <= file_size(paths[fmt])
    assert "as the input stored it" in text


def test_requantized_integers_are_packed_bytes(shipped):
    """Cast+Mul and QDQ weights are written one byte per int8 (raw data), not one varint per element."""
    from onnx_fwlr.pipeline.quantized_input import dequantize_input
    from onnx_fwlr.quant.requantize import requantize

    _, paths = shipped
    for fmt in ("cast_mul", "qdq"):
        source = dequantize_input(str(paths[fmt]))
        again = requantize(source.float_model, source.dequantized.sites)
        integers = [t for t in again.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
        assert integers and all(len(t.raw_data) == t.dims[0] * t.dims[1] for t in integers)
        assert all(t.ByteSize() < 1.01 * t.dims[0] * t.dims[1] + 100 for t in integers)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = tmp_path_factory.mktemp("shared")
    onnx.save(shared_layers(), folder / "float.onnx")
    quantize_dynamic(folder / "float.onnx", folder / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8)
    np.savez(folder / "calib.npz", x=data(128, 768, seed=0))
    np.savez(folder / "val.npz", x=data(64, 768, seed=1))
    return folder


def test_a_weight_read_by_twelve_nodes_is_one_site(shared):
    """Twelve MatMulInteger nodes on one int8 weight: one float initializer, one site with twelve uses."""
    from onnx_fwlr.pipeline.quantized_input import dequantize_input
    from onnx_fwlr.sites.find import find_sites

    source = dequantize_input(str(shared / "int8.onnx"))
    sites = {s.name: s for s in find_sites(source.float_model)[0]}
    assert sorted(sites) == ["head", "layer0"] and len(sites["layer0"].uses) == 12
    assert len(source.float_model.graph.initializer) == 2


def test_a_shared_weight_is_factorised_once_and_counted_once(shared, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = _cli("compress", shared / "int8.onnx", "-o", out, "--ratio", 0.5, "--calib", shared / "calib.npz",
                "--val", shared / "val.npz", "--min-cosine", 0.95, "--quiet", "--no-ort-comparison",
                "--no-latency-check")
    text = capsys.readouterr().out
    assert code == 0, text
    rows = [line.split() for line in text.splitlines() if line.startswith(("layer", "head"))]
    assert [r[0] for r in rows] == ["layer0", "head"]
    assert "638,976" in next(line for line in text.splitlines() if line.startswith("factorised weights"))
    result = onnx.load(out)
    factors = [t.name for t in result.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert sorted(factors) == ["W_head_quantized", "W_shared/factor_A_quantized", "W_shared/factor_B_quantized"]
    assert file_size(out) <= 0.55 * file_size(shared / "int8.onnx")


def test_an_unreachable_byte_budget_is_refused_before_any_statistics(shipped, monkeypatch):
    """Both paths say the target is out of reach from the sites' shapes, before calibrating."""
    from onnx_fwlr.pipeline import compress as float_path
    from onnx_fwlr.pipeline import quantized as quantized_path
    from onnx_fwlr.pipeline.quantized_input import dequantize_input

    def no_statistics(*args, **kwargs):
        raise AssertionError("statistics were gathered")

    monkeypatch.setattr(quantized_path, "prepare", no_statistics)
    monkeypatch.setattr(float_path, "prepare", no_statistics)
    folder, paths = shipped
    source = dequantize_input(str(paths["dynamic"]))
    with pytest.raises(FwlrError, match="below the smallest model"):
        quantized_path.compress_quantized(source.float_model, quantize="auto", target_size=20_000,
                                          calibration=str(folder / "calib.npz"), source=source)
    with pytest.raises(FwlrError, match="too small"):
        float_path.compress(str(paths["dynamic"]), target_size=3_000, calibration=str(folder / "calib.npz"))


def _durations_model(scale: float = 1.0) -> onnx.ModelProto:
    """A TTS-like model: features y [n, 16] and audio whose length is the rounded sum of predicted durations
    (so it changes when the duration weights change)."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((16, 16)) * scale).astype(np.float32)
    d = np.abs(rng.standard_normal((16, 1))).astype(np.float32) * 5
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(d, "Wd"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64),
                                                                                              "one")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="features"),
             helper.make_node("MatMul", ["y", "Wd"], ["dur"], name="durations"),
             helper.make_node("Abs", ["dur"], ["dur_abs"]),
             helper.make_node("ReduceSum", ["dur_abs"], ["total"], keepdims=0),
             helper.make_node("Round", ["total"], ["total_r"]),
             helper.make_node("Cast", ["total_r"], ["length"], to=TensorProto.INT64),
             helper.make_node("Range", ["zero", "length", "one"], ["steps"]),
             helper.make_node("Cast", ["steps"], ["audio"], to=TensorProto.FLOAT)]
    return make_model(nodes, [vinfo("x", ["n", 16])], [vinfo("y", ["n", 16]), vinfo("audio", ["T"])], inits)


def test_an_output_whose_length_changes_is_set_aside_and_the_model_is_written(tmp_path, capsys):
    """The audio length moves with the compressed durations: compress still writes the model, judges the
    features and names the output it could not compare; with --common-prefix the 1-D audio is compared too."""
    model = _durations_model()
    onnx.save(model, tmp_path / "tts.onnx")
    np.savez(tmp_path / "val.npz", x=data(40, 16, seed=3))
    out = tmp_path / "out.onnx"
    code = _cli("compress", tmp_path / "tts.onnx", "-o", out, "--rank", 2, "--val", tmp_path / "val.npz", "--quiet",
                "--no-ort-comparison")
    text = capsys.readouterr().out
    assert out.exists() and code == 0
    feed = {"x": data(40, 16, seed=3)}
    assert run(model, feed)[1].shape != run(onnx.load(out), feed)[1].shape  # the length did change
    assert "not judged: output 'audio'" in text and "covers y only" in text
    out.unlink()
    code = _cli("compress", tmp_path / "tts.onnx", "-o", out, "--rank", 2, "--val", tmp_path / "val.npz", "--quiet",
                "--no-ort-comparison", "--common-prefix")
    text = capsys.readouterr().out
    assert code == 0 and "compared over the common prefix only" in text and "audio" in text
    assert "not judged" not in text


def _int8_conv_model() -> onnx.ModelProto:
    """A Conv whose kernel is stored as int8 through Mul(Cast(q), scale), then a MatMul head."""
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, (32, 16, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(q, "kernel_q"), numpy_helper.from_array(np.float32(0.01), "kernel_s"),
             numpy_helper.from_array(rng.standard_normal((32, 10)).astype(np.float32), "head")]
    nodes = [helper.make_node("Cast", ["kernel_q"], ["kernel_c"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["kernel_c", "kernel_s"], ["kernel"], name="kernel_dequantize"),
             helper.make_node("Conv", ["x", "kernel"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "head"], ["y"], name="classifier")]
    return make_model(nodes, [vinfo("x", ["n", 16, 8, 8])], [vinfo("y", ["n", 10])], inits)


def test_inspect_lists_every_weight_it_leaves_alone_and_counts_quantized_sites(tmp_path, capsys):
    """Recurrent weights of a DynamicQuantizeLSTM and an int8 Conv kernel are named with their reason, and the
    headline counts the quantized weights compress works on."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from shipped_builder import lstm_tagger

    from onnx_fwlr.workflows.listing import inspect_model

    onnx.save(lstm_tagger(), tmp_path / "lstm.onnx")
    quantize_dynamic(tmp_path / "lstm.onnx", tmp_path / "lstm_int8.onnx", per_channel=True,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])
    text = inspect_model(str(tmp_path / "lstm_int8.onnx")).format()
    assert text.splitlines()[2].startswith("2 factorisable site(s): 2 quantized weight(s)")
    kept = text.split("weights left as they are:")[1]
    assert "R_quantized" in kept and "recurrent weight R of DynamicQuantizeLSTM" in kept
    conv = inspect_model(_int8_conv_model())
    assert [(s.weight, s.op_type) for s in conv.left_alone] == [("kernel_q", "Conv")]
    assert "stored as integers (Cast+Mul); a convolution kernel" in conv.left_alone[0].reason
    assert "4,608 numbers" in conv.left_alone[0].reason


def test_compress_names_the_weights_it_keeps_as_the_input_stored_them(tmp_path, capsys):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from shipped_builder import lstm_tagger

    onnx.save(lstm_tagger(), tmp_path / "lstm.onnx")
    quantize_dynamic(tmp_path / "lstm.onnx", tmp_path / "lstm_int8.onnx", per_channel=True,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM", "MatMul"])
    code = _cli("compress", tmp_path / "lstm_int8.onnx", "-o", tmp_path / "out.onnx", "--rank", 8, "--quiet")
    text = capsys.readouterr().out
    assert code == 0
    assert "1 weight(s) of the input are kept as it stored them, not factorised: R_quantized (DynamicQuantizeLSTM)" \
        in text


class _FakeLatency:
    """model_ratio as cost.latency.MeasuredLatency returns it, without timing anything."""

    def __init__(self, ratio: float):
        self.ratio, self.feeds = ratio, []

    def model_ratio(self, original, compressed, feed, runs: int = 20) -> dict:
        self.feeds.append({k: v.shape for k, v in feed.items()})
        return {"ratio_p50": self.ratio, "ratio_p10": self.ratio - 0.05, "ratio_p90": self.ratio + 0.05, "pairs": 20}


@pytest.mark.parametrize("ratio, words", [(0.8, "not slower than the input"), (1.2, "slower than the input here")])
def test_the_output_is_timed_against_the_quantized_input_at_the_data_rows(shipped, ratio, words):
    from onnx_fwlr.pipeline.compress import compress

    folder, paths = shipped
    latency = _FakeLatency(ratio)
    _, report = compress(str(paths["dynamic"]), ratio=0.5, calibration=str(folder / "calib.npz"), batch_size=16,
                         latency=latency, latency_check=True, progress=False)
    assert latency.feeds == [{"x": (16, 256)}]
    line = next(w for w in report.warnings if w.startswith("latency:"))
    assert f"{ratio:.2f}x the quantized input's" in line and line.endswith(words) and "x 16x256" in line
    assert report.budget["input_latency"]["ratio_p50"] == ratio


def _conv_only(folder) -> tuple:
    rng = np.random.default_rng(0)
    kernel = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "kernel")
    nodes = [helper.make_node("Conv", ["x", "kernel"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    onnx.save(make_model(nodes, [vinfo("x", ["n", 16, 8, 8])], [vinfo("y", ["n", 32, 8, 8])], [kernel]),
              folder / "conv.onnx")
    np.savez(folder / "calib.npz", x=rng.standard_normal((8, 16, 8, 8)).astype(np.float32))
    return folder / "conv.onnx", folder / "calib.npz"


@pytest.mark.parametrize("flags", [("--ratio", 0.5), ("--quantize", "auto", "--ratio", 0.5), ("--quantize", "int4"),
                                   ("--quantize", "auto", "--target-size", 1000),
                                   ("--quantize", "auto", "--method", "whiten", "--ratio", 0.5)])
def test_a_model_with_nothing_to_do_says_so_under_every_budget(flags, tmp_path, capsys):
    model, calibration = _conv_only(tmp_path)
    code = _cli("compress", model, "-o", tmp_path / "out.onnx", "--calib", calibration, "--quiet", *flags)
    text = capsys.readouterr().out
    assert code == 0 and "nothing to do" in text and not (tmp_path / "out.onnx").exists()
    assert "raise" not in text and "below the smallest" not in text


def test_quantize_budget_with_activation_statistics_when_gradients_are_not_used(shipped):
    """whiten (activations only) spends a byte budget too, comparing sites by output error, and says so."""
    from onnx_fwlr.pipeline.quantized import compress_quantized
    from onnx_fwlr.pipeline.quantized_input import dequantize_input

    folder, paths = shipped
    source = dequantize_input(str(paths["dynamic"]))
    model, report = compress_quantized(source.float_model, quantize="auto", ratio=0.5, method="whiten",
                                       calibration=str(folder / "calib.npz"), source=source, progress=False)
    assert model.ByteSize() <= 0.5 * source.input_bytes
    assert report.method == "whiten" and any("by their output error, not by the loss" in w for w in report.warnings)


def _recognizer(W: np.ndarray) -> onnx.ModelProto:
    """x [n, T, 8] -> MatMul -> per-step class scores [n, T, 6] (class 0: the CTC blank)."""
    return make_model([helper.make_node("MatMul", ["x", "W"], ["logits"], name="classifier")],
                      [vinfo("x", ["n", "T", 8])], [vinfo("logits", ["n", "T", 6])],
                      [numpy_helper.from_array(W.astype(np.float32), "W")])


def test_sequence_outputs_are_judged_per_step_and_as_decoded_sequences(tmp_path, capsys):
    from onnx_fwlr.evaluate.validation import compare_models

    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 6))
    W2 = W + rng.standard_normal((8, 6)) * 0.1
    x = rng.standard_normal((20, 12, 8)).astype(np.float32)
    v = compare_models(_recognizer(W), _recognizer(W2), [{"x": x[:7]}, {"x": x[7:]}], progress=False)
    a, b = np.argmax(x @ W, -1), np.argmax(x.astype(np.float64) @ W2, -1)

    def decode(ids):
        collapsed = [int(i) for j, i in enumerate(ids) if j == 0 or i != ids[j - 1]]
        return [i for i in collapsed if i != 0]

    same = sum(decode(p) == decode(q) for p, q in zip(a, b))
    sequence = v.outputs[0].sequence
    assert sequence["step_top1_agreement"] == pytest.approx(np.mean(a == b))
    assert sequence["decoded_same"] == same and sequence["samples"] == 20 and 0 < same < 20
    onnx.save(_recognizer(W), tmp_path / "a.onnx")
    onnx.save(_recognizer(W2), tmp_path / "b.onnx")
    np.savez(tmp_path / "data.npz", x=x)
    assert _cli("validate", tmp_path / "a.onnx", tmp_path / "b.onnx", "--data", tmp_path / "data.npz") == 0
    assert f"greedy/CTC-decoded sequences identical for {same}/20 samples" in capsys.readouterr().out


@pytest.mark.parametrize("qtype, values", [(TensorProto.INT8, [-128, -1, 0, 127]), (TensorProto.UINT8, [0, 255, 7]),
                                           (TensorProto.INT4, [-8, -1, 0, 7, 3]), (TensorProto.UINT4, [0, 15, 9])])
def test_packed_integers_round_trip_at_their_bit_width(qtype, values):
    from onnx_fwlr.quant.requantize import packed_integers

    tensor = packed_integers(np.array(values), qtype, "q")
    bits = 4 if qtype in (TensorProto.INT4, TensorProto.UINT4) else 8
    assert tensor.data_type == qtype and len(tensor.raw_data) == -(-len(values) * bits // 8)
    assert numpy_helper.to_array(tensor).astype(np.int64).tolist() == values


def _states_model(W: np.ndarray) -> onnx.ModelProto:
    """x [n, 8] -> MatMul -> states [2, n, 4] (two 'layers' of the same state): the sample axis is 1."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="cell"),
             helper.make_node("Unsqueeze", ["h", "zero"], ["h0"], name="layer_axis"),
             helper.make_node("Concat", ["h0", "h0"], ["states"], name="layers", axis=0)]
    inits = [numpy_helper.from_array(W.astype(np.float32), "W"), numpy_helper.from_array(np.array([0]), "zero")]
    return make_model(nodes, [vinfo("x", ["n", 8])], [vinfo("states", [2, "n", 4])], inits)


def test_outputs_whose_sample_axis_is_not_0_are_compared_per_sample(tmp_path, capsys):
    """[layers, batch, H]: found from the symbolic 'n', the min cosine is the worst sample's (not a layer's)."""
    from onnx_fwlr.evaluate.validation import compare_models

    rng = np.random.default_rng(6)
    W, x = rng.standard_normal((8, 4)), rng.standard_normal((10, 8)).astype(np.float32)
    W2 = W + rng.standard_normal((8, 4)) * 0.3
    v = compare_models(_states_model(W), _states_model(W2), [{"x": x}], progress=False)
    a, b = x @ W, x.astype(np.float64) @ W2
    per_sample = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert v.outputs[0].min_cosine == pytest.approx(per_sample.min(), abs=1e-5)
    assert v.outputs[0].mean_cosine == pytest.approx(per_sample.mean(), abs=1e-5)
    onnx.save(_states_model(W), tmp_path / "a.onnx")
    onnx.save(_states_model(W2), tmp_path / "b.onnx")
    np.savez(tmp_path / "data.npz", x=x)
    assert _cli("validate", tmp_path / "a.onnx", tmp_path / "b.onnx", "--data", tmp_path / "data.npz",
                "--batch-axis", "states:0", "--json", tmp_path / "v.json") == 0  # the user's word wins: per layer
    import json

    assert json.loads((tmp_path / "v.json").read_text())["outputs"][0]["min_cosine"] == pytest.approx(
        min(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b), 1.0), abs=1e-5)
    assert _cli("validate", tmp_path / "a.onnx", tmp_path / "b.onnx", "--data", tmp_path / "data.npz",
                "--batch-axis", "states") == 2
    assert "is not OUTPUT:AXIS" in capsys.readouterr().err


def test_a_dynamic_quantize_lstm_model_where_its_sites_allow(tmp_path, capsys):
    """DynamicQuantizeLSTM + MatMulInteger: the recurrent weight R (over half the bytes) stays as stored, so
    --ratio 0.5 is out of reach (said before any statistics), 0.8 is met within a few %, and --quantize auto,
    which keeps LSTM weights as they are, refuses 0.8 with the smallest size it can reach."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from shipped_builder import lstm_tagger

    onnx.save(lstm_tagger(), tmp_path / "lstm.onnx")
    quantize_dynamic(tmp_path / "lstm.onnx", tmp_path / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["LSTM", "MatMul"])
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((12, 32, 64)).astype(np.float32))
    common = ("--calib", tmp_path / "calib.npz", "--quiet", "--no-latency-check", "--force")
    out = tmp_path / "out.onnx"
    assert _cli("compress", tmp_path / "int8.onnx", "-o", out, "--ratio", 0.5, *common) == 2
    assert "too small" in capsys.readouterr().err and not out.exists()
    assert _cli("compress", tmp_path / "int8.onnx", "-o", out, "--ratio", 0.8, *common) == 0
    assert file_size(out) <= 0.85 * file_size(tmp_path / "int8.onnx")
    out.unlink()
    assert _cli("compress", tmp_path / "int8.onnx", "-o", out, "--quantize", "auto", "--ratio", 0.8, *common) == 2
    err = capsys.readouterr().err
    assert "below the smallest model" in err and err.count("\n") == 1 and not out.exists()


def test_a_weight_no_quantizer_can_write_back_is_kept_as_the_input_has_it():
    """Blocked int8 QDQ weights (ONNX Runtime writes blocked QDQ at 4 bits only) are not dequantized: the
    site stays exactly as stored, with the reason, instead of failing after the work."""
    from onnx_fwlr.quant.dequantize import dequantize_model
    from onnx_fwlr.workflows.listing import inspect_model

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (64, 16)).astype(np.int8), "w_q"),
             numpy_helper.from_array((rng.random((2, 16)) * 0.01 + 0.001).astype(np.float32), "w_s")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="w_dq", axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    model = make_model(nodes, [vinfo("x", ["n", 64])], [vinfo("y", ["n", 16])], inits, opset=21, ir_version=10)
    recovered = dequantize_model(model)
    assert recovered.sites == [] and recovered.model is model
    assert [s.node for s in recovered.left] == ["w_dq"] and "4 bits only" in recovered.left[0].reason
    text = inspect_model(model).format()
    assert "kept as the input has it: ONNX Runtime writes blocked QDQ weights at 4 bits only" in text


def test_inputs_whose_sample_axis_is_not_0_are_split_along_it(tmp_path, capsys):
    """x [n, 8] beside an initial state h [2, n, 4] (symbolic 'n' on axis 1): one .npz holds both, each batch
    cuts h along axis 1, and compress and validate run on it."""
    from onnx_fwlr.io.data import open_data

    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([0]), "layers")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="fc"),
             helper.make_node("MatMul", ["a", "W2"], ["b"], name="fc2"),
             helper.make_node("ReduceSum", ["h", "layers"], ["h_sum"], name="state", keepdims=0),
             helper.make_node("Add", ["b", "h_sum"], ["y"], name="join")]
    model = make_model(nodes, [vinfo("x", ["n", 8]), vinfo("h", [2, "n", 4])], [vinfo("y", ["n", 4])], inits,
                       opset=18)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=data(20, 8, seed=1), h=rng.standard_normal((2, 20, 4)).astype(np.float32))
    shapes = [(f["x"].shape, f["h"].shape) for f, _ in open_data(str(tmp_path / "d.npz"), model, batch_size=8)]
    assert shapes == [((8, 8), (2, 8, 4)), ((8, 8), (2, 8, 4)), ((4, 8), (2, 4, 4))]
    assert _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--rank", 2, "--calib",
                tmp_path / "d.npz", "--val", tmp_path / "d.npz", "--batch-size", 8, "--quiet",
                "--no-ort-comparison") == 0
    assert "Compared 20 samples in 3 batches" in capsys.readouterr().out
