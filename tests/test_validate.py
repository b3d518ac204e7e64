"""Tests for onnx_fwlr.validation: metrics against numpy computed by hand, pass/fail, batching invariance."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.validation import compare_models, format_validation

RNG = np.random.default_rng(0)
X = RNG.standard_normal((30, 4)).astype(np.float32)
W = RNG.standard_normal((4, 3)).astype(np.float32)
W_PERTURBED = (W + 0.3 * RNG.standard_normal((4, 3))).astype(np.float32)
LABELS = np.argmax(X @ W, axis=1)
LABELS[:5] = (LABELS[:5] + 1) % 3  # the original model gets exactly 25 of 30 right


def logits_model(weight, unary=None):
    """x [N,4] -> MatMul(weight) [-> unary op] -> logits [N,3]."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm" if unary else "logits"])]
    if unary:
        nodes.append(helper.make_node(unary, ["mm"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "logits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def three_output_model(weight):
    """logits [N,3] (logit-like), score [N,1] (float, not logit-like), cls [N] (int, not compared)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("ReduceSum", ["logits", "axes"], ["score"], keepdims=1),
            helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=0),
        ],
        "three",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("cls", TensorProto.INT64, ["N"]),
        ],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def batches(x, sizes, extra=None):
    start = 0
    for size in sizes:
        feed = {"x": x[start : start + size]}
        if extra is not None:
            feed[extra] = np.zeros(size)
        yield feed
        start += size


def compare(original, compressed, sizes=(30,), **kwargs):
    return compare_models(original, compressed, batches(X, sizes), progress=False, **kwargs)


def test_metrics_match_numpy_by_hand():
    ref = X @ W
    out = X @ W_PERTURBED
    v = compare(logits_model(W), logits_model(W_PERTURBED), labels=LABELS)
    (m,) = v.outputs

    cosines = [np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(ref, out)]
    agreement = np.mean(np.argmax(ref, 1) == np.argmax(out, 1))
    assert 0 < agreement < 1  # the perturbation must flip some predictions for the test to mean anything
    assert v.num_samples == 30
    assert m.name == "logits"
    assert m.max_abs_error == pytest.approx(np.abs(ref - out).max(), rel=1e-5)
    assert m.mean_abs_error == pytest.approx(np.abs(ref - out).mean(), rel=1e-5)
    assert m.rel_l2_error == pytest.approx(np.linalg.norm(ref - out) / np.linalg.norm(ref), rel=1e-5)
    assert m.mean_cosine == pytest.approx(np.mean(cosines), rel=1e-5)
    assert m.min_cosine == pytest.approx(np.min(cosines), rel=1e-5)
    assert m.top1_agreement == pytest.approx(agreement)
    assert (m.nan_count, m.inf_count) == (0, 0)
    assert v.label_output == "logits"
    assert v.original_accuracy == pytest.approx(25 / 30)
    assert v.compressed_accuracy == pytest.approx(np.mean(np.argmax(out, 1) == LABELS))


def test_identical_models_pass_every_tolerance():
    v = compare(logits_model(W), logits_model(W), labels=LABELS)
    (m,) = v.outputs
    assert m.max_abs_error == 0 and m.mean_abs_error == 0 and m.rel_l2_error == 0
    assert m.mean_cosine == pytest.approx(1, abs=1e-12)
    assert m.min_cosine == pytest.approx(1, abs=1e-12)
    assert m.top1_agreement == 1
    assert v.accuracy_drop == 0
    assert v.check(min_cosine=0.9999, max_rel_error=1e-6, max_accuracy_drop=0) == []
    assert v.passed(min_cosine=0.9999)
    assert format_validation(v, []).splitlines()[-1] == "PASS"


def test_zeroed_weight_fails_cosine_error_and_accuracy():
    v = compare(logits_model(W), logits_model(np.zeros_like(W)), labels=LABELS)
    (m,) = v.outputs
    assert m.mean_cosine == 0 and m.rel_l2_error == pytest.approx(1)
    assert v.compressed_accuracy == pytest.approx(np.mean(LABELS == 0))  # argmax of all-zero rows is 0

    failures = v.check(min_cosine=0.9, max_rel_error=0.1, max_accuracy_drop=0.01)
    assert len(failures) == 3
    assert "cosine" in failures[0] and "relative L2" in failures[1] and "accuracy" in failures[2]
    assert not any("NaN" in f for f in failures)
    assert v.check() == []  # no tolerances asked, nothing non-finite: passes
    assert not v.passed(max_rel_error=0.1)


def test_nan_output_always_fails():
    v = compare(logits_model(W), logits_model(W, unary="Sqrt"))  # sqrt of negative logits -> NaN
    (m,) = v.outputs
    assert m.nan_count == int(np.sum(X @ W < 0)) > 0
    assert m.inf_count == 0
    failures = v.check()
    assert len(failures) == 1 and "NaN" in failures[0]
    assert len(v.check(min_cosine=0.5, max_rel_error=10.0)) == 3  # NaN metrics never satisfy a tolerance
    json.dumps(v.to_dict(), allow_nan=False)  # non-finite metrics must not break strict JSON
    assert format_validation(v, failures).splitlines()[-1].startswith("FAIL: ")


def test_log_of_zero_counts_inf():
    v = compare(logits_model(W), logits_model(np.zeros_like(W), unary="Log"))  # log(0) = -inf
    assert v.outputs[0].inf_count == X.shape[0] * 3
    assert "Inf" in v.check()[0]


@pytest.mark.parametrize("sizes", [(10, 10, 10), (7, 13, 10), (1, 29)])
def test_metrics_do_not_depend_on_batching(sizes):
    original, compressed = logits_model(W), logits_model(W_PERTURBED)
    whole = compare(original, compressed, labels=LABELS).to_dict()
    split = compare(original, compressed, sizes=sizes, labels=LABELS).to_dict()
    assert split["num_batches"] == len(sizes)
    whole_metrics, split_metrics = whole.pop("outputs"), split.pop("outputs")
    whole.pop("num_batches"), split.pop("num_batches")
    assert split == pytest.approx(whole, abs=1e-6)
    for a, b in zip(whole_metrics, split_metrics):
        assert b == pytest.approx(a, abs=1e-6)


def test_default_outputs_are_shared_float_outputs(tmp_path):
    path = tmp_path / "original.onnx"
    onnx.save(three_output_model(W), path)
    v = compare(path, three_output_model(W_PERTURBED))  # a path and a ModelProto mix
    assert [m.name for m in v.outputs] == ["logits", "score"]
    assert v.outputs[0].top1_agreement is not None
    assert v.outputs[1].top1_agreement is None  # [N,1] is not logit-like
    ref, out = (X @ W).sum(1), (X @ W_PERTURBED).sum(1)
    assert v.outputs[1].max_abs_error == pytest.approx(np.abs(ref - out).max(), rel=1e-5)

    table = format_validation(v, []).splitlines()
    rows = [line for line in table if line.startswith(("output", "---", "logits", "score"))]
    assert len(rows) == 4 and len({len(line) for line in rows}) == 1  # aligned columns


def test_named_outputs_and_label_output():
    v = compare(three_output_model(W), three_output_model(W), outputs=["score"])
    assert [m.name for m in v.outputs] == ["score"]
    with pytest.raises(FwlrError, match="no compared output looks like logits"):
        compare(three_output_model(W), three_output_model(W), outputs=["score"], labels=LABELS)
    with pytest.raises(FwlrError, match="not floating point"):
        compare(three_output_model(W), three_output_model(W), outputs=["cls"])
    with pytest.raises(FwlrError, match="not an output"):
        compare(three_output_model(W), three_output_model(W), outputs=["nope"])


def test_extra_feed_arrays_are_ignored():
    v = compare_models(logits_model(W), logits_model(W), batches(X, [30], extra="labels"), progress=False)
    assert v.num_samples == 30


def test_bad_feeds_become_fwlr_errors():
    with pytest.raises(FwlrError, match="rejected batch 0 for the original model: .*x"):
        compare_models(logits_model(W), logits_model(W), [{"x": np.ones((2, 5), np.float32)}], progress=False)
    with pytest.raises(FwlrError, match="lacks input"):
        compare_models(logits_model(W), logits_model(W), [{"y": X}], progress=False)
    with pytest.raises(FwlrError, match="no batches"):
        compare_models(logits_model(W), logits_model(W), [], progress=False)


def test_label_problems_become_fwlr_errors():
    with pytest.raises(FwlrError, match="labels"):
        compare(logits_model(W), logits_model(W), labels=LABELS[:20])
    with pytest.raises(FwlrError, match="labels"):
        compare(logits_model(W), logits_model(W), labels=np.concatenate([LABELS, LABELS]))
    v = compare(logits_model(W), logits_model(W))
    with pytest.raises(FwlrError, match="needs labels"):
        v.check(max_accuracy_drop=0.01)


def test_ir_version_newer_than_runtime_is_lowered(tmp_path):
    too_new = logits_model(W)
    too_new.ir_version = 99
    path = tmp_path / "too_new.onnx"
    onnx.save(too_new, path)
    v = compare(too_new, path)
    assert v.outputs[0].max_abs_error == 0
    assert too_new.ir_version == 99  # the caller's model is left as it was


def test_unloadable_model_becomes_fwlr_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(FwlrError, match="cannot load the original model"):
        compare(path, logits_model(W))
    with pytest.raises(FwlrError, match="does not exist"):
        compare(tmp_path / "missing.onnx", logits_model(W))


def test_top_level_validate_stays_the_function_after_importing_the_module():
    """`from onnx_fwlr.validation import ...` in an export script must not shadow `onnx_fwlr.validate`."""
    import onnx_fwlr

    assert callable(onnx_fwlr.validate) and onnx_fwlr.validate.__module__ == "onnx_fwlr.pipeline.compress"
