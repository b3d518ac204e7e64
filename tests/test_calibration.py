"""Calibration: in-graph statistics, data checking, stats files, and the activation-weighted methods."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import low_rank, make_model, matmul_model, vinfo
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr import FwlrError, compress
from onnx_fwlr.cli.main import main
from onnx_fwlr.methods import lowrank as factorize
from onnx_fwlr.pipeline.compress import calibrate
from onnx_fwlr.stats.store import Statistics

SAMPLES = Path(__file__).parents[1] / "sample_models"
DIGITS = SAMPLES / "digits_mlp.onnx"


# --- maths ---------------------------------------------------------------------------------------


def test_whitened_svd_error_identity():
    """‖X (W − A B)‖² equals the dropped weighted σ² (the optimality identity of the whitened SVD)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40))  # correlated inputs
    W = rng.standard_normal((40, 30))
    dec = factorize.weighted_svd(W, factorize.gram_scaling(X.T @ X, damping=0.0))
    for rank in (1, 7, 20):
        A, B = dec.factors(rank)
        actual = np.linalg.norm(X @ (W - A @ B)) ** 2
        assert actual == pytest.approx(dec.dropped_energy(rank), rel=1e-8)
    # and it beats the unweighted SVD in the data norm
    A0, B0 = factorize.weighted_svd(W).factors(7)
    A1, B1 = dec.factors(7)
    assert np.linalg.norm(X @ (W - A1 @ B1)) < np.linalg.norm(X @ (W - A0 @ B0))


def test_two_sided_weighting_identity():
    rng = np.random.default_rng(1)
    X, G = rng.standard_normal((300, 20)), rng.standard_normal((300, 15)) @ rng.standard_normal((15, 15))
    W = rng.standard_normal((20, 15))
    Lx = np.linalg.cholesky(X.T @ X)
    Lg = np.linalg.cholesky(G.T @ G)
    dec = factorize.weighted_svd(W, factorize.gram_scaling(X.T @ X, 0.0), factorize.gram_scaling(G.T @ G, 0.0))
    A, B = dec.factors(5)
    assert np.linalg.norm(Lx.T @ (W - A @ B) @ Lg) ** 2 == pytest.approx(dec.dropped_energy(5), rel=1e-8)


def test_rank_deficient_gram_still_factorises():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 16))
    X[:, 3] = X[:, 5]  # duplicated channel
    X[:, 7] = 0.0  # dead ReLU channel
    W = rng.standard_normal((16, 12))
    dec = factorize.weighted_svd(W, factorize.gram_scaling(X.T @ X, damping=0.0))
    A, B = dec.factors(4)
    assert np.all(np.isfinite(A)) and np.all(np.isfinite(B))
    assert np.linalg.norm(X @ (W - A @ B)) < np.linalg.norm(X @ W)
    asvd = factorize.weighted_svd(W, factorize.diagonal_scaling(np.sqrt(np.mean(X**2, axis=0))))
    assert all(np.all(np.isfinite(f)) for f in asvd.factors(4))


def test_nan_weight_raises_instead_of_inventing():
    W = np.ones((8, 8))
    W[0, 0] = np.nan
    with pytest.raises(FwlrError, match="NaN"):
        factorize.weighted_svd(W)


# --- in-graph statistics --------------------------------------------------------------------------


def transformer_like(K=12, N=10):
    """x [b, t, K] @ W with an attention_mask input, the layout of transformer exports."""
    W = low_rank(K, N, 6)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["y", "m3"], ["out"])]
    return make_model(nodes, [vinfo("x", ["b", "t", K]), vinfo("attention_mask", ["b", "t"], TensorProto.INT64)],
                      [vinfo("out", ["b", "t", N])],
                      [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([2], np.int64), "axes")])


def token_batches(n_batches=3, b=4, t=5, K=12, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        mask = np.ones((b, t), np.int64)
        for row in range(b):
            mask[row, rng.integers(1, t + 1):] = 0
        batches.append({"x": rng.standard_normal((b, t, K)).astype(np.float32), "attention_mask": mask})
    return batches


def test_in_graph_statistics_match_numpy_with_mask():
    model = transformer_like()
    batches = token_batches()
    stats = calibrate(model, batches, progress=False)
    rows = np.concatenate([b["x"].reshape(-1, 12) for b in batches]).astype(np.float64)
    weights = np.concatenate([b["attention_mask"].reshape(-1) for b in batches]).astype(np.float64)
    kept = rows[weights > 0]
    sums = stats.activations["x"]
    assert sums["count"] == pytest.approx(weights.sum())
    np.testing.assert_allclose(sums["gram"], kept.T @ kept, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sums["sum"], kept.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sums["abs_sum"], np.abs(kept).sum(0), rtol=1e-5)
    assert stats.meta["mask_input"] == "attention_mask" and stats.meta["samples"] == 12


def test_fisher_pass_measures_the_same_activation_sums_with_mask():
    model = transformer_like()
    batches = token_batches()
    plain = calibrate(model, batches, progress=False).activations["x"]
    with_gradients = calibrate(model, batches, fisher=True, progress=False).activations["x"]
    assert with_gradients["count"] == plain["count"]  # padding rows dropped on both paths
    for name in ("gram", "sum", "abs_sum"):
        np.testing.assert_allclose(with_gradients[name], plain[name], rtol=1e-5, atol=1e-4)


def test_merged_halves_equal_the_whole(tmp_path):
    model = transformer_like()
    batches = token_batches(n_batches=4)
    whole = calibrate(model, batches, progress=False)
    first = calibrate(model, batches, shard=(0, 2), progress=False)
    second = calibrate(model, batches, shard=(1, 2), progress=False)
    first.save(tmp_path / "a.npz")
    second.save(tmp_path / "b.npz")
    merged = Statistics.load(tmp_path / "a.npz").merge(Statistics.load(tmp_path / "b.npz"))
    for name, value in whole.activations["x"].items():
        np.testing.assert_allclose(merged.activations["x"][name], value, rtol=1e-12)
    assert merged.meta["samples"] == whole.meta["samples"]


def test_stats_file_bytes_are_reproducible(tmp_path):
    model = transformer_like()
    calibrate(model, token_batches(), progress=False).save(tmp_path / "a.npz")
    calibrate(model, token_batches(), progress=False).save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_stats_from_another_model_are_refused(tmp_path):
    calibrate(transformer_like(), token_batches(), progress=False).save(tmp_path / "s.npz")
    other = matmul_model(low_rank(12, 10, 3, seed=9), x_shape=("b", "t", None))
    with pytest.raises(FwlrError, match="different model"):
        compress(other, ratio=0.5, method="whiten", stats=str(tmp_path / "s.npz"), progress=False)


def test_bias_correction_keeps_the_mean_output():
    """With the mean shift folded into a bias, the compressed layer is unbiased on the calibration data."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((24, 20)).astype(np.float32)
    model = matmul_model(W)
    x = (rng.standard_normal((256, 24)) + 2.0).astype(np.float32)  # far from zero mean
    compressed, report = compress(model, rank=3, method="whiten", calibration=[{"x": x}], progress=False)
    assert "Add" in report.ops_after
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731, E501
    np.testing.assert_allclose(run(compressed).mean(0), run(model).mean(0), atol=1e-3)
    without, _ = compress(model, rank=3, method="whiten", calibration=[{"x": x}], bias_correction=False, progress=False)
    assert np.abs(run(without).mean(0) - run(model).mean(0)).max() > 1e-2


# --- data checking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,message", [
    ({"x": np.zeros((2, 12), np.float32), "attention_mask": np.ones((2, 5), np.int64)}, "expects 3"),
    ({"x": np.zeros((2, 5, 12), np.float64), "attention_mask": np.ones((2, 5), np.int64)}, "astype"),
    ({"x": np.zeros((2, 5, 12), np.float32)}, "missing input"),
    ({"x": np.zeros((2, 5, 12), np.float32), "attention_mask": np.ones((2, 5), np.int64), "ids": np.ones(2)},
     "unknown input"),
    ({"x": np.full((2, 5, 12), np.nan, np.float32), "attention_mask": np.ones((2, 5), np.int64)}, "NaN"),
    ({"x": np.zeros((2, 5, 11), np.float32), "attention_mask": np.ones((2, 5), np.int64)}, "axis 2"),
])
def test_bad_calibration_batches(batch, message):
    with pytest.raises(FwlrError, match=message):
        calibrate(transformer_like(), [batch], progress=False)


def test_random_calibration_is_labelled_a_smoke_test():
    model, report = compress(transformer_like(), ratio=0.5, method="whiten", calibration="random",
                             shapes={"x": [2, 3, 12], "attention_mask": [2, 3]}, progress=False)
    assert report.calibration["smoke_test"] is True
    assert any("smoke test" in w for w in report.warnings)


def test_random_calibration_needs_symbolic_dims():
    with pytest.raises(FwlrError, match="`shapes` x"):
        calibrate(transformer_like(), "random", progress=False)


def test_npz_with_wrong_keys(tmp_path):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((4, 64), np.float32))
    with pytest.raises(FwlrError, match="unknown input name"):
        calibrate(str(DIGITS), str(tmp_path / "bad.npz"), progress=False)


def test_batches_from_folder_and_reader(tmp_path):
    data = np.load(SAMPLES / "digits_calib.npz")
    for i in range(3):
        np.savez(tmp_path / f"part{i}.npz", input=data["input"][i * 50:(i + 1) * 50])
    from_folder = calibrate(str(DIGITS), str(tmp_path), progress=False)

    class Reader:  # the shape of onnxruntime.quantization.CalibrationDataReader
        def __init__(self):
            self.items = iter([{"input": data["input"][i * 50:(i + 1) * 50]} for i in range(3)])

        def get_next(self):
            return next(self.items, None)

    from_reader = calibrate(str(DIGITS), Reader(), progress=False)
    for key, sums in from_folder.activations.items():
        np.testing.assert_allclose(from_reader.activations[key]["gram"], sums["gram"], rtol=1e-5)  # float32 per batch
    assert from_folder.meta["samples"] == 150


# --- the sample model ----------------------------------------------------------------------------------


def digits_accuracy(model):
    test = np.load(SAMPLES / "digits_test.npz")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": test["input"]})[0].argmax(1) == test["labels"]).mean())


def test_digits_whiten_beats_asvd_beats_svd():
    """Ratio 0.3 on the two wide layers (the 256x10 head kept dense: at rank 2 it collapses every method)."""
    stats = calibrate(str(DIGITS), str(SAMPLES / "digits_calib.npz"), progress=False)
    accuracy = {}
    for method in ("svd", "asvd", "whiten"):
        model, _ = compress(str(DIGITS), ratio=0.3, method=method, exclude="head", stats=stats, progress=False)
        accuracy[method] = digits_accuracy(model)
    assert accuracy["whiten"] >= accuracy["asvd"] >= accuracy["svd"], accuracy
    assert accuracy["whiten"] > accuracy["svd"] + 0.03, accuracy


def test_cli_calibrate_merge_and_compress_with_stats(tmp_path, capsys):
    args = [str(DIGITS), "--calib", str(SAMPLES / "digits_calib.npz"), "--quiet"]
    assert main(["calibrate", *args, "-o", str(tmp_path / "a.npz"), "--shard", "0/2"]) == 0
    assert main(["calibrate", *args, "-o", str(tmp_path / "b.npz"), "--shard", "1/2"]) == 0
    assert main(["merge-stats", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "-o", str(tmp_path / "s.npz")]) == 0
    assert "512 samples" in capsys.readouterr().out
    assert main(["compress", str(DIGITS), "-o", str(tmp_path / "c.onnx"), "--ratio", "0.5", "--method", "whiten",
                 "--stats", str(tmp_path / "s.npz"), "--val", str(SAMPLES / "digits_test.npz"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Accuracy" in out and "PASS" in out
    onnx.checker.check_model(onnx.load(str(tmp_path / "c.onnx")), full_check=True)
