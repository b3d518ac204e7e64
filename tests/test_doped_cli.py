"""Doped and Kronecker structures through the CLI and the public API; LSTM input weights via `compress`."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, rel_error, run, vinfo
from onnx import TensorProto, helper, numpy_helper

import onnx_fwlr
from onnx_fwlr.cli.main import main

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MLP = SAMPLES / "digits_mlp.onnx"


def compress_cli(tmp_path, *args):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["compress", str(MLP), "-o", str(out), "--quiet", "--force", "--json", str(report), *args])
    return code, out, json.loads(report.read_text()) if code == 0 else None


def stored_numbers(model: onnx.ModelProto, weight: str) -> int:
    """Float entries (factors, doping values) and int32 doping indices stored for one weight's structure.

    The int64 initializers under the same prefix are Reshape/Slice shape constants, not parameters.
    """
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith(weight + "/") and t.data_type in (TensorProto.FLOAT, TensorProto.INT32):
            total += int(np.prod(t.dims))
    return total


@pytest.mark.parametrize("args", [
    ["--method", "kron", "--ratio", "0.3"],
    ["--method", "whiten", "--dope", "0.01", "--ratio", "0.3", "--calib", str(SAMPLES / "digits_calib.npz")],
    ["--methods", "whiten,kron", "--dope", "0.01", "--ratio", "0.3", "--calib", str(SAMPLES / "digits_calib.npz")],
])
def test_cli_structures_run_and_count_honestly(tmp_path, args):
    code, out, report = compress_cli(tmp_path, *args)
    assert code == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    factorised = [s for s in report["sites"] if s["rank"] is not None]
    assert factorised, report["sites"]
    for site in factorised:
        assert site["params_after"] == stored_numbers(model, site["weight"]) < site["params_before"]
        assert site["weight"] not in {t.name for t in model.graph.initializer}
        assert site["note"].startswith(("kron", "low rank"))
    if "--dope" in args:
        assert all("doped" in s["note"] for s in factorised)
        assert any(t.data_type == TensorProto.INT32 for t in model.graph.initializer)  # indices are stored, counted
    x = np.load(SAMPLES / "digits_test.npz")["input"][:7]
    reference = ort.InferenceSession(str(MLP)).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    assert got.shape == reference.shape == (7, 10) and np.all(np.isfinite(got))
    assert rel_error(reference, got) < 1.0  # an approximation of the original, not garbage


def test_doping_improves_on_the_rank_it_keeps(tmp_path):
    """Doping takes budget from the rank; at the rank it keeps, adding D lowers the whitened error."""
    calib = str(SAMPLES / "digits_calib.npz")
    _, _, doped = compress_cli(tmp_path, "--method", "whiten", "--dope", "0.01", "--ratio", "0.3", "--calib", calib,
                               "--include", "fc2")
    (d,) = doped["sites"]
    _, _, plain = compress_cli(tmp_path, "--method", "whiten", "--rank", str(d["rank"]), "--calib", calib,
                               "--include", "fc2")
    (p,) = plain["sites"]
    assert p["rank"] == d["rank"] and d["params_after"] == p["params_after"] + 3 * round(0.01 * 256 * 256)
    assert d["weighted_error"] < p["weighted_error"]


@pytest.mark.parametrize("shape,mention", [("3x5,4x4", "does not factor"), ("8x8;16x16", "m1xm2,n1xn2")])
def test_bad_kron_shape_is_one_sentence(tmp_path, capsys, shape, mention):
    code, _, _ = compress_cli(tmp_path, "--method", "kron", "--ratio", "0.3", "--kron-shape", shape)
    err = capsys.readouterr().err.strip()
    assert code == 2 and mention in err and len(err.splitlines()) == 1 and err.replace("e.g. ", "").count(". ") == 0


def test_kron_shape_is_used(tmp_path):
    code, out, report = compress_cli(tmp_path, "--method", "kron", "--ratio", "0.3", "--kron-shape", "16x16,32x8",
                                     "--include", "fc2")
    assert code == 0
    (site,) = report["sites"]
    assert "(16x32 ⊗ 16x8)" in site["note"]


# ------------------------------------------------------------------------------------ LSTM via compress

SEQ, BATCH, INPUT, HIDDEN, RANK = 6, 3, 16, 8, 5


def lstm_model(direction="forward"):
    """x [seq, batch, 16] -> LSTM whose input weight [dirs, 32, 16] has rank 5 -> y, y_h, y_c."""
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    M = rng.normal(size=(INPUT, RANK)) @ rng.normal(size=(RANK, dirs * 4 * HIDDEN)) / 3  # stacked [K, N] view
    W = M.reshape(INPUT, dirs, 4 * HIDDEN).transpose(1, 2, 0)
    inits = [numpy_helper.from_array(W.astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.4, (dirs, 4 * HIDDEN, HIDDEN)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(0, 0.3, (dirs, 8 * HIDDEN)).astype(np.float32), "B")]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "y_h", "y_c"], name="lstm", hidden_size=HIDDEN,
                            direction=direction)
    state = [dirs, BATCH, HIDDEN]
    return make_model([node], [vinfo("x", [SEQ, BATCH, INPUT])],
                      [vinfo("y", [SEQ, dirs, BATCH, HIDDEN]), vinfo("y_h", state), vinfo("y_c", state)], inits)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_compresses_through_the_public_api_at_full_rank(direction):
    model = lstm_model(direction)
    rng = np.random.default_rng(2)
    calib = [{"x": rng.normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)} for _ in range(2)]
    out, report = onnx_fwlr.compress(model, rank=RANK, method="whiten", calibration=calib, progress=False)
    (site,) = report.sites
    assert (site.op_type, site.rank, site.K) == ("LSTM", RANK, INPUT)
    onnx.checker.check_model(out, full_check=True)
    assert "W" not in {t.name for t in out.graph.initializer} and "MatMul" in {n.op_type for n in out.graph.node}
    x = {"x": rng.normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)}
    for a, b in zip(run(model, x), run(out, x)):
        assert rel_error(a, b) <= 1e-5


def test_lstm_under_kron_gets_low_rank_and_says_so():
    model = lstm_model()
    out, report = onnx_fwlr.compress(model, ratio=0.9, method="kron", progress=False)
    (site,) = report.sites
    assert site.note.startswith("low rank") and "R stays dense" in site.note
    x = {"x": np.random.default_rng(3).normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)}
    assert rel_error(run(model, x)[0], run(out, x)[0]) <= 1e-5  # rank 5 fits in 90 % of the budget: exact


def lstm_with_head(**attrs):
    model = lstm_model()
    for key, value in attrs.items():
        model.graph.node[0].attribute.append(helper.make_attribute(key, value))
    head = numpy_helper.from_array(np.random.default_rng(4).normal(size=(HIDDEN, 12)).astype(np.float32), "head")
    graph = model.graph
    graph.initializer.append(head)
    graph.node.append(helper.make_node("MatMul", ["y", "head"], ["logits"], name="head_mm"))
    graph.output.append(vinfo("logits", [SEQ, 1, BATCH, 12]))
    return model


def test_lstm_is_compressed_under_fisher_methods():
    """The LSTM rule carries Fisher statistics to the input weight; its rank-5 W is kept exactly at rank 5."""
    model = lstm_with_head()
    rng = np.random.default_rng(5)
    calib = [{"x": rng.normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)}]
    out, report = onnx_fwlr.compress(model, rank=RANK, method="fwsvd", calibration=calib, progress=False)
    assert sorted(s.op_type for s in report.sites) == ["LSTM", "MatMul"]
    (lstm,) = [s for s in report.sites if s.op_type == "LSTM"]
    assert lstm.rank == RANK and lstm.relative_error < 1e-5
    x = {"x": rng.normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)}
    assert rel_error(run(model, x)[0], run(out, x)[0]) <= 1e-5


def test_lstm_with_clip_is_skipped_with_a_reason_under_fisher_methods():
    model = lstm_with_head(clip=5.0)
    rng = np.random.default_rng(5)
    calib = [{"x": rng.normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)}]
    _, report = onnx_fwlr.compress(model, ratio=0.5, method="fwsvd", calibration=calib, progress=False)
    assert [s.op_type for s in report.sites] == ["MatMul"]
    (lstm,) = [s for s in report.skipped if s.op_type == "LSTM"]
    assert "clip" in lstm.reason


def test_lstm_input_statistics_follow_the_mask_in_seq_first_layout():
    """X is [seq, batch, K] but the mask is [batch, seq]: padded positions must drop out of E[x xᵀ]."""
    from onnx_fwlr.io.data import open_data
    from onnx_fwlr.sites.recurrent import find_recurrent_sites
    from onnx_fwlr.stats.activations import collect_activation_stats

    model = lstm_model()
    model.graph.input.append(vinfo("attention_mask", [BATCH, SEQ], TensorProto.INT64))
    rng = np.random.default_rng(6)
    x = rng.normal(size=(SEQ, BATCH, INPUT)).astype(np.float32)
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[0, 2:] = 0
    mask[2, 4:] = 0
    sites, _ = find_recurrent_sites(model)
    stats = collect_activation_stats(model, sites, open_data([{"x": x, "attention_mask": mask}], model), progress=False)
    kept = x.transpose(1, 0, 2)[mask.astype(bool)]  # [positions, K]
    np.testing.assert_allclose(stats.input_gram(sites[0]), kept.T @ kept / len(kept), rtol=1e-5, atol=1e-6)
