"""The shipped digits model and data are as documented, and the synthetic transformer is a valid model."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from transformer_builder import build_transformer, make_token_batch  # noqa: E402

SAMPLES = Path(__file__).parents[1] / "sample_models"


def _session(model):
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name, rows", [("digits_calib.npz", 512), ("digits_test.npz", 500)])
def test_digits_npz_has_documented_keys_dtypes_and_shapes(name, rows):
    data = np.load(SAMPLES / name)
    assert sorted(data.files) == ["input", "labels"]
    assert data["input"].dtype == np.float32 and data["input"].shape == (rows, 64)
    assert data["labels"].dtype == np.int64 and data["labels"].shape == (rows,)
    assert 0.0 <= data["input"].min() and data["input"].max() <= 1.0
    assert set(np.unique(data["labels"])) == set(range(10))


def test_digits_calib_and_test_share_no_rows():
    calib = np.load(SAMPLES / "digits_calib.npz")["input"]
    test = np.load(SAMPLES / "digits_test.npz")["input"]
    assert not {row.tobytes() for row in calib} & {row.tobytes() for row in test}


def test_digits_model_graph_is_as_documented():
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.name == "digits_mlp"
    assert [(node.name, node.op_type) for node in model.graph.node if node.op_type != "Relu"] == [
        ("fc1/Gemm", "Gemm"), ("fc2/MatMul", "MatMul"), ("fc2/Add", "Add"), ("head/Gemm", "Gemm")]
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    assert shapes["fc1.weight"] == [256, 64]
    assert shapes["fc2.weight"] == [256, 256]
    assert shapes["head.weight"] == [256, 10]


def test_digits_model_reaches_documented_accuracy_in_onnxruntime():
    data = np.load(SAMPLES / "digits_test.npz")
    session = _session(SAMPLES / "digits_mlp.onnx")
    logits = session.run(["logits"], {"input": data["input"]})[0]
    assert logits.shape == (500, 10)
    assert np.mean(logits.argmax(axis=1) == data["labels"]) >= 0.97


def test_synthetic_transformer_passes_full_checker():
    onnx.checker.check_model(build_transformer(), full_check=True)


def test_synthetic_transformer_runs_and_embeddings_have_unit_norm():
    feeds = make_token_batch(3, 7, vocab=1000, seed=0)
    hidden, embedding = _session(build_transformer()).run(
        ["last_hidden_state", "sentence_embedding"], feeds)
    assert hidden.shape == (3, 7, 64)
    assert embedding.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(hidden))


def test_token_batch_pads_at_the_tail():
    feeds = make_token_batch(5, 9, vocab=50, seed=3)
    mask = feeds["attention_mask"]
    assert all(array.dtype == np.int64 and array.shape == (5, 9) for array in feeds.values())
    assert np.all(np.diff(mask, axis=1) <= 0)  # ones then zeros
    assert mask[:, 0].all() and mask.sum(axis=1).max() == 9
    assert np.all((feeds["input_ids"] == 0) == (mask == 0))
    assert feeds["input_ids"].max() < 50


def test_padding_does_not_change_a_sentence_embedding():
    session = _session(build_transformer(hidden=32, layers=1, heads=2, ffn=64, vocab=100))
    feeds = make_token_batch(4, 6, vocab=100, seed=1)
    padded = session.run(["sentence_embedding"], feeds)[0]
    shortest = int(np.argmin(feeds["attention_mask"].sum(axis=1)))
    length = int(feeds["attention_mask"][shortest].sum())
    alone = {key: value[shortest:shortest + 1, :length] for key, value in feeds.items()}
    np.testing.assert_allclose(session.run(["sentence_embedding"], alone)[0][0], padded[shortest],
                               atol=1e-5)


def test_low_rank_decay_concentrates_weight_energy():
    def top_quarter_energy(model):
        weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
        singular = np.linalg.svd(weights["encoder.layer.0.intermediate.dense.weight"], compute_uv=False)
        return np.sum(singular[: len(singular) // 4] ** 2) / np.sum(singular**2)

    assert top_quarter_energy(build_transformer(low_rank_decay=True)) > 0.8
    assert top_quarter_energy(build_transformer(low_rank_decay=False)) < 0.6
