"""Fisher statistics and Fisher methods (fwsvd, kfac, global allocation) on LSTM/GRU input weights.

The check of the statistics: an LSTM whose input weight W is a site gives the same Fisher sums and
output-gradient Gram as the equivalent model where the input projection X Wᵀ is an explicit MatMul site
(MatMul(X, stacked_view(W)) feeding an LSTM whose W selects its own direction's block).
"""

import json

import numpy as np
import onnx
import pytest
from builders import make_model, vinfo
from onnx import helper, numpy_helper

from onnx_fwlr.cli.main import main
from onnx_fwlr.io.data import open_data
from onnx_fwlr.sites.find import find_sites
from onnx_fwlr.sites.recurrent import find_all_sites, find_recurrent_sites, stacked_view
from onnx_fwlr.stats.fisher import collect_fisher_stats

SEQ, INPUT, HIDDEN, VOCAB = 6, 24, 16, 20
GATES = {"LSTM": 4, "GRU": 3}


def recurrent_lm(op="LSTM", direction="forward", seed=0, explicit_projection=False, attrs=None):
    """x [batch, seq, input] → Transpose → LSTM/GRU (layout 0) → Transpose/Reshape → MatMul head → logits.

    explicit_projection: the same function with X Wᵀ as MatMul(X, stacked_view(W)) and the op's W a block selector.
    """
    rng = np.random.default_rng(seed)
    G, D = GATES[op], (2 if direction == "bidirectional" else 1)
    W = rng.normal(0, 0.3, (D, G * HIDDEN, INPUT)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (D, G * HIDDEN, HIDDEN)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(0, 0.1, (D, 2 * G * HIDDEN)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.normal(0, 0.3, (D * HIDDEN, VOCAB)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape")]
    if explicit_projection:  # on the batch-first input, so that a sample is a batch entry for both sites
        selector = np.stack([np.eye(G * HIDDEN, D * G * HIDDEN, k=d * G * HIDDEN) for d in range(D)]).astype(np.float32)
        inits += [numpy_helper.from_array(stacked_view(W), "M"), numpy_helper.from_array(selector, "W")]
        nodes = [helper.make_node("MatMul", ["x", "M"], ["xm"], name="projection"),
                 helper.make_node("Transpose", ["xm"], ["xt"], perm=[1, 0, 2])]
    else:
        inits.append(numpy_helper.from_array(W, "W"))
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2])]
    nodes += [helper.make_node(op, ["xt", "W", "R", "B"], ["y"], name="rnn",
                               hidden_size=HIDDEN, direction=direction, **(attrs or {})),
              helper.make_node("Transpose", ["y"], ["yt"], perm=[2, 0, 1, 3]),
              helper.make_node("Reshape", ["yt", "shape"], ["h"]),
              helper.make_node("MatMul", ["h", "head"], ["logits"], name="head")]
    return make_model(nodes, [vinfo("x", ["batch", SEQ, INPUT])], [vinfo("logits", ["batch", SEQ, VOCAB])], inits)


def calibration(n=24, seed=1):
    return {"x": np.random.default_rng(seed).normal(size=(n, SEQ, INPUT)).astype(np.float32)}


@pytest.mark.parametrize("op,direction", [("LSTM", "forward"), ("LSTM", "bidirectional"), ("GRU", "reverse")])
def test_recurrent_fisher_equals_the_explicit_projection_site(op, direction):
    model = recurrent_lm(op, direction)
    explicit = recurrent_lm(op, direction, explicit_projection=True)
    [site], _ = find_recurrent_sites(model)
    projection = next(s for s in find_sites(explicit)[0] if s.weight == "M")
    x = calibration()["x"]
    data = [{"x": x[i:i + 8]} for i in range(0, len(x), 8)]
    stats = collect_fisher_stats(model, [site], open_data(data, model), loss="gaussian", progress=False)
    want = collect_fisher_stats(explicit, [projection], open_data(data, explicit), loss="gaussian", progress=False)
    got, ref = stats.gradients["W"], want.gradients["M"]
    assert float(got["grad_count"]) == float(ref["grad_count"]) == 24
    for key in ("fisher_row", "fisher_col", "grad_gram"):
        assert got[key].shape == ref[key].shape
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-4, atol=1e-6 * np.abs(ref[key]).max())
    assert np.abs(got["fisher_row"]).max() > 0
    np.testing.assert_allclose(stats.input_gram(site), want.input_gram(projection), rtol=1e-5, atol=1e-6)


def test_unsupported_attribute_skips_the_site_under_fisher_methods():
    model = recurrent_lm("LSTM", attrs={"clip": 5.0})
    sites, skipped = find_all_sites(model, None, None, fisher=True)
    assert [s.weight for s in sites] == ["head"]
    assert any(s.weight == "W" and "clip" in s.reason for s in skipped)
    sites, _ = find_all_sites(model, None, None, fisher=False)
    assert {s.weight for s in sites} == {"head", "W"}


@pytest.mark.parametrize("method,allocation", [("kfac", "global"), ("fwsvd", "uniform")])
def test_cli_fisher_methods_compress_the_lstm_input_weight(tmp_path, method, allocation):
    model_path, data_path = tmp_path / "lstm.onnx", tmp_path / "calib.npz"
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(recurrent_lm("LSTM", "bidirectional"), str(model_path))
    np.savez(data_path, **calibration(48))
    code = main(["compress", str(model_path), "-o", str(out), "--method", method, "--allocation", allocation,
                 "--ratio", "0.5", "--calib", str(data_path), "--json", str(report_path), "--quiet"])
    assert code == 0
    report = json.loads(report_path.read_text())
    rnn = next(s for s in report["sites"] if s["weight"] == "W")
    assert rnn["rank"] is not None and 0 < rnn["rank"] < INPUT
    compressed = onnx.load(str(out))
    onnx.checker.check_model(compressed, full_check=True)
    assert [n.op_type for n in compressed.graph.node].count("LSTM") == 1
    assert any(n.op_type == "MatMul" and "input_projection" in n.name for n in compressed.graph.node)
