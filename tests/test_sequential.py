"""Sequential error correction: depths, the ridge solution's optimality, and the never-worse rule."""

import numpy as np
import onnx
import pytest
from builders import make_model, rel_error, run, vinfo
from onnx import helper, numpy_helper

import onnx_fwlr
from onnx_fwlr.methods import lowrank as factorize
from onnx_fwlr.pipeline.sequential import _objective, _ridge_solution, correct_site, site_depths
from onnx_fwlr.rewrite.lowrank import Factors
from onnx_fwlr.sites.find import find_sites


def chain_model(widths, seed=0):
    """x -> MatMul -> Relu -> MatMul -> Relu -> ... with decaying-spectrum weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        U, _ = np.linalg.qr(rng.standard_normal((k, k)))
        V, _ = np.linalg.qr(rng.standard_normal((n, n)))
        s = np.exp(-np.arange(min(k, n)) / 6.0)
        W = (U[:, : len(s)] * s) @ V[: len(s)] * 3
        inits.append(numpy_helper.from_array(W.astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return make_model(nodes, [vinfo("x", ["batch", widths[0]])], [vinfo("y", ["batch", widths[-1]])], inits)


def gram_sums(X_new, X_old):
    return {"gram_new": X_new.T @ X_new, "cross": X_new.T @ X_old, "gram_old": X_old.T @ X_old,
            "sum_new": X_new.sum(0), "sum_old": X_old.sum(0)}


def test_depths_follow_the_chain():
    model = chain_model([12, 10, 8, 6])
    sites, _ = find_sites(model)
    assert site_depths(model, sites) == {"W0": 0, "W1": 1, "W2": 2}


def test_objective_from_sums_equals_the_direct_norm():
    rng = np.random.default_rng(1)
    X_old = rng.standard_normal((200, 7))
    X_new = X_old + 0.1 * rng.standard_normal((200, 7))
    W, Wp = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    Q = factorize.gram_scaling(np.cov(rng.standard_normal((5, 40))))
    direct = np.linalg.norm(Q.apply_right(X_new @ Wp - X_old @ W)) ** 2
    assert _objective(gram_sums(X_new, X_old), W, Wp, Q) == pytest.approx(direct, rel=1e-10)


def test_ridge_solution_is_the_least_squares_fit_at_full_rank_and_tiny_ridge():
    rng = np.random.default_rng(2)
    X_old = rng.standard_normal((300, 6))
    X_new = X_old @ (np.eye(6) + 0.2 * rng.standard_normal((6, 6)))
    W = rng.standard_normal((6, 4))
    A, B = _ridge_solution(gram_sums(X_new, X_old), W, rank=4, ridge=1e-12, right=None)
    least_squares = np.linalg.lstsq(X_new, X_old @ W, rcond=None)[0]
    assert rel_error(least_squares, A @ B) < 1e-6


def test_ridge_solution_beats_every_rank_r_truncation_of_the_target():
    """The closed form is optimal for its objective: random rank-r perturbations never do better."""
    rng = np.random.default_rng(3)
    X_old = rng.standard_normal((400, 8)) * np.linspace(3, 0.2, 8)
    X_new = X_old + 0.3 * rng.standard_normal((400, 8))
    W = rng.standard_normal((8, 6))
    sums, ridge, rank = gram_sums(X_new, X_old), 0.1, 3
    scale = np.mean(np.diag(sums["gram_new"]))

    def penalised(Wp):
        return _objective(sums, W, Wp, None) + ridge * scale * np.sum((Wp - W) ** 2)

    A, B = _ridge_solution(sums, W, rank, ridge, None)
    best = penalised(A @ B)
    for _ in range(50):
        dA, dB = 0.05 * rng.standard_normal(A.shape), 0.05 * rng.standard_normal(B.shape)
        assert penalised((A + dA) @ (B + dB)) >= best - 1e-9 * best


def test_correct_site_never_worse_than_its_start_on_held_back_sums():
    rng = np.random.default_rng(4)
    X_old = rng.standard_normal((500, 10))
    X_new = X_old + 0.5 * rng.standard_normal((500, 10))
    W = rng.standard_normal((10, 10))
    fit, held = gram_sums(X_new[:250], X_old[:250]), gram_sums(X_new[250:], X_old[250:])
    dec = factorize.weighted_svd(W)
    A0, B0 = dec.factors(4)
    A, B, ridge, before, after = correct_site(fit, held, W, Factors(A0, B0), 4, None)
    assert after <= before
    assert ridge is not None and after < before  # the upstream error is large: correction must pay here


def test_sequential_reduces_the_output_error_of_a_chain():
    model = chain_model([32, 48, 48, 16])
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((64, 32)).astype(np.float32)} for _ in range(10)]
    test_x = rng.standard_normal((256, 32)).astype(np.float32)
    reference = run(model, {"x": test_x})[0]
    errors = {}
    for sequential in (False, True):
        small, report = onnx_fwlr.compress(model, ratio=0.35, method="whiten", calibration=calib,
                                           sequential=sequential, progress=False)
        onnx.checker.check_model(small, full_check=True)
        errors[sequential] = rel_error(reference, run(small, {"x": test_x})[0])
    assert errors[True] < errors[False]
    assert all("sequential" in s.note for s in report.sites if s.rank is not None)


def test_sequential_needs_calibration_data():
    model = chain_model([12, 10, 8])
    rng = np.random.default_rng(6)
    stats = onnx_fwlr.calibrate(model, [{"x": rng.standard_normal((16, 12)).astype(np.float32)}], progress=False)
    with pytest.raises(onnx_fwlr.FwlrError, match="`calibration`"):
        onnx_fwlr.compress(model, ratio=0.5, method="whiten", stats=stats, sequential=True, progress=False)


def test_factors_do_not_depend_on_how_much_data_was_summed():
    """Sums scale with the data; the factors must not (refine's Adam is sensitive to the A/B balance)."""
    rng = np.random.default_rng(7)
    X_old = rng.standard_normal((300, 8))
    X_new = X_old + 0.2 * rng.standard_normal((300, 8))
    W = rng.standard_normal((8, 6))
    sums = gram_sums(X_new, X_old)
    A1, B1 = _ridge_solution(sums, W, 3, 0.01, None)
    A2, B2 = _ridge_solution({k: 1000.0 * v for k, v in sums.items()}, W, 3, 0.01, None)
    assert rel_error(A1, A2) < 1e-8 and rel_error(B1, B2) < 1e-8


def test_original_rows_kept_across_depths_give_the_same_factors(monkeypatch):
    """One run of the original for several depths (the default) or one per depth (a budget of 0 bytes): the
    corrected factors and the report are the same."""
    from onnx_fwlr.pipeline import sequential

    model = chain_model([16, 14, 12, 10, 8])
    rng = np.random.default_rng(9)
    calib = [{"x": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(6)]
    options = dict(ratio=0.4, method="whiten", calibration=calib, sequential=True, progress=False)
    windows = []
    real_window = sequential._window
    monkeypatch.setattr(sequential, "_window", lambda *a, **k: windows.append(real_window(*a, **k)) or windows[-1])
    shared, shared_report = onnx_fwlr.compress(model, **options)
    assert [len(w) for w, _ in windows] == [1, 3]  # the first depth alone, then the rest from one run
    windows.clear()
    monkeypatch.setattr(sequential, "_window", lambda *a, **k: windows.append(real_window(*a[:5], budget=0))
                        or windows[-1])
    alone, alone_report = onnx_fwlr.compress(model, **options)
    assert [len(w) for w, _ in windows] == [1, 1, 1, 1]
    assert [s.note for s in shared_report.sites] == [s.note for s in alone_report.sites]
    for a, b in zip(shared.graph.initializer, alone.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)
