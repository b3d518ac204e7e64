"""Distillation refinement of factor weights: gradients, recovery on the digits MLP, never-worse, CLI."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from bert_builder import BATCH, CLASSES, make_bert, make_feed
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_erf
from scipy.special import erf

from onnx_fwlr import FwlrError, compress
from onnx_fwlr.autodiff import losses as fisher
from onnx_fwlr.cli.main import main
from onnx_fwlr.pipeline.compress import validate
from onnx_fwlr.refine.loop import SamplePool, refine, split_units
from onnx_fwlr.refine.losses import Objective
from onnx_fwlr.refine.optim import Adam, learning_rate
from onnx_fwlr.refine.trainable import Student, trainable_factors

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "sample_models" / "digits_mlp.onnx"
CALIB = ROOT / "sample_models" / "digits_calib.npz"
TEST = ROOT / "sample_models" / "digits_test.npz"


@pytest.fixture(scope="module")
def digits_svd():
    # svd at uniform ratio 0.3 without the rank floor (which keeps the head dense): every site factorised, badly
    model, _ = compress(str(DIGITS), ranks={"fc1/Gemm": 15, "fc2/MatMul": 38, "head/Gemm": 2}, method="svd",
                        progress=False)
    return model


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------------- gradients

@pytest.fixture
def exact_erf(monkeypatch):
    """onnx.reference evaluates Erf in float32; finite differences need float64."""
    monkeypatch.setattr(op_erf.Erf, "_run", lambda self, x: (erf(x).astype(x.dtype),))


def reference_student(student):
    """Swap the student's ONNX Runtime forward for onnx.reference in float64."""
    names = student.runner.fetch_names
    evaluator = ReferenceEvaluator(student.runner.exposed_model)
    student.forward = lambda feed: {**feed, **dict(zip(names, evaluator.run(names, feed)))}
    return evaluator


def float64_bert_objective(output: str, kind: str):
    """The float64 synthetic BERT, compressed at rank 2, its trainable factors and the objective on `output`."""
    original = make_bert(np.float64)
    compressed, _ = compress(original, rank=2, progress=False)
    trainable = trainable_factors(original, compressed)
    target = fisher.find_seed_target(compressed, output)
    return original, compressed, trainable, target, Objective(kind, target, label_weight=0.5 if kind == "kl" else 0.0)


def perturbed_factors(compressed, trainable, rng) -> dict:
    """The trainable weights moved off the closed form, so gradients are not all near zero."""
    return {k: v + rng.normal(0, 0.05, v.shape) for k, v in initializers(compressed).items() if k in trainable}


@pytest.mark.parametrize("output, kind", [("probs", "kl"), ("l1.ln2", "mse")])
def test_refine_gradients_match_finite_differences_float64(exact_erf, output, kind):
    rng = np.random.default_rng(0)
    original, compressed, trainable, target, objective = float64_bert_objective(output, kind)
    student = Student(compressed, trainable, objective, mask_input="attention_mask")
    evaluator = reference_student(student)
    feed = make_feed(rng)
    teacher = ReferenceEvaluator(original).run([target.tensor], feed)[0]
    labels = rng.integers(0, CLASSES, size=BATCH)
    weights = perturbed_factors(compressed, trainable, rng)

    def loss(w):
        z = evaluator.run([target.tensor], student.feed(feed, w))[0]
        mask = feed["attention_mask"] if z.ndim == 3 else None
        return objective(z, teacher, labels, mask)[0]

    value, grads = student.loss_and_grads(feed, weights, teacher, labels)
    assert value == pytest.approx(loss(weights), rel=1e-12)
    checked = ["l0.q.W/factor_A", "l0.ffn1.W/factor_B", "l1.ffn2.W/factor_A", "l1.o.bias", "head.W/factor_B",
               "head.b"]
    analytic, numeric, h = [], [], 1e-6
    for name in checked:
        assert grads[name].dtype == np.float64 and grads[name].shape == weights[name].shape
        for flat in rng.choice(weights[name].size, size=min(4, weights[name].size), replace=False):
            index = np.unravel_index(flat, weights[name].shape)
            plus, minus = dict(weights), dict(weights)
            plus[name], minus[name] = weights[name].copy(), weights[name].copy()
            plus[name][index] += h
            minus[name][index] -= h
            numeric.append((loss(plus) - loss(minus)) / (2 * h))
            analytic.append(grads[name][index])
    analytic, numeric = np.array(analytic), np.array(numeric)
    if kind == "mse":  # the head sits after the hidden state: no gradient reaches it
        assert np.all(grads["head.b"] == 0)
    err = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    assert err <= 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("output, kind", [("probs", "kl"), ("l1.ln2", "mse")])
def test_micro_batches_give_the_whole_batch_loss_gradient_and_update(exact_erf, output, kind):
    rng = np.random.default_rng(1)
    original, compressed, trainable, target, objective = float64_bert_objective(output, kind)
    feed = make_feed(rng, batch=7)
    feed["attention_mask"][[2, 3, 6], -3:] = 0  # pieces with different numbers of real positions
    teacher = ReferenceEvaluator(original).run([target.tensor], feed)[0]
    labels = rng.integers(0, CLASSES, size=7)
    weights = perturbed_factors(compressed, trainable, rng)
    results = {}
    for micro_batch in (None, 3):  # whole, and pieces of 3, 3 and 1 samples
        student = Student(compressed, trainable, objective, mask_input="attention_mask", micro_batch=micro_batch)
        reference_student(student)
        calls = []
        forward = student.forward
        student.forward = lambda f: calls.append(len(f["input_ids"])) or forward(f)
        loss, grads = student.loss_and_grads(feed, weights, teacher, labels)
        adam = Adam(weights)
        adam.step(grads, 1e-2)
        results[micro_batch] = loss, grads, adam.params, calls
    (whole, whole_grads, whole_params, whole_calls), (parts, part_grads, part_params, part_calls) = results.values()
    assert whole_calls == [7] and part_calls == [3, 3, 1]
    assert parts == pytest.approx(whole, rel=1e-12)
    scale = max(np.abs(g).max() for g in whole_grads.values())  # some tensors get no gradient, up to rounding
    assert scale > 1e-3
    for name in trainable:
        np.testing.assert_allclose(part_grads[name], whole_grads[name], rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(part_params[name], whole_params[name], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- what is trained

def test_trainable_are_factors_and_site_biases(digits_svd):
    original = onnx.load(str(DIGITS))
    names = trainable_factors(original, digits_svd)
    factors = {f"{w}.weight/factor_{s}" for w in ("fc1", "fc2", "head") for s in "AB"}
    # fc1 and head are Gemm (bias = C), fc2 is MatMul followed by Add(bias): all three are site biases.
    assert set(names) == factors | {"fc1.bias", "fc2.bias", "head.bias"}
    assert trainable_factors(original, original) == []


def test_one_session_serves_every_step(digits_svd, monkeypatch):
    import onnxruntime as ort

    from onnx_fwlr.io.runtime import max_runtime_ir_version

    max_runtime_ir_version()  # its one-time probe session is not ours to count
    made = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: made.append(1) or real(*a, **k))
    refine(str(DIGITS), digits_svd, str(CALIB), steps=30, lr=1e-3, eval_every=10, progress=False)
    assert len(made) == 3  # student gradients, student evaluation, teacher


def test_held_back_validation_is_disjoint_and_at_least_one_batch():
    pool = SamplePool([({"x": np.zeros((40, 3), np.float32)}, None), ({"x": np.zeros((37, 3), np.float32)}, None)])
    train, held = split_units(pool, 16, np.random.default_rng(0))
    assert pool.joined and len(held) == 16 and not set(train) & set(held) and len(train) + len(held) == 77


def test_learning_rate_warms_up_then_decays():
    lrs = [learning_rate(s, 200, 1e-3) for s in range(1, 201)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[-1] < 1e-5
    assert learning_rate(105, 200, 1e-3, "linear") == pytest.approx(1e-3 * (1 - 95 / 191))


# ------------------------------------------------------------------------------------------- behaviour

def test_refine_recovers_half_the_digits_accuracy_lost(digits_svd):
    before = validate(str(DIGITS), digits_svd, str(TEST), progress=False)
    refined, report = refine(str(DIGITS), digits_svd, str(CALIB), steps=300, lr=3e-3, progress=False)
    after = validate(str(DIGITS), refined, str(TEST), progress=False)
    lost = before.original_accuracy - before.compressed_accuracy
    assert lost > 0.3  # svd at 0.3 really hurts: the test would be vacuous otherwise
    assert after.compressed_accuracy - before.compressed_accuracy >= lost / 2
    assert report.loss == "kl" and report.improved and report.after["loss"] < report.before["loss"]
    assert report.curve[0][0] == 0 and report.curve[0][2] == report.before["loss"]
    onnx.checker.check_model(refined)


def test_divergence_returns_the_input_weights(digits_svd):
    refined, report = refine(str(DIGITS), digits_svd, str(CALIB), steps=60, lr=50.0, eval_every=5, patience=3,
                             progress=False)
    assert not report.improved and report.best_step == 0
    assert report.after == report.before and "no improvement" in report.format()
    got, want = initializers(refined), initializers(digits_svd)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_same_seed_same_weights_and_input_untouched(digits_svd):
    snapshot = digits_svd.SerializeToString()
    a, _ = refine(str(DIGITS), digits_svd, str(CALIB), steps=12, lr=1e-3, eval_every=4, progress=False)
    b, _ = refine(str(DIGITS), digits_svd, str(CALIB), steps=12, lr=1e-3, eval_every=4, progress=False)
    assert a.SerializeToString() == b.SerializeToString()
    assert digits_svd.SerializeToString() == snapshot


def test_label_weight_without_labels_is_a_user_error(digits_svd, tmp_path):
    data = np.load(CALIB)
    path = tmp_path / "nolabels.npz"
    np.savez(path, input=data["input"])
    with pytest.raises(FwlrError, match="labels"):
        refine(str(DIGITS), digits_svd, str(path), steps=5, label_weight=1.0, progress=False)


# ------------------------------------------------------------------------------------------- CLI

def test_cli_refine_end_to_end(digits_svd, tmp_path, capsys):
    compressed = tmp_path / "svd.onnx"
    onnx.save(digits_svd, str(compressed))
    out, report = tmp_path / "refined.onnx", tmp_path / "refine.json"
    code = main(["refine", str(DIGITS), str(compressed), "-o", str(out), "--calib", str(CALIB), "--val", str(TEST),
                 "--steps", "40", "--lr", "3e-3", "--quiet",
                 "--json", str(report)])
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["val_samples"] == 500 and data["after"]["loss"] < data["before"]["loss"]
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "wrote" in printed
    accuracy = validate(str(DIGITS), str(out), str(TEST), progress=False).compressed_accuracy
    assert accuracy == pytest.approx(data["after"]["accuracy"])


@pytest.mark.parametrize("problem", ["missing model", "wrong data"])
def test_cli_refine_bad_input_exits_2_with_one_sentence(digits_svd, tmp_path, capsys, problem):
    compressed = tmp_path / "svd.onnx"
    onnx.save(digits_svd, str(compressed))
    calib = str(CALIB)
    original = str(DIGITS)
    if problem == "missing model":
        original = str(tmp_path / "absent.onnx")
    else:
        calib = str(tmp_path / "wrong.npz")
        np.savez(calib, pixels=np.zeros((8, 64), np.float32))
    code = main(["refine", original, str(compressed), "-o", str(tmp_path / "out.onnx"), "--calib", calib, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("onnx-fwlr: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_cli_compress_with_refine(tmp_path, capsys):
    out, report = tmp_path / "c.onnx", tmp_path / "c.json"
    code = main(["compress", str(DIGITS), "-o", str(out), "--ratio", "0.3", "--method", "svd", "--calib", str(CALIB),
                 "--refine", "30", "--max-accuracy-drop", "100", "--refine-lr", "3e-3", "--val", str(TEST), "--quiet",
                 "--json", str(report)])
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["refine"]["steps"] == 30 and data["refine"]["after"]["loss"] < data["refine"]["before"]["loss"]
    assert "held-back calibration" in data["refine"]["val_source"]  # --val stays unseen until the final check
    assert "refine:" in capsys.readouterr().out
