"""Decoder language models at scale: the LM head's output-side estimator, Fisher statistics one group of sites
per pass, spilled decompositions, tied embeddings (docs/llm.md, "Memory and K-FAC at scale").

The models are tools/make_random_llama.py's LLaMA-shaped decoders (GQA, SwiGLU, RMSNorm, rotary embeddings),
written with external data.
"""

import gc
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from llama_builder import TINY, build_tiny, write_tiny_calibration

from onnx_fwlr import compress
from onnx_fwlr.autodiff import losses
from onnx_fwlr.io import model as modelio
from onnx_fwlr.io.data import open_data
from onnx_fwlr.methods import lowrank
from onnx_fwlr.methods.registry import input_scaling, output_scaling
from onnx_fwlr.pipeline import decompose
from onnx_fwlr.pipeline.defaults import gradient_obstacle
from onnx_fwlr.pipeline.prepare import ensure_decompositions, prepare
from onnx_fwlr.sites.find import find_sites, weight_matrix
from onnx_fwlr.sites.tied import find_ties
from onnx_fwlr.stats.fisher import GroupedFisherStatistics, collect_fisher_stats, fisher_stats_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{tie: (model path, calibration path)} for tie in copy / transpose / none."""
    folder = tmp_path_factory.mktemp("llama")
    calib = write_tiny_calibration(folder)
    return {tie: (build_tiny(folder / f"llama_{tie}.onnx", tie), calib) for tie in ("copy", "transpose", "none")}


def run(path, calib):
    data = np.load(calib)
    return ort.InferenceSession(str(path)).run(["logits"], {k: data[k] for k in data.files})[0]


# --- the estimator ------------------------------------------------------------------------------------


def test_sketch_is_exact_up_to_its_rank_and_never_exceeds_the_gram_beyond():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 30))
    gram = rows.T @ rows
    exact = losses.fold_sketch(np.zeros((0, 30)), rows, rank=64)  # rank above the rows: nothing is cut
    np.testing.assert_allclose(exact.T @ exact, gram, atol=1e-10)
    cut = losses.fold_sketch(np.zeros((0, 30)), rows, rank=8)
    assert cut.shape == (8, 30)
    assert np.linalg.eigvalsh(gram - cut.T @ cut).min() > -1e-9  # what is dropped is positive semi-definite
    top = np.linalg.eigvalsh(gram)[::-1][:8].sum()
    assert np.trace(cut.T @ cut) <= top + 1e-9 and np.trace(cut.T @ cut) > 0.7 * top


def test_low_rank_diagonal_weighting_is_a_square_root_of_the_estimated_gram():
    rng = np.random.default_rng(1)
    factor, diagonal = rng.standard_normal((5, 20)), rng.uniform(1.0, 2.0, 20) * 10
    Q = lowrank.low_rank_diagonal_scaling(factor, diagonal)
    residual = np.maximum(diagonal - (factor**2).sum(0), 0) + 1e-4 * diagonal.mean()
    W = rng.standard_normal((7, 20))
    WQ = Q.apply_right(W)
    np.testing.assert_allclose(WQ @ WQ.T, W @ (factor.T @ factor + np.diag(residual)) @ W.T, rtol=1e-10)
    np.testing.assert_allclose(Q.solve_right(WQ), W, atol=1e-10)


def test_estimator_memory_is_linear_in_the_vocabulary_and_independent_of_the_tokens():
    vocab, rank = 16384, 32  # wider than SKETCH_MIN_DIM: sketched
    assert losses.sketched(vocab) and not losses.sketched(4096)
    rng = np.random.default_rng(2)
    acc = {}
    for _ in range(3):  # 3 batches of 2 samples x 40 positions = 240 gradient rows, far above the rank
        X = rng.standard_normal((2, 40, 8)).astype(np.float32)
        G = rng.standard_normal((2, 40, vocab)).astype(np.float32)
        losses.accumulate_fisher(acc, X, G, sketch_rank=rank)
    assert "grad_gram" not in acc
    held = sum(np.asarray(v).nbytes for v in acc.values())
    assert acc["grad_sketch"].shape == (rank, vocab)
    assert held <= 8 * ((rank + 2) * vocab + 8) + 64
    assert losses.output_stat_bytes(49152) == 8 * (losses.SKETCH_RANK + 1) * 49152  # 101 MB, not 19 GB
    assert losses.output_stat_bytes(49152) < 49152**2 * 8 / 150
    assert losses.sketch_peak_bytes(49152) < 4 * losses.output_stat_bytes(49152)


def test_kfac_with_the_estimator_agrees_with_exact_kfac_on_a_small_vocabulary(models):
    path, calib = models["none"]
    model = modelio.load_model(path)
    head = next(s for s in find_sites(model)[0] if s.N == TINY["vocab"])
    batches = open_data(str(calib), model, batch_size=4)
    exact = collect_fisher_stats(model, [head], batches, loss="lm", progress=False)
    assert "grad_gram" in exact.gradients[head.weight]
    W = weight_matrix(model, head)
    left = input_scaling("kfac", head, exact)
    gram = exact.output_grad_gram(head)
    damped = gram + 1e-4 * np.mean(np.diag(gram)) * np.eye(head.N)
    reference = lowrank.weighted_svd(W, left, output_scaling("kfac", head, exact))

    def exact_metric_error(dec, rank):
        E = W - np.matmul(*dec.factors(rank))
        return float(np.einsum("kn,kn->", E @ damped, E))

    # a sketch as wide as the vocabulary holds the whole Gram: the same factors as exact K-FAC
    full = collect_fisher_stats(model, [head], batches, loss="lm", progress=False, sketch_min_dim=1,
                                sketch_rank=head.N)
    assert "grad_gram" not in full.gradients[head.weight]
    dec = lowrank.weighted_svd(W, left, output_scaling("kfac", head, full))
    np.testing.assert_allclose(dec.s, reference.s, rtol=1e-6)
    A, B = dec.factors(8)
    A0, B0 = reference.factors(8)
    np.testing.assert_allclose(A @ B, A0 @ B0, atol=1e-6 * np.abs(W).max())
    # a quarter of the vocabulary: within 5 % of exact K-FAC's error, judged in the exact metric
    small = collect_fisher_stats(model, [head], batches, loss="lm", progress=False, sketch_min_dim=1,
                                 sketch_rank=head.N // 4)
    approx = lowrank.weighted_svd(W, left, output_scaling("kfac", head, small))
    for rank in (4, 8, 16):
        assert exact_metric_error(approx, rank) <= 1.05 * exact_metric_error(reference, rank)


# --- bounded memory: groups, spilled decompositions, no fallback ----------------------------------------


def test_grouped_fisher_passes_give_the_one_pass_model(models):
    path, calib = models["none"]
    options = dict(ratio=0.6, calibration=str(calib), progress=False)
    one, one_report = compress(str(path), **options)
    per_group, report = compress(str(path), stats_memory=200_000, **options)
    assert (report.method, report.allocation, report.calibration["loss"]) == ("kfac", "global", "lm")
    assert report.calibration["passes"] == 1 and report.calibration["groups"] > 2  # one pass, set aside on disk
    assert report.calibration["set_aside_bytes"] > 0
    assert "passes" not in one_report.calibration
    assert per_group.SerializeToString() == one.SerializeToString()


def test_backward_that_drops_values_and_hands_over_cotangents_computes_the_same_numbers(models):
    """GradientRunner.backward's `consume` (forward values dropped after their last reader) and `emit` (each
    cotangent handed over when complete): what the recorded pass uses to hold less at once."""
    from onnx_fwlr.stats import fisher

    path, calib = models["none"]
    model = modelio.load_model(path)
    sites = find_sites(model)[0]
    feed, _ = next(iter(open_data(str(calib), model, batch_size=32)))
    _, target, _, _, runner = fisher._gradient_setup(model, sites, None)
    values = runner.forward(feed)
    seed = np.random.default_rng(0).standard_normal(values[target.tensor].shape).astype(np.float32)
    expected = runner.backward(dict(values), seed)
    handed, order = {}, []
    consumed = dict(values)
    assert runner.backward(consumed, seed, consume=True, emit=lambda n, g: (handed.setdefault(n, g),
                                                                           order.append(n))) == {}
    assert sorted(order) == sorted(expected) and len(order) == len(set(order))  # each once
    for name, cotangent in expected.items():
        np.testing.assert_array_equal(handed[name], cotangent)
    size = sum(a.nbytes for name, a in values.items() if name != target.tensor)
    assert sum(a.nbytes for name, a in consumed.items() if name != target.tensor) < 0.1 * size  # read ones gone
    assert order.index(sites[-1].uses[0].output) < order.index(sites[0].uses[0].output)  # the last layer's first


def test_a_large_model_holds_half_its_weights_of_statistics_by_default(models, monkeypatch):
    """Above LAZY_THRESHOLD bytes of weights the default `stats_memory` is half the weights' bytes: the groups
    cost no extra pass, and the model is the one a single in-memory pass gives."""
    from onnx_fwlr.pipeline import prepare as prepare_module

    path, calib = models["none"]
    options = dict(ratio=0.6, calibration=str(calib), progress=False)
    one, _ = compress(str(path), stats_memory=1 << 40, **options)
    model = modelio.load_model(path)
    sites = find_sites(model)[0]
    assert fisher_stats_bytes(sites) > prepare_module.model_weight_bytes(model) // 2
    monkeypatch.setattr(prepare_module, "LAZY_THRESHOLD", 0)
    grouped, report = compress(str(path), **options)
    assert report.calibration["groups"] > 1 and report.calibration["passes"] == 1
    assert grouped.SerializeToString() == one.SerializeToString()


def test_no_fallback_when_the_statistics_only_fit_a_group_at_a_time(models):
    path, calib = models["none"]
    model = modelio.load_model(path)
    sites = find_sites(model)[0]
    limit = max(fisher_stats_bytes([s]) for s in sites)
    assert fisher_stats_bytes(sites) > 3 * limit
    assert gradient_obstacle(model, sites, {}, limit) is None
    assert "one of its weights" in gradient_obstacle(model, sites, {}, limit - 1)
    prepared = prepare(model, method="kfac", calibration=str(calib), stats_memory=limit, progress=False)
    assert isinstance(prepared.stats, GroupedFisherStatistics)


@pytest.fixture
def spill_everything(tmp_path, monkeypatch):
    """Every decomposition spilled, and temporary files made in a folder of the test's own (returned)."""
    monkeypatch.setattr(decompose, "SPILL_BYTES", 0)
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_spilled_decompositions_give_the_same_factors_and_leave_nothing_behind(models, monkeypatch, spill_everything):
    path, calib = models["none"]
    options = dict(ratio=0.6, calibration=str(calib), progress=False)
    with monkeypatch.context() as unspilled:
        unspilled.setattr(decompose, "SPILL_BYTES", 1 << 40)
        kept, _ = compress(str(path), **options)
    prepared = prepare(str(path), method="kfac", calibration=str(calib), progress=False)
    ensure_decompositions(prepared)
    assert all(isinstance(d, decompose.SpilledDecomposition) for d in prepared.decompositions.values())
    assert not list(spill_everything.iterdir())  # the factors' file has no name: nothing to remove, nothing to leak
    spilled, report = compress(str(path), **options)
    assert report.allocation == "global"
    assert not list(spill_everything.iterdir())
    before = {t.name: onnx.numpy_helper.to_array(t) for t in kept.graph.initializer}
    for tensor in spilled.graph.initializer:
        np.testing.assert_allclose(onnx.numpy_helper.to_array(tensor), before[tensor.name], rtol=1e-4, atol=1e-6)


def test_spilled_factors_outlive_their_prepared_and_a_cleanup_of_the_temporary_folder(models, monkeypatch,
                                                                                        spill_everything):
    """The FileNotFoundError seen once on SmolLM2 ('/tmp/onnx-fwlr-factors-*/…_A.npy' while decompositions were
    spilled): the factors were named files in a folder that anyone's cleanup of /tmp could remove, and that went
    with the Prepared object even while a decomposition still needed it."""
    path, calib = models["none"]
    with monkeypatch.context() as unspilled:
        unspilled.setattr(decompose, "SPILL_BYTES", 1 << 40)
        reference = prepare(str(path), method="kfac", calibration=str(calib), progress=False)
        ensure_decompositions(reference)
    prepared = prepare(str(path), method="kfac", calibration=str(calib), progress=False)
    ensure_decompositions(prepared)
    held = dict(prepared.decompositions)
    del prepared
    gc.collect()
    shutil.rmtree(spill_everything)  # another process cleaning the temporary folder
    for weight, dec in held.items():
        assert isinstance(dec, decompose.SpilledDecomposition)
        want = reference.decompositions[weight].factors(dec.max_rank)
        for got, expected in zip(dec.factors(dec.max_rank), want):
            np.testing.assert_array_equal(got, expected.astype(np.float32).astype(np.float64))
        rank = max(1, dec.max_rank // 2)  # a lower rank reads the leading rows of the same numbers
        np.testing.assert_array_equal(dec.factors(rank)[0], dec.factors(dec.max_rank)[0][:, :rank])
        np.testing.assert_array_equal(dec.factors(rank)[1], dec.factors(dec.max_rank)[1][:rank])


def test_a_large_build_keeps_its_factors_on_disk(models, monkeypatch):
    """The build holds the model it writes and one site's factors (pipeline.build._FactorStore): the same bytes."""
    from onnx_fwlr.pipeline import build as build_module

    path, calib = models["copy"]
    options = dict(ratio=0.6, calibration=str(calib), progress=False)
    held, _ = compress(str(path), **options)
    stored = []
    monkeypatch.setattr(build_module, "spill_needed", lambda sites: stored.append(len(sites)) or True)
    spilled, _ = compress(str(path), **options)
    assert stored and spilled.SerializeToString() == held.SerializeToString()


def test_a_model_above_protobufs_limit_is_measured_without_serialising_it():
    """The 1.1 B decoder compressed at 0.8 holds 3.5 GB of factors in memory: ByteSize raised EncodeError at the
    end of save_model (after the files were written). message_bytes measures the structure without the tensors'
    bytes and adds their encoded size (tests/test_save.py checks it equals ByteSize and allocates no copy)."""
    small = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert modelio.message_bytes(small) == small.ByteSize()
    big = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [
        onnx.numpy_helper.from_array(np.zeros(1 << 20, np.float32), "w")]))
    copy, extra = modelio.structure_copy(big)
    assert extra >= 4 << 20 and copy.ByteSize() < 1000
    assert modelio.message_bytes(big) == big.ByteSize()


def test_lazily_loaded_external_data_streams_to_the_same_model(models, monkeypatch):
    path, calib = models["copy"]
    options = dict(ratio=0.6, calibration=str(calib), progress=False, stats_memory=200_000)
    eager, _ = compress(str(path), **options)
    monkeypatch.setattr(modelio, "LAZY_THRESHOLD", 0)
    lazy, report = compress(str(path), **options)
    assert report.calibration["groups"] > 1
    assert modelio.external_base(lazy) is not None  # weights still on disk, read per site
    out = Path(path).with_name("lazy_out.onnx")
    modelio.save_model(lazy, out)
    eager_out = Path(path).with_name("eager_out.onnx")
    modelio.save_model(eager, eager_out, external_data=True)
    np.testing.assert_array_equal(run(out, calib), run(eager_out, calib))


# --- tied embeddings ---------------------------------------------------------------------------------


def test_a_head_copying_its_table_is_stored_once_and_said_so(models, tmp_path):
    path, calib = models["copy"]
    model = modelio.load_model(path)
    ties = find_ties(model, find_sites(model)[0])
    assert [(t.head, t.table) for t in ties] == [("lm_head.weight", "model.embed_tokens.weight")]
    compressed, report = compress(str(path), ratio=1.0, calibration=str(calib), progress=False)
    assert len(report.tied) == 1 and "stored once" in report.tied[0] and "lm_head.weight" in report.tied[0]
    assert "tied" in report.format() and "tied" in report.to_dict()
    assert all(s.weight != "lm_head.weight" for s in report.sites)  # not factorised, not budgeted
    names = {t.name for t in compressed.graph.initializer}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    params = TINY["vocab"] * TINY["hidden"]
    assert report.model_params_before - report.model_params_after == params  # the copy's numbers, counted once
    out = tmp_path / "tied.onnx"
    modelio.save_model(compressed, out)
    np.testing.assert_array_equal(run(out, calib), run(path, calib))


def test_only_an_equal_copy_counts_as_tied(models):
    for tie in ("transpose", "none"):  # Transpose(table) is no site; an independent head is no tie
        path, calib = models[tie]
        model = modelio.load_model(path)
        assert find_ties(model, find_sites(model)[0]) == []
        _, report = compress(str(path), ratio=0.8, calibration=str(calib), progress=False)
        assert report.tied == [] and "tied" not in report.to_dict()
    _, skipped = find_sites(modelio.load_model(models["transpose"][0]))
    assert any("tied head, stored once" in s.reason for s in skipped if s.node == "/lm_head/MatMul")
    model = modelio.load_model(models["copy"][0])
    head = next(t for t in model.graph.initializer if t.name == "lm_head.weight")
    values = onnx.numpy_helper.to_array(head).copy()
    values[0, 0] += 1.0
    head.CopyFrom(onnx.numpy_helper.from_array(values, head.name))
    assert find_ties(model, find_sites(model)[0]) == []


def test_a_gemm_head_with_trans_b_reads_the_table_itself(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    table = rng.standard_normal((40, 12)).astype(np.float32)
    hidden = rng.standard_normal((12, 12)).astype(np.float32) / 4
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "Wh"], ["h"], name="proj"),
             helper.make_node("Gemm", ["h", "head"], ["logits"], name="head_gemm", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 40])],
                              [numpy_helper.from_array(table, "E"), numpy_helper.from_array(hidden, "Wh"),
                               numpy_helper.from_array(table.copy(), "head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    ties = find_ties(model, find_sites(model)[0])
    assert [(t.head, t.table, t.node) for t in ties] == [("head", "E", "head_gemm")]
    calib = [{"ids": rng.integers(0, 40, size=(16,))}]
    out, report = compress(model, ratio=1.0, calibration=calib, progress=False)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert list(gemm.input) == ["h", "E"] and "Transpose" not in {n.op_type for n in out.graph.node}
    assert [t.name for t in out.graph.initializer] == ["E", "Wh"] and len(report.tied) == 1
    feed = {"ids": np.arange(40, dtype=np.int64)}
    np.testing.assert_array_equal(ort.InferenceSession(out.SerializeToString()).run(None, feed)[0],
                                  ort.InferenceSession(model.SerializeToString()).run(None, feed)[0])
