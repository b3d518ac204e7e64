"""Fitting one site with a structure under a parameter budget: Kronecker sums, low rank, either doped.

    fit = fit_site(W, "kron", budget_params=0.25 * W.size, row_weights=w, dope=0.01)
    fit.replacement   # structured.Structured, for rewrite.apply_factors
    fit.params, fit.bytes, fit.error, fit.relative_error, fit.description

Parameters are counted as stored numbers: factor entries + doping values + two indices (row, column)
per doping entry; `bytes` counts values at the weight's item size and indices at their real width
(int32). Doping takes k = round(dope · K · N) entries first (3k parameters), the structure gets the rest:
as many Kronecker terms / as high a rank as fit.

The error metric (squared, like the low-rank path's dropped energy):
  - gram given (E[x xᵀ], the whiten statistics): ‖Lᵀ(W − W')‖² with L Lᵀ = gram, the expected squared
    output error. Low rank is the exact whitened SVD; doping values are exact for their support
    (support chosen by √diag(gram)); Kronecker fits use the diagonal weights √diag(gram) and are only
    measured in the full metric (approximate).
  - row_weights w (e.g. √E[x_i²], asvd; √Fisher row, fwsvd): ‖diag(w)(W − W')‖²; low rank and doping
    steps exact, Kronecker exact for weights that factor over the split, otherwise ALS (see structured).
  - neither: the plain Frobenius norm.
All methods of one call share the metric, so `fit_best` compares like with like.

Pure numpy/scipy: no ONNX here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods import lowrank, registry
from onnx_fwlr.methods.doping import dope_growing, gram_error
from onnx_fwlr.methods.structured import (
    KronFitter,
    KronSum,
    LowRank,
    Structured,
    doping_params,
    kron_energy_left,
    kron_macs,
    kron_params,
    kron_shapes,
    nearest_kron,
    truncated_svd,
)

STRUCTURES = ("lowrank", "kron")
SHAPE_CANDIDATES = 4  # most balanced Kronecker shapes tried per site (without a speed measure)
BALANCED = "balanced"  # kron_shape: the SHAPE_CANDIDATES most balanced shapes by error alone (no speed measure)
MAX_MAC_SHARE = 0.75  # shapes needing more multiply-adds per row than this share of the dense op's are not timed
MAX_INTERMEDIATE = 16  # nor orders whose intermediate exceeds this many × (K + N) floats per row (as cost.forms)
MAX_TIMED = 4  # candidates timed per site, in order of error, before the site gives up on Kronecker
FEWER_TERMS_TARGET = 0.85  # a candidate too slow is tried again with terms × this / its measured ratio
ALS_TOL = 1e-4  # a cold weighted ALS stops when a sweep gains less than this (relative), as the doping rounds do


@dataclass
class SiteFit:
    replacement: Structured
    structure: str  # "lowrank" | "kron"
    params: int  # factor entries + doping values + doping indices
    bytes: int  # values at the weight's item size, indices at their own width
    error: float  # squared error in the call's metric
    relative_error: float  # √(error / same metric of W): the relative Frobenius error, not squared
    description: str
    speed: object = None  # cost.kron_speed.Speed when the shape was chosen by measured speed (its form included)


class _Metric:
    """The weighting shared by every fit of one site: full Gram, diagonal row weights, or none."""

    def __init__(self, K: int, row_weights=None, gram=None):
        self.chol = None
        self.w = None
        if gram is not None:
            gram = np.asarray(gram, dtype=np.float64)
            if gram.shape != (K, K):
                raise FwlrError(f"the input Gram is {gram.shape} but the weight has K={K} rows; pass this site's Gram.")
            scaling = lowrank.gram_scaling(gram)
            self.scaling = scaling
            self.chol = scaling.chol if scaling.chol is not None else np.diag(scaling.diag)
            self.w = np.linalg.norm(self.chol, axis=1)
        elif row_weights is not None:
            self.w = lowrank.diagonal_scaling(np.asarray(row_weights, dtype=np.float64).reshape(-1)).diag
            if self.w.shape[0] != K:
                raise FwlrError(f"row_weights has {self.w.shape[0]} entries but the weight has K={K} rows.")

    def error(self, E: np.ndarray) -> float:
        """Squared error of the difference E."""
        if self.chol is not None:
            return gram_error(E, self.chol) ** 2
        if self.w is not None:
            return float(np.sum((self.w[:, None] * E) ** 2))
        return float(np.sum(E**2))

    def low_rank_fitter(self, rank: int):
        """Nearest rank-`rank` in this metric for a sequence of nearby matrices (the doping rounds): the truncated
        SVD of the weighted matrix, warm-started from the previous round's basis (structured.truncated_svd)."""
        scaling = self.scaling if self.chol is not None else (
            None if self.w is None else lowrank.Scaling(diag=self.w))
        basis = None

        def fit(M: np.ndarray) -> LowRank:
            nonlocal basis
            scaled = M if scaling is None else scaling.apply_left(np.asarray(M, dtype=np.float64))
            U, sigma, Vt, basis = truncated_svd(scaled, rank, basis)
            root = np.sqrt(sigma)
            A = U * root
            return LowRank(A if scaling is None else scaling.solve_left(A), root[:, None] * Vt)

        return fit

    def kron(self, M: np.ndarray, shape, terms: int) -> KronSum:
        return nearest_kron(M, shape, terms, row_weights=self.w)

    def kron_fitter(self, shape, terms: int) -> KronFitter:
        """A fitter for a sequence of nearby matrices (the doping rounds), each warm-started from the last. Its cold
        ALS stops when a sweep gains less than ALS_TOL: measured on a 1024² weight, all of 20 sweeps gain < 7e-4."""
        return KronFitter(shape, terms, row_weights=self.w, tol=ALS_TOL)

    def dope(self, W: np.ndarray, approx_for, size: int, k: int, max_iter: int, tol: float):
        """(size used, DopedFit) of doping.dope_growing in this metric."""
        if self.chol is not None:
            return dope_growing(W, approx_for, size, k, max_iter=max_iter, tol=tol, gram_chol=self.chol)
        return dope_growing(W, approx_for, size, k, row_weights=self.w, max_iter=max_iter, tol=tol)


def doping_count(K: int, N: int, fraction: float) -> int:
    """k = round(fraction · K · N) doping entries."""
    if not 0.0 <= fraction < 1.0:
        raise FwlrError(
            f"`dope` {fraction} is out of range; give the fraction of entries to keep, 0 <= f < 1 (e.g. 0.01)."
        )
    return int(round(fraction * K * N))


def fit_site(
    W: np.ndarray,
    structure: str,
    budget_params: float,
    *,
    row_weights=None,
    gram=None,
    dope: float = 0.0,
    kron_shape: tuple[int, int, int, int] | None = None,
    itemsize: int = 4,
    max_iter: int = 30,
    tol: float = 1e-4,
    speed=None,
) -> SiteFit | None:
    """The best `structure` ("lowrank" | "kron") for W [K, N] within budget_params stored numbers.

    None when nothing fits: the doping alone takes the budget, not even one term / rank 1 fits, or the
    budget is at least K·N (the dense weight is then both exact and no larger). Kronecker shapes: the
    forced kron_shape (m1, m2, n1, n2), else (or with kron_shape "balanced") the SHAPE_CANDIDATES most balanced of
    kron_shapes(K, N),
    keeping the one with the lowest undoped error at its largest affordable number of terms.
    Doping alternates (structure ← fit of W − D, D ← top-k of the residual) for at most max_iter rounds,
    stopping when a round gains less than tol (relative); the convergence is linear, so an exactly
    doped-structured W needs a few tens of rounds while real weights plateau after a few. The structure
    is grown from one term / rank 1 (doping.dope_growing), so a W that is exactly a structure of up to
    8 terms (rank 8) plus k sparse entries can be recovered, with the terms it needs; the plain alternation
    at the full budget is one of the candidates, so the result is never worse than it.

    speed (cost.kron_speed.KronSpeed; not with kron_shape): the shape and term count are chosen among every
    divisor split by error and measured time instead: the candidates few enough multiply-adds allow, ranked by a
    quick estimate of their error in this metric, are timed in that order (cached), and the first that runs
    faster than the dense weight at every deployment row count is fitted, in the form it was timed in. None
    when none does (speed.rejected then says why).
    """
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise FwlrError(f"expected a 2-D weight [K, N], got shape {W.shape}.")
    if structure not in STRUCTURES:
        raise FwlrError(f"unknown structure '{structure}'; choose one of {', '.join(STRUCTURES)}.")
    K, N = W.shape
    if budget_params >= K * N:
        return None
    metric = _Metric(K, row_weights, gram)
    k = doping_count(K, N, dope)
    available = budget_params - 3 * k
    timed = None
    if structure == "lowrank":
        size = min(int(available // (K + N)), min(K, N))
        if size < 1:
            return None
        fit_for = metric.low_rank_fitter
        name = lambda s: f"low rank {s}"  # noqa: E731
    else:
        if speed is not None and kron_shape is None:
            choice = _fast_kron_choice(W, metric, available, speed, k)
        else:
            choice = _kron_choice(W, metric, available, kron_shape)
        if choice is None:
            return None
        shape, size, timed = choice
        fit_for = lambda s: metric.kron_fitter(shape, s)  # noqa: E731
        m1, m2, n1, n2 = shape
        name = lambda s: f"kron {s}x({m1}x{n1} ⊗ {m2}x{n2})"  # noqa: E731
    if k == 0:
        replacement, label = Structured(fit_for(size)(W)), name(size)
    else:
        size, doped = metric.dope(W, fit_for, size, k, max_iter, tol)
        replacement = Structured(doped.structure, doped.doping)
        label = name(size) + f" + {k} doped ({k / (K * N):.2%})"
    fit = _site_fit(W, replacement, structure, metric, itemsize, label)
    fit.speed = timed  # when the growth kept fewer terms than were timed, they run no slower
    return fit


def _kron_choice(W, metric: _Metric, available: float, kron_shape):
    """(shape, terms) with the lowest undoped error among the candidate shapes, or None if none fits."""
    K, N = W.shape
    if kron_shape is not None and kron_shape != BALANCED:
        shape = tuple(int(v) for v in kron_shape)
        m1, m2, n1, n2 = shape
        if m1 * m2 != K or n1 * n2 != N:
            raise FwlrError(
                f"`kron_shape` {m1}x{m2},{n1}x{n2} does not factor a [{K}x{N}] weight: "
                f"need m1*m2 = {K} and n1*n2 = {N}."
            )
        candidates = [shape]
    else:
        candidates = kron_shapes(K, N)[:SHAPE_CANDIDATES]
    best = None
    for shape in candidates:
        m1, m2, n1, n2 = shape
        terms = min(int(available // kron_params(shape, 1)), m1 * n1, m2 * n2)
        if terms < 1:
            continue
        error = metric.error(W - metric.kron(W, shape, terms).dense())
        if best is None or error < best[0]:
            best = (error, shape, terms)
    return None if best is None else (*best[1:], None)


def _fast_kron_choice(W, metric: _Metric, available: float, speed, k: int):
    """(shape, terms, Speed) of the lowest-error candidate that measures faster than the dense weight, or None
    with speed.rejected saying why (cost.kron_speed: timing, cache). A candidate a little too slow comes back
    with fewer terms (time is about linear in them: aimed at FEWER_TERMS_TARGET × dense), ranked again by its error,
    so the shape and the number of terms are chosen together."""
    K, N = W.shape
    speed.rejected = None
    candidates = fast_candidates(K, N, available)
    if not candidates:
        speed.rejected = ("no Kronecker shape of this weight at this budget needs fewer multiply-adds than the "
                          "dense weight's")
        return None
    scaled = W if metric.w is None else metric.w[:, None] * W

    def ranked(shape, terms):
        return kron_energy_left(scaled, shape, terms), kron_params(shape, terms), shape, terms

    queue = sorted(ranked(*c) for c in candidates)
    timed = []
    bar = speed.bar(MAX_TIMED, "time shapes")
    try:
        while queue and len(timed) < MAX_TIMED:
            _, _, shape, terms = queue.pop(0)
            measured = speed.measure(K, N, shape, terms, k)
            bar.update()
            if measured.faster():
                return shape, terms, measured
            timed.append(measured.ratio)
            fewer = int(terms * FEWER_TERMS_TARGET / measured.ratio)
            if 1 <= fewer < terms and fast_orders(shape, fewer, K, N):
                bisect.insort(queue, ranked(shape, fewer))
    finally:
        bar.close()
    speed.rejected = (f"no Kronecker shape measured faster than the dense weight at {speed.describe_rows()}: the "
                      f"{len(timed)} with the lowest error took {min(timed):.2f}-{max(timed):.2f}x its time")
    return None


def _site_fit(W, replacement: Structured, structure: str, metric: _Metric, itemsize: int, label: str) -> SiteFit:
    K, N = W.shape
    k = replacement.nnz
    doping = doping_params(k, K, N)
    error = metric.error(W - replacement.dense())
    total = metric.error(W)
    return SiteFit(
        replacement=replacement,
        structure=structure,
        params=replacement.params,
        bytes=(replacement.factor_entries + k) * itemsize + doping.index_bytes,
        error=error,
        relative_error=float(np.sqrt(error / total)) if total > 0 else 0.0,
        description=label,
    )


def fit_best(W: np.ndarray, structures, budget_params: float, **options) -> SiteFit | None:
    """Fit each candidate structure under one budget and metric; keep the lowest error (ties: fewer params).

    `structures` is a list of STRUCTURES names (the API maps low-rank methods such as whiten to "lowrank").
    """
    fits = [fit for fit in (fit_site(W, s, budget_params, **options) for s in dict.fromkeys(structures)) if fit]
    return min(fits, key=lambda f: (f.error, f.params), default=None)


def fit_structured_site(
    W: np.ndarray,
    structures,
    budget_params: float,
    *,
    method: str = "svd",
    input_gram=None,
    fisher_row=None,
    mean_input=None,
    dope: float = 0.0,
    kron_shape=None,
    itemsize: int = 4,
    speed=None,
) -> SiteFit | None:
    """fit_best in the metric of the low-rank `method` (registry.structured_metric); with mean_input (E[x]) the
    replacement also gets the bias correction shift = E[x]ᵀ (W − W'), exact in expectation."""
    fit = fit_best(
        W,
        structures,
        budget_params,
        dope=dope,
        kron_shape=kron_shape,
        itemsize=itemsize,
        speed=speed,
        **registry.structured_metric(method, input_gram, fisher_row),
    )
    if fit is not None and mean_input is not None:
        fit.replacement.shift = np.asarray(mean_input, dtype=np.float64) @ (
            np.asarray(W, np.float64) - fit.replacement.dense()
        )
    return fit


def fast_orders(shape, terms: int, K: int, N: int) -> list[str]:
    """Contraction orders ('b_first', 'a_first': structured.kron_macs) whose multiply-adds per row are at most
    MAX_MAC_SHARE of the dense op's and whose intermediate is at most MAX_INTERMEDIATE × (K + N) floats."""
    m1, m2, n1, n2 = shape
    macs = dict(zip(("b_first", "a_first"), kron_macs(shape, terms)))
    intermediate = {"b_first": terms * m1 * n2, "a_first": terms * m2 * n1}
    return [o for o in ("b_first", "a_first")
            if macs[o] <= MAX_MAC_SHARE * K * N and intermediate[o] <= MAX_INTERMEDIATE * (K + N)]


def fast_candidates(K: int, N: int, available: float) -> list[tuple[tuple[int, int, int, int], int]]:
    """(shape, terms) worth timing for a [K, N] weight with `available` stored numbers for the structure: every
    divisor split with at least one term and a contraction order in fast_orders. Terms: as many as fit."""
    found = []
    for shape in kron_shapes(K, N):
        m1, m2, n1, n2 = shape
        terms = min(int(available // kron_params(shape, 1)), m1 * n1, m2 * n2)
        if terms >= 1 and fast_orders(shape, terms, K, N):
            found.append((shape, terms))
    return found
