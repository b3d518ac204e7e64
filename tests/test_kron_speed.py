"""Kronecker shapes chosen by error and measured speed (cost/kron_speed.py), and the fast fit behind it
(truncated SVD warm starts, KronFitter, growth stop). Timers are fakes that read the timed models' shapes, so the
choice is tested without timing anything."""

import json

import numpy as np
import onnx
import pytest
from builders import matmul_model, rel_error, run
from onnx import numpy_helper

import onnx_fwlr
from onnx_fwlr.cost.kron_speed import DEFAULT_ROWS, KronSpeed
from onnx_fwlr.methods.doping import dope_growing
from onnx_fwlr.methods.structured import (
    KronFitter,
    _rearranged,
    kron_energy_left,
    kron_macs,
    kron_params,
    nearest_kron,
    truncated_svd,
)
from onnx_fwlr.methods.structured_fit import MAX_MAC_SHARE, fast_candidates, fit_site


class ShapeTimer:
    """Fake OrtFormTimer: the dense model takes 1 ms; a structured one `rule(kind, dims, form, tokens)` ms, where
    kind is "kron" (dims (terms, m1, m2, n1, n2)) or "lowrank" (dims (rank,)) and form names the form's nodes."""

    def __init__(self, rule):
        self.rule, self.calls = rule, []

    def __call__(self, models, K, tokens):
        self.calls.append(tokens)
        return {label: self._time(model, tokens) for label, model in models.items()}

    def _time(self, model, tokens):
        shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        if "W" in shapes:
            return 1.0
        A, B = shapes["site/A"], shapes["site/B"]
        names = " ".join(n.name for n in model.graph.node)
        if len(A) == 3:
            return self.rule("kron", (A[0], A[1], B[1], A[2], B[2]), names, tokens)
        return self.rule("lowrank", (A[1],), names, tokens)


def refuse(*_):
    raise AssertionError("nothing should be timed here")


def weight(K, N, seed=0):
    """A trained-like weight: decaying spectrum plus a little noise."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(K, K)))
    V, _ = np.linalg.qr(rng.normal(size=(N, N)))
    s = 1.0 / (1.0 + np.arange(min(K, N)) / 8.0)
    return (U[:, : len(s)] * s) @ V[:, : len(s)].T + 0.01 * rng.normal(size=(K, N))


# ------------------------------------------------------------------------------------------ fast maths


def test_truncated_svd_is_near_optimal_on_a_large_matrix_cold_and_warm():
    """Subspace iteration is not LAPACK: on a slowly decaying spectrum the cold start's rank-k error is within
    1e-3 of the optimum (measured 2-3e-4), the leading values exact, and a warm start on a nearby matrix no worse."""
    rng = np.random.default_rng(0)
    R = weight(600, 500)

    def excess(M, k, start=None):
        U, sigma, Vt, basis = truncated_svd(M, k, start=start)
        exact = np.linalg.svd(M, compute_uv=False)
        np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
        np.testing.assert_allclose(sigma[:5], exact[:5], rtol=1e-8)
        return np.linalg.norm(M - (U * sigma) @ Vt) / np.sqrt(np.sum(exact[k:] ** 2)) - 1, basis

    cold, basis = excess(R, 20)
    assert basis is not None and 0 <= cold < 1e-3  # the iterative path (short side 500 > EXACT_SVD_SIDE)
    warm, _ = excess(R + 1e-3 * rng.normal(size=R.shape), 20, start=basis)
    assert 0 <= warm < cold + 1e-6


def test_kron_fitter_warm_starts_give_the_cold_answer():
    W = weight(512, 512, seed=1)
    shape, rng = (2, 256, 256, 2), np.random.default_rng(2)
    w = rng.uniform(0.3, 2.0, 512)  # general weights: ALS, warm-started after the first call
    fitter = KronFitter(shape, 12, row_weights=w)
    fitter(W)
    moved = W + 1e-3 * rng.normal(size=W.shape)
    warm, cold = fitter(moved), nearest_kron(moved, shape, 12, row_weights=w)
    err = lambda fit: np.linalg.norm(w[:, None] * (moved - fit.dense()))  # noqa: E731
    assert err(warm) <= err(cold) * (1 + 1e-3)
    plain = KronFitter(shape, 12)  # unweighted: the warm basis gives the exact optimum again
    plain(W)
    optimum = np.sqrt(np.sum(np.linalg.svd(_rearranged(moved, shape), compute_uv=False)[12:] ** 2))
    assert np.linalg.norm(moved - plain(moved).dense()) == pytest.approx(optimum, rel=1e-4)


def test_energy_estimate_never_undercounts_and_ranks_like_the_fit():
    W = weight(512, 512, seed=3)
    shapes = [(2, 256, 256, 2), (16, 32, 32, 16), (4, 128, 128, 4)]
    estimates = [kron_energy_left(W, s, 20) for s in shapes]
    truths = [np.sum(np.linalg.svd(_rearranged(W, s), compute_uv=False)[20:] ** 2) for s in shapes]
    for estimate, truth in zip(estimates, truths):
        assert truth * (1 - 1e-9) <= estimate <= truth * 1.05
    assert np.argsort(estimates).tolist() == np.argsort(truths).tolist()


def test_growth_stops_on_a_trained_like_weight_after_one_level():
    W = weight(256, 256, seed=4)
    sizes = []

    def approx_for(s):
        sizes.append(s)
        return KronFitter((16, 16, 16, 16), s)

    size, fit = dope_growing(W, approx_for, 20, 60, max_iter=5, tol=1e-4)
    assert sizes == [1, 20, 20] and size == 20  # level 1 gained < 10 %: straight to the full budget
    assert fit.history[-1] < np.linalg.norm(W)


# ------------------------------------------------------------------------------------------ candidates


def test_candidates_fit_the_budget_and_skip_shapes_with_too_many_multiply_adds():
    K = N = 1024
    available = 0.1 * K * N - 3 * 1049
    found = dict(fast_candidates(K, N, available))
    assert (32, 32, 32, 32) not in found  # the balanced shape needs 3x the dense multiply-adds at 49 terms
    assert found[(4, 256, 256, 4)] == 49
    for shape, terms in found.items():
        assert 1 <= terms and kron_params(shape, terms) <= available
        assert min(kron_macs(shape, terms)) <= MAX_MAC_SHARE * K * N


def test_the_lowest_error_shape_that_measures_faster_wins():
    rng = np.random.default_rng(5)
    shape = (8, 16, 16, 8)  # W is exactly 2 terms of this shape (+ noise): the lowest error by far
    W = sum(np.kron(rng.normal(size=(8, 16)), rng.normal(size=(16, 8))) for _ in range(2))
    W += 1e-3 * rng.normal(size=W.shape)
    fast = ShapeTimer(lambda kind, dims, form, tokens: 0.5)
    fit = fit_site(W, "kron", 0.08 * W.size, speed=KronSpeed((64,), timer=fast))
    assert fit.replacement.structure.shape4 == shape and fit.relative_error < 1e-2
    assert fit.speed.ratio == 0.5 and fast.calls == [64]  # the first candidate timed was fast enough
    slow_there = ShapeTimer(lambda kind, dims, form, tokens: 1.2 if dims[1:] == shape else 0.5)
    speed = KronSpeed((64,), timer=slow_there)
    other = fit_site(W, "kron", 0.08 * W.size, speed=speed)
    assert other.replacement.structure.shape4 != shape and other.relative_error > fit.relative_error
    assert len(slow_there.calls) == 2 and speed.rejected is None


def test_a_shape_a_little_too_slow_comes_back_with_fewer_terms():
    rng = np.random.default_rng(6)
    shape = (8, 16, 16, 8)  # W is exactly 3 terms of it (other shapes need more than the budget's 4-5 terms)
    W = sum(np.kron(rng.normal(size=(8, 16)), rng.normal(size=(16, 8))) for _ in range(3))
    W += 1e-3 * rng.normal(size=W.shape)
    timer = ShapeTimer(lambda kind, dims, form, tokens: 0.25 * dims[0] if dims[1:] == shape else 1.5)
    fit = fit_site(W, "kron", 0.08 * W.size, speed=KronSpeed((64,), timer=timer))  # the budget allows 5 terms
    assert fit.replacement.structure.shape4 == shape and fit.replacement.structure.A.shape[0] == 3
    assert fit.speed.ratio == 0.75 and fit.relative_error < 1e-2  # 5 terms at 1.25x, then 3 = 5 · 0.85 / 1.25


def test_no_shape_faster_says_so_and_returns_nothing():
    W = weight(128, 128)
    speed = KronSpeed((64,), timer=ShapeTimer(lambda kind, dims, form, tokens: 1.3))
    assert fit_site(W, "kron", 0.1 * W.size, speed=speed) is None
    assert "no Kronecker shape measured faster than the dense weight at 64 rows" in speed.rejected
    assert "1.30-1.30x" in speed.rejected


def test_measurements_are_cached_on_disk_only_for_a_given_folder(tmp_path):
    timer = ShapeTimer(lambda kind, dims, form, tokens: 0.6)
    in_memory = KronSpeed((8, 64), timer=timer)
    assert in_memory.path is None  # a fake timer never writes the machine's cache
    first = KronSpeed((8, 64), timer=timer, cache_dir=tmp_path)
    measured = first.measure(128, 128, (8, 16, 16, 8), 4, 10)
    assert measured.ratios == {8: 0.6, 64: 0.6} and sorted(timer.calls) == [8, 64]
    saved = json.loads(first.path.read_text())["ratios"]
    assert saved and all(v == 0.6 for v in saved.values())
    again = KronSpeed((8, 64), timer=refuse, cache_dir=tmp_path).measure(128, 128, (8, 16, 16, 8), 4, 10)
    assert again == measured


def test_the_form_is_the_fastest_at_the_worst_row_count():
    def rule(kind, dims, form, tokens):
        if "A_stack" in form:  # a_first: fastest at 64 rows, slower than dense at 2
            return 0.3 if tokens == 64 else 1.1
        return 0.6  # b_first: 0.6 at both

    speed = KronSpeed((2, 64), timer=ShapeTimer(rule))
    measured = speed.measure(128, 128, (8, 16, 16, 8), 4, 10)
    assert measured.form.order == "b_first" and measured.form.flat and measured.ratio == 0.6
    assert measured.ratios == {2: 0.6, 64: 0.6}
    assert {f.doping for f in speed._forms((8, 16, 16, 8), 4, 128, 128, 10)} == {"scatternd", "elements"}


# ------------------------------------------------------------------------------------------ through compress


def model_of(W):
    return matmul_model(W.astype(np.float32), x_shape=("batch", None))


def compressed_weight_error(model, out, K):
    x = np.random.default_rng(9).normal(size=(16, K)).astype(np.float32)
    return rel_error(run(model, {"x": x})[0], run(out, {"x": x})[0])


def test_compress_writes_the_timed_form_and_reports_both_times():
    W = weight(128, 128)
    model = model_of(W)
    timer = ShapeTimer(lambda kind, dims, form, tokens: 0.4 if kind == "kron" and "AxB_T" in form else 2.0)
    out, report = onnx_fwlr.compress(model, ratio=0.1, method="kron", dope=0.002, form_timer=timer,
                                     progress=False)
    (site,) = report.sites
    assert site.note.startswith("kron ") and "flat" in site.note
    assert "0.40x at 32 rows, 0.40x at 1024 rows the dense time (measured)" in site.note
    assert sorted(set(timer.calls)) == sorted(DEFAULT_ROWS)  # no data, no --shape: the default rows
    assert any(n.name.endswith("AxB_T") for n in out.graph.node)  # the flat form, as timed
    onnx.checker.check_model(out)
    assert compressed_weight_error(model, out, 128) < 1.0


def test_no_fast_shape_falls_back_to_low_rank_when_that_is_faster_else_dense():
    W = weight(128, 128)
    model = model_of(W)
    lowrank_fast = ShapeTimer(lambda kind, dims, form, tokens: 2.0 if kind == "kron" else 0.5)
    out, report = onnx_fwlr.compress(model, ratio=0.2, method="kron", form_timer=lowrank_fast, progress=False)
    (site,) = report.sites
    assert site.note.startswith("low rank ") and "no Kronecker shape measured faster" in site.note
    assert "low rank at the same budget instead" in site.note and site.rank is not None
    assert "W" not in {t.name for t in out.graph.initializer}
    everything_slow = ShapeTimer(lambda kind, dims, form, tokens: 2.0)
    out, report = onnx_fwlr.compress(model, ratio=0.2, method="kron", form_timer=everything_slow, progress=False)
    (site,) = report.sites
    assert site.rank is None and site.note.startswith("kept dense: kron: no Kronecker shape")
    assert "x the dense time" in site.note
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), W.astype(np.float32))


def test_rows_timed_are_the_deployment_shape():
    W = weight(128, 128)
    timer = ShapeTimer(lambda kind, dims, form, tokens: 0.5)
    onnx_fwlr.compress(model_of(W), ratio=0.1, method="kron", form_timer=timer, shapes={"x": [48, 128]},
                       progress=False)
    assert set(timer.calls) == {48}


def test_forced_or_balanced_shapes_time_nothing():
    W = weight(128, 128)
    for shape in ("balanced", (8, 16, 16, 8)):
        _, report = onnx_fwlr.compress(model_of(W), ratio=0.2, method="kron", kron_shape=shape, form_timer=refuse,
                                       progress=False)
        (site,) = report.sites
        assert site.note.startswith("kron ") and "measured" not in site.note
    assert report.budget["kron_shape"] == [8, 16, 16, 8]
