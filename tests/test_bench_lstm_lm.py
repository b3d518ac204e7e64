"""tools/bench_lstm_lm.py's graphs: the decoder cut from the unrolled LM (dense or compressed) computes the same
logits one step at a time as the whole-sequence graph, and the ONNX LSTM-op model (the ORT int8 baseline's input)
computes the same LM. No timing here; the numbers live in the benchmark."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from onnx_fwlr import compress
from onnx_fwlr.io import runtime

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_lstm_lm", ROOT / "tools" / "bench_lstm_lm.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def weights():
    """Random LM weights of the benchmark's sizes, scaled so the gates are neither saturated nor constant."""
    rng = np.random.default_rng(0)
    V, E, H = bench.VOCAB, bench.EMBED, bench.HIDDEN
    return {"emb": rng.standard_normal((V, E)) * 0.5, "w_ih": rng.standard_normal((4 * H, E)) * 0.1,
            "w_hh": rng.standard_normal((4 * H, H)) * 0.1, "b": rng.standard_normal(4 * H) * 0.1,
            "head_w": rng.standard_normal((V, H)) * 0.1, "head_b": rng.standard_normal(V) * 0.1}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, bench.VOCAB, (3, bench.SEQ + 1))


def _decoded(model, tokens):
    return bench.decode(runtime.make_session(model, runtime.session_options(threads=1)), tokens)


def test_lstm_op_model_is_the_unrolled_model(weights, tokens):
    unrolled, op = bench.lm_onnx(weights), bench.lstm_op_model(weights)
    whole = bench.logits_of(unrolled, tokens[:, :-1])
    assert np.std(whole) > 0.1  # not a constant output
    assert np.max(np.abs(bench.logits_of(op, tokens[:, :-1]) - whole)) < 1e-4
    assert np.max(np.abs(_decoded(op, tokens[:, :-1]) - whole)) < 1e-4  # any seq: one token at a time too


def test_step_model_decodes_the_dense_and_the_compressed_graph(weights, tokens):
    unrolled = bench.lm_onnx(weights)
    assert bench.decode_check(unrolled, tokens) < 1e-5
    compressed, report = compress(unrolled, ratio=0.2, method="kron", dope=0.002, kron_shape=(16, 16, 32, 32),
                                  include=r"^lstm\.W_hh$", progress=False)
    assert "kron" in report.sites[0].note
    step = bench.step_model(compressed)
    assert [i.name for i in step.graph.input] == ["tokens", "h0", "c0"]
    assert len([n for n in step.graph.node if n.name.endswith("/zx")]) == 1  # one step kept
    assert bench.decode_check(compressed, tokens) < 1e-5
    whole = bench.logits_of(compressed, tokens[:, :-1])
    assert np.max(np.abs(whole - bench.logits_of(unrolled, tokens[:, :-1]))) > 1e-3  # the structure is used
    counts, dense = bench.byte_counts(compressed), bench.byte_counts(unrolled)
    assert counts["lstm_bytes"] < dense["lstm_bytes"] - 0.7 * 4 * weights["w_hh"].size  # W_hh's dense bytes gone
