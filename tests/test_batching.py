"""Micro-batches and padding trimming (io.batching): the statistics stay the same sums over the same real positions."""

import numpy as np
import pytest
from builders import make_model, vinfo
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.io.batching import micro_batches, padded_inputs, sample_axis_first, trim_padding
from onnx_fwlr.io.data import InputSpec, model_inputs, open_data
from onnx_fwlr.io.runtime import make_session
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.stats.fisher import collect_fisher_stats

SEQ, VOCAB, D, H = 7, 11, 6, 9


def masked_token_model():
    """ids, mask [B, seq] -> embedding -> MatMul W1 -> Relu -> MatMul W2 -> mean over the real positions [B, D]:
    a model that reads its mask, so padding never reaches a real position."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, D)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((H, D)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "W1"], ["a"], name="fc1"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
             helper.make_node("Mul", ["y", "m3"], ["ym"]),
             helper.make_node("ReduceSum", ["ym", "axis1"], ["total"], keepdims=0),
             helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
             helper.make_node("Div", ["total", "count"], ["embedding"])]
    inputs = [vinfo("input_ids", ["batch", "seq"], TensorProto.INT64),
              vinfo("attention_mask", ["batch", "seq"], TensorProto.INT64)]
    return make_model(nodes, inputs, [vinfo("embedding", ["batch", D])], inits)


def padded_data(samples=10, seed=1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, SEQ - 1, samples)  # the longest is shorter than SEQ: a trailing column is all padding
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, (samples, SEQ)) * mask
    return {"input_ids": ids, "attention_mask": mask}


def fisher_stats(model, micro_batch, trim):
    sites, _ = find_all_sites(model, None, None, fisher=True)
    batches = open_data([padded_data()], model, batch_size=10)
    return collect_fisher_stats(model, sites, batches, loss="gaussian", progress=False, micro_batch=micro_batch,
                                trim=trim)


def test_micro_batches_and_trimmed_padding_give_the_same_statistics():
    model = masked_token_model()
    whole = fisher_stats(model, micro_batch=None, trim=False)
    cut = fisher_stats(model, micro_batch=3, trim=True)
    assert cut.meta["samples"] == whole.meta["samples"] == 10 and cut.meta["batches"] == 1
    for mine, theirs in ((cut.activations, whole.activations), (cut.gradients, whole.gradients)):
        assert mine.keys() == theirs.keys() and mine
        for key in mine:
            for field, value in theirs[key].items():
                np.testing.assert_allclose(mine[key][field], value, rtol=2e-5, atol=1e-6, err_msg=f"{key} {field}")


def test_micro_batches_cut_along_samples_and_keep_odd_batches_whole():
    feed = {"a": np.arange(10).reshape(5, 2), "b": np.arange(5)}
    labels = np.arange(5) * 10
    pieces = list(micro_batches(feed, labels, 2))
    assert [len(p["b"]) for p, _ in pieces] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([p["a"] for p, _ in pieces]), feed["a"])
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in pieces]), labels)
    assert len(list(micro_batches(feed, labels, None))) == 1
    uneven = {"a": np.zeros((5, 2)), "b": np.zeros(3)}  # no shared sample axis: whole
    assert len(list(micro_batches(uneven, None, 2))) == 1


def test_trim_padding_cuts_only_trailing_columns_no_sample_uses():
    specs = model_inputs(masked_token_model())
    names = padded_inputs(specs, "attention_mask")
    assert names == ["input_ids", "attention_mask"]
    mask = np.array([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]])  # a hole inside the used span stays
    feed = {"input_ids": np.arange(10).reshape(2, 5), "attention_mask": mask}
    trimmed, labels = trim_padding(feed, np.ones((2, 5)), "attention_mask", names)
    assert trimmed["attention_mask"].shape == (2, 3) and labels.shape == (2, 3)
    np.testing.assert_array_equal(trimmed["input_ids"], feed["input_ids"][:, :3])
    empty, _ = trim_padding({"input_ids": feed["input_ids"], "attention_mask": 0 * mask}, None, "attention_mask",
                            names)
    assert empty["attention_mask"].shape == (2, 1)  # never an empty sequence


def test_a_decoders_token_ids_are_cut_with_its_mask_or_nothing_is():
    """The shipped decoder's mask spans `total_sequence` (past + new), its input_ids `sequence`: cutting the mask
    alone made ONNX Runtime refuse every trimmed batch (And node, 63 by 64)."""
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence")),
             InputSpec("attention_mask", np.dtype(np.int64), ("batch", "total_sequence"))]
    assert padded_inputs(specs, "attention_mask") == ["input_ids", "attention_mask"]
    mask = np.ones((2, 6), np.int64)
    mask[:, 4:] = 0
    feed = {"input_ids": np.arange(12).reshape(2, 6), "attention_mask": mask}
    trimmed, _ = trim_padding(feed, None, "attention_mask", ["input_ids", "attention_mask"])
    assert trimmed["input_ids"].shape == trimmed["attention_mask"].shape == (2, 4)
    with_past = {"input_ids": np.arange(4).reshape(2, 2), "attention_mask": mask}  # 4 past + 2 new positions
    assert trim_padding(with_past, None, "attention_mask", ["input_ids", "attention_mask"])[0] is with_past


def test_nothing_is_cut_where_the_model_fixes_the_axis():
    fixed_seq = [InputSpec(name, np.dtype(np.int64), ("batch", 8)) for name in ("ids", "mask")]
    assert padded_inputs(fixed_seq, "mask") == [] and padded_inputs(fixed_seq, None) == []
    model = masked_token_model()
    assert sample_axis_first(model, model_inputs(model))
    fixed_batch = [InputSpec("input_ids", np.dtype(np.int64), (4, "seq"))]
    assert not sample_axis_first(model, fixed_batch)


@pytest.mark.parametrize("from_proto", [True, False])
def test_sessions_made_from_a_model_in_memory_do_not_keep_its_bytes(from_proto, tmp_path):
    model = masked_token_model()
    source = model
    if not from_proto:
        import onnx

        source = tmp_path / "m.onnx"
        onnx.save(model, source)
    session = make_session(source)
    assert getattr(session, "_model_bytes", None) is None
    out = session.run(None, padded_data(3))[0]
    assert out.shape == (3, D) and np.all(np.isfinite(out))
