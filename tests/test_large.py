"""Large models: randomised SVD, the decomposition cache, worker processes, lazily loaded external data,
and calibration shards computed in separate processes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import external_base, load_model, save_model, tensor_array
from onnx_fwlr.methods import allocation as alloc
from onnx_fwlr.methods import lowrank as factorize
from onnx_fwlr.pipeline import prepare as api
from onnx_fwlr.pipeline.compress import Budget, build, choose_ranks, compress, prepare
from onnx_fwlr.stats.activations import activation_plan, gram_groups
from onnx_fwlr.stats.store import Statistics, activation_key

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "sample_models"
RNG = np.random.default_rng(7)


def decaying(K, N, scale, rng=RNG):
    """U diag(exp(-i/scale)) Vᵀ with random orthonormal U, V: a spectrum like trained weights."""
    r = min(K, N)
    U, _ = np.linalg.qr(rng.standard_normal((K, r)))
    V, _ = np.linalg.qr(rng.standard_normal((N, r)))
    return (U * np.exp(-np.arange(r) / scale)) @ V.T


def mlp(widths, seed=0):
    """x [B, widths[0]] -> MatMul chain with decaying-spectrum weights; returns the model."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        inits.append(numpy_helper.from_array(decaying(k, n, 12, rng).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", widths[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", widths[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


# --- randomised SVD ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (160, 400)])
def test_randomized_matches_exact_on_decaying_spectra(shape):
    W = decaying(*shape, scale=15)
    left = factorize.diagonal_scaling(RNG.uniform(0.5, 2.0, shape[0]))
    exact = factorize.weighted_svd(W, left)
    fast = factorize.randomized_weighted_svd(W, 30, left, seed=3)
    assert not fast.exact and fast.max_rank == 30
    # Stated tolerance: singular values to 1e-6 relative, relative errors to 1e-6 absolute, the rank-r
    # product to 1e-3 of ‖W‖_F (the last kept directions converge slowest).
    np.testing.assert_allclose(fast.s, exact.s[:30], rtol=1e-6)
    assert fast.total == pytest.approx(exact.total, rel=1e-12)  # ‖PWQ‖_F² is exact, no SVD needed
    for rank in (5, 15, 30):
        assert abs(fast.relative_error(rank) - exact.relative_error(rank)) < 1e-6
        A, B = fast.factors(rank)
        A0, B0 = exact.factors(rank)
        assert np.linalg.norm(A @ B - A0 @ B0) < 1e-3 * np.linalg.norm(W)
    with pytest.raises(ValueError):
        fast.factors(31)


def test_randomized_is_reproducible_and_seeded():
    W = decaying(200, 150, scale=10)
    a = factorize.randomized_weighted_svd(W, 12, seed=1)
    b = factorize.randomized_weighted_svd(W, 12, seed=1)
    assert a.U.tobytes() == b.U.tobytes() and a.Vt.tobytes() == b.Vt.tobytes()


def test_auto_rule():
    assert not factorize.use_randomized(4096, 4096, None, "auto")  # rank unknown (global allocation)
    assert factorize.use_randomized(2048, 8192, 512, "auto")
    assert not factorize.use_randomized(2048, 8192, 513, "auto")
    assert not factorize.use_randomized(512, 512, 16, "auto")  # too small to pay
    assert factorize.use_randomized(512, 512, 16, "randomized")
    assert not factorize.use_randomized(4096, 4096, 8, "exact")
    with pytest.raises(Exception, match="`svd`"):
        factorize.use_randomized(10, 10, 2, "fast")


# --- the decomposition cache -------------------------------------------------------------------------


def test_cache_reuses_randomized_for_lower_ranks_and_recomputes_for_higher(monkeypatch):
    calls = []
    real = api.iter_decompositions

    def counting(model, sites, *args, **kwargs):
        calls.append({s.weight: kwargs["ranks"].get(s.weight) for s in sites})
        return real(model, sites, *args, **kwargs)

    monkeypatch.setattr(api, "iter_decompositions", counting)
    prepared = prepare(mlp([256, 256, 256]), method="svd", svd="randomized", progress=False)
    assert calls == []  # nothing decomposed before the ranks are known
    build(prepared, [40, 40], "uniform", Budget(rank=40))
    build(prepared, [10, 40], "uniform", Budget(rank=10))
    assert len(calls) == 1  # lower ranks come from the cached rank-40 sketch
    build(prepared, [60, None], "uniform", Budget(rank=60))
    assert calls[1] == {"w0": 60}  # only the site that needs more is recomputed
    assert prepared.decompositions["w0"].max_rank == 60 and prepared.decompositions["w1"].max_rank == 40


def test_exact_sweep_over_budgets_decomposes_once(monkeypatch):
    calls = []
    real = api.iter_decompositions
    monkeypatch.setattr(api, "iter_decompositions", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepared = prepare(mlp([128, 96, 64]), method="svd", svd="exact", progress=False)
    for ratio in (0.2, 0.6, 0.4, 0.9):
        build(prepared, choose_ranks(prepared, Budget(ratio=ratio), "uniform"), "uniform", Budget(ratio=ratio))
    assert len(calls) == 1


def test_exact_decomposition_keeps_only_components_a_saving_rank_can_use():
    prepared = prepare(mlp([128, 96, 64]), method="svd", svd="exact", progress=False)
    assert not prepared.decompositions  # nothing is decomposed before it is needed
    api.ensure_decompositions(prepared)
    dec = prepared.decompositions["w0"]
    assert dec.max_rank == alloc.break_even_rank(128, 96) and len(dec.s) == 96  # spectrum whole, vectors not
    W = prepared.weights["w0"]
    full = factorize.weighted_svd(W)
    for rank in (1, 30, dec.max_rank):
        for kept, whole in zip(dec.factors(rank), full.factors(rank)):
            np.testing.assert_array_equal(kept, whole)
        assert dec.relative_error(rank) == full.relative_error(rank)
    with pytest.raises(ValueError, match="up to rank"):
        dec.factors(dec.max_rank + 1)


def _two_heads(hidden=64):
    """x feeds two MatMuls (like Q and K), whose outputs are added: two sites reading one input."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(decaying(hidden, hidden, 8, rng).astype(np.float32), name) for name in ("q", "k")]
    nodes = [helper.make_node("MatMul", ["x", "q"], ["hq"]), helper.make_node("MatMul", ["x", "k"], ["hk"]),
             helper.make_node("Add", ["hq", "hk"], ["y"])]
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("method", ["whiten", "kfac"])
def test_sites_reading_one_input_share_its_scaling(method):
    calib = [{"x": RNG.standard_normal((32, 64)).astype(np.float32)}]
    prepared = prepare(_two_heads(), method=method, calibration=calib, svd="exact", progress=False)
    api.ensure_decompositions(prepared)
    q, k = prepared.decompositions["q"], prepared.decompositions["k"]
    assert q.left is k.left and q.left.chol is not None  # one Cholesky factor, not one per site
    if method == "kfac":  # the output side is each weight's own
        assert q.right is not k.right and q.right.chol is not None


def test_one_shot_build_drops_decompositions_and_writes_the_same_bytes():
    calib = [{"x": RNG.standard_normal((32, 64)).astype(np.float32)}]
    outputs = []
    for keep in (True, False):
        prepared = prepare(_two_heads(), method="whiten", calibration=calib, svd="exact", progress=False)
        ranks = choose_ranks(prepared, Budget(ratio=0.4), "uniform")
        model, report = build(prepared, ranks, "uniform", Budget(ratio=0.4), keep_decompositions=keep)
        assert bool(prepared.decompositions) == keep
        assert all(site.relative_error is not None for site in report.sites)
        outputs.append(model.SerializeToString())
    assert outputs[0] == outputs[1]


# --- worker processes ------------------------------------------------------------------------------


def test_two_workers_write_the_same_bytes(tmp_path):
    model = mlp([300, 200, 300, 100])
    outputs = []
    for workers in (1, 2):
        compressed, _ = compress(model, ratio=0.3, svd="randomized", workers=workers, progress=False)
        outputs.append(compressed.SerializeToString())
    assert outputs[0] == outputs[1]


# --- external data, lazily loaded -------------------------------------------------------------------


def test_external_data_round_trip_lazily(tmp_path):
    source = tmp_path / "src" / "m.onnx"
    source.parent.mkdir()
    model = mlp([64, 48, 32])
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # onnx.save_model moves the data out of the proto it is given
    onnx.save_model(on_disk, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    lazy = load_model(source, lazy=True)
    assert external_base(lazy) == source.parent.resolve()
    assert all(len(t.raw_data) == 0 for t in lazy.graph.initializer)  # structure only in memory
    np.testing.assert_array_equal(tensor_array(lazy, lazy.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))

    calib = {"x": RNG.standard_normal((64, 64)).astype(np.float32)}
    lazy_out, _ = compress(lazy, ratio=0.5, method="whiten", calibration=[calib], progress=False)
    eager_out, _ = compress(model, ratio=0.5, method="whiten", calibration=[calib], progress=False)

    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "c.onnx.data"
    stale.write_bytes(b"x" * 10_000_000)  # a stale data file must be replaced, not appended to
    out = save_model(lazy_out, tmp_path / "out" / "c.onnx")
    written = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"c.onnx.data"}
    assert not any(p.key.startswith("onnx_fwlr") for p in written.metadata_props)
    assert stale.stat().st_size < 1_000_000
    onnx.checker.check_model(str(out))
    x = {"x": RNG.standard_normal((5, 64)).astype(np.float32)}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    want = ort.InferenceSession(eager_out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(got, want)
    assert not list(source.parent.glob(".fwlr-session-*"))  # temporary session files are removed


def test_bias_correction_folds_into_biases_stored_on_disk(tmp_path):
    """MatMul + Add(bias) (PyTorch's Linear) and Gemm with C, every constant in external data, loaded
    lazily: folding the bias correction reads those biases from the file (it used to crash)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(decaying(64, 48, 8, rng).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b0"),
             numpy_helper.from_array(decaying(48, 32, 8, rng).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "c1")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Add", ["h", "b0"], ["hb"], name="fc0_bias"),
             helper.make_node("Gemm", ["hb", "w1", "c1"], ["y"], name="fc1")]
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    source = tmp_path / "m.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)
    onnx.save_model(on_disk, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    calib = [{"x": (rng.standard_normal((8, 64)) + 1.0).astype(np.float32)} for _ in range(4)]  # non-zero mean
    lazy_out, report = compress(load_model(source, lazy=True), ratio=0.3, method="whiten", calibration=calib,
                                progress=False)
    eager_out, _ = compress(model, ratio=0.3, method="whiten", calibration=calib, progress=False)
    assert report.factorised == 2
    assert "Add" in report.ops_before and report.ops_after["Add"] == report.ops_before["Add"]  # folded, not added
    out = save_model(lazy_out, tmp_path / "c.onnx")
    x = {"x": calib[0]["x"]}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    want = ort.InferenceSession(eager_out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(got, want)


def _write_huge_model(folder: Path, bulk_bytes: int) -> Path:
    """A model with `bulk_bytes` of zero-filled embedding tables (written sparsely) and two real 512x512
    MatMul weights, all in one external data file."""
    hidden, rows = 512, 8192
    table_bytes = rows * hidden * 4
    tables = bulk_bytes // table_bytes + 1
    data_path = folder / "big.onnx.data"
    inits, offset = [], 0
    rng = np.random.default_rng(0)
    with open(data_path, "wb") as data:
        for i in range(2):
            w = decaying(hidden, hidden, 20, rng).astype(np.float32)
            data.seek(offset)
            data.write(w.tobytes())
            inits.append(_external(f"w{i}", [hidden, hidden], offset, w.nbytes))
            offset += w.nbytes
        for i in range(tables):
            inits.append(_external(f"table{i}", [rows, hidden], offset, table_bytes))
            offset += table_bytes
        data.truncate(offset)  # sparse: the zeros take no disk space
    nodes = [helper.make_node("Gather", [f"table{i}", "ids"], [f"e{i}"]) for i in range(tables)]
    total = "e0"
    for i in range(1, tables):
        nodes.append(helper.make_node("Add", [total, f"e{i}"], [f"s{i}"]))
        total = f"s{i}"
    nodes += [helper.make_node("MatMul", [total, "w0"], ["h"], name="fc0"),
              helper.make_node("MatMul", ["h", "w1"], ["y"], name="fc1")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = folder / "big.onnx"
    onnx.save_model(model, str(path))
    return path


def _external(name, dims, offset, length):
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


@pytest.mark.slow
def test_model_over_2gb_compresses_in_bounded_memory(tmp_path):
    size = 2_200_000_000
    path = _write_huge_model(tmp_path, size)
    out = tmp_path / "out.onnx"
    # The child reports its own high-water mark (VmHWM starts afresh at exec; RUSAGE_CHILDREN would be the
    # largest of every child this test session ran, and ru_maxrss survives fork+exec).
    probe = ("import runpy, sys\n"
             "sys.argv = ['onnx-fwlr'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('onnx_fwlr', run_name='__main__')\n"
             "except SystemExit as stop:\n    code = stop.code\n"
             "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
             "print('peak_kb', hwm.split()[1], file=sys.stderr)\n"
             "sys.exit(code)\n")
    run = subprocess.run([sys.executable, "-c", probe, "compress", str(path), "-o", str(out), "--ratio", "0.25",
                          "--method", "svd", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    peak_bytes = int(run.stderr.split("peak_kb")[-1].split()[0]) * 1024
    assert peak_bytes < size / 5, f"peak RSS {peak_bytes / 1e6:.0f} MB for a {size / 1e9:.1f} GB model"
    onnx.checker.check_model(str(out))
    written = onnx.load(str(out), load_external_data=False)
    names = {t.name for t in written.graph.initializer}
    assert "w0" not in names and "w0/factor_A" in names
    assert os.path.getsize(str(out) + ".data") > size  # the untouched tables are carried over
    assert {p.name for p in tmp_path.iterdir()} == {"big.onnx", "big.onnx.data", "out.onnx", "out.onnx.data"}


# --- Grams over the memory limit: calibration in groups -------------------------------------------------


def test_gram_groups_cut_in_site_order_and_keep_a_site_whole():
    prepared = prepare(mlp([64, 48, 32, 16]), method="svd", progress=False)
    plan = activation_plan(prepared.model, prepared.sites)
    keys = [activation_key(s.uses[0]) for s in prepared.sites]
    assert gram_groups(prepared.sites, plan, 12 * (64**2 + 48**2)) == [keys[:2], keys[2:]]  # 12 B per entry
    assert gram_groups(prepared.sites, plan, 1) == [[k] for k in keys]  # each over the limit: a group alone
    assert gram_groups(prepared.sites, plan, 10**9) == [keys]


@pytest.mark.parametrize("options", [{}, {"sequential": True}, {"dope": 0.05}],
                         ids=["closed-form", "sequential", "doped"])
def test_grouped_calibration_gives_the_same_model_one_pass_per_group(options):
    model = mlp([64, 48, 32, 16])
    calib = [{"x": RNG.standard_normal((40, 64)).astype(np.float32)} for _ in range(3)]
    one_pass, one_report = compress(model, ratio=0.4, method="whiten", calibration=calib, progress=False, **options)
    grouped, report = compress(model, ratio=0.4, method="whiten", calibration=calib, stats_memory=1, progress=False,
                               **options)
    assert grouped.SerializeToString() == one_pass.SerializeToString()
    assert report.calibration["groups"] == 3 and report.calibration["passes"] == 3  # each group read once
    assert report.calibration["samples"] == one_report.calibration["samples"] == 120
    assert "passes" not in one_report.calibration


def test_grouped_statistics_remeasure_a_dropped_gram_and_refuse_to_be_saved(tmp_path):
    model = mlp([64, 48, 32])
    calib = [{"x": RNG.standard_normal((40, 64)).astype(np.float32)}]
    prepared = prepare(model, method="whiten", calibration=calib, stats_memory=1, progress=False)
    stats = prepared.stats
    first, second = prepared.sites
    gram = stats.input_gram(first)
    stats.input_gram(second)  # drops the first group's Gram
    assert "gram" not in stats.activations[activation_key(first.uses[0])]
    np.testing.assert_array_equal(stats.input_gram(first), gram)  # measured again, identically
    assert stats.meta["passes"] == 3
    with pytest.raises(FwlrError, match="`stats_memory`"):
        stats.save(tmp_path / "s.npz")


# --- calibration shards in separate processes --------------------------------------------------------


def test_shards_from_separate_processes_merge_to_a_single_run(tmp_path):
    model, calib = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_calib.npz"
    common = [sys.executable, "-m", "onnx_fwlr", "calibrate", str(model), "--calib", str(calib), "--quiet"]
    jobs = [subprocess.Popen(common + ["-o", str(tmp_path / f"{name}.npz")] + shard, cwd=ROOT,
                             stderr=subprocess.PIPE)
            for name, shard in (("a", ["--shard", "0/2"]), ("b", ["--shard", "1/2"]), ("whole", []))]
    for job in jobs:
        assert job.wait() == 0, job.stderr.read()
    merged = Statistics.load(tmp_path / "a.npz").merge(Statistics.load(tmp_path / "b.npz"))
    whole = Statistics.load(tmp_path / "whole.npz")
    assert merged.activations.keys() == whole.activations.keys()
    for key, fields in whole.activations.items():
        for name, value in fields.items():
            np.testing.assert_allclose(merged.activations[key][name], value, rtol=1e-12, atol=1e-9)
    assert merged.meta["samples"] == whole.meta["samples"]
