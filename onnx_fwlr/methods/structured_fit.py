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

from dataclasses import dataclass

import numpy as np

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods import lowrank, registry
from onnx_fwlr.methods.doping import dope_growing, gram_error
from onnx_fwlr.methods.structured import (
    KronSum,
    LowRank,
    Structured,
    doping_params,
    kron_params,
    kron_shapes,
    nearest_kron,
    nearest_low_rank,
)

STRUCTURES = ("lowrank", "kron")
SHAPE_CANDIDATES = 4  # most balanced Kronecker shapes tried per site


@dataclass
class SiteFit:
    replacement: Structured
    structure: str  # "lowrank" | "kron"
    params: int  # factor entries + doping values + doping indices
    bytes: int  # values at the weight's item size, indices at their own width
    error: float  # squared error in the call's metric
    relative_error: float  # √(error / same metric of W): the relative Frobenius error, not squared
    description: str


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

    def low_rank(self, M: np.ndarray, rank: int) -> LowRank:
        if self.chol is not None:
            A, B = lowrank.weighted_svd(M, left=self.scaling).factors(rank)
            return LowRank(A, B)
        return nearest_low_rank(M, rank, row_weights=self.w)

    def kron(self, M: np.ndarray, shape, terms: int) -> KronSum:
        return nearest_kron(M, shape, terms, row_weights=self.w)

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
) -> SiteFit | None:
    """The best `structure` ("lowrank" | "kron") for W [K, N] within budget_params stored numbers.

    None when nothing fits: the doping alone takes the budget, not even one term / rank 1 fits, or the
    budget is at least K·N (the dense weight is then both exact and no larger). Kronecker shapes: the
    forced kron_shape (m1, m2, n1, n2), else the SHAPE_CANDIDATES most balanced of kron_shapes(K, N),
    keeping the one with the lowest undoped error at its largest affordable number of terms.
    Doping alternates (structure ← fit of W − D, D ← top-k of the residual) for at most max_iter rounds,
    stopping when a round gains less than tol (relative); the convergence is linear, so an exactly
    doped-structured W needs a few tens of rounds while real weights plateau after a few. The structure
    is grown from one term / rank 1 (doping.dope_growing), so a W that is exactly a structure of up to
    8 terms (rank 8) plus k sparse entries can be recovered, with the terms it needs; the plain alternation
    at the full budget is one of the candidates, so the result is never worse than it.
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
    if structure == "lowrank":
        size = min(int(available // (K + N)), min(K, N))
        if size < 1:
            return None
        fit_for = lambda s: lambda M: metric.low_rank(M, s)  # noqa: E731
        name = lambda s: f"low rank {s}"  # noqa: E731
    else:
        choice = _kron_choice(W, metric, available, kron_shape)
        if choice is None:
            return None
        shape, size = choice
        fit_for = lambda s: lambda M: metric.kron(M, shape, s)  # noqa: E731
        m1, m2, n1, n2 = shape
        name = lambda s: f"kron {s}x({m1}x{n1} ⊗ {m2}x{n2})"  # noqa: E731
    if k == 0:
        replacement, label = Structured(fit_for(size)(W)), name(size)
    else:
        size, doped = metric.dope(W, fit_for, size, k, max_iter, tol)
        replacement = Structured(doped.structure, doped.doping)
        label = name(size) + f" + {k} doped ({k / (K * N):.2%})"
    return _site_fit(W, replacement, structure, metric, itemsize, label)


def _kron_choice(W, metric: _Metric, available: float, kron_shape):
    """(shape, terms) with the lowest undoped error among the candidate shapes, or None if none fits."""
    K, N = W.shape
    if kron_shape is not None:
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
    return None if best is None else best[1:]


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
        **registry.structured_metric(method, input_gram, fisher_row),
    )
    if fit is not None and mean_input is not None:
        fit.replacement.shift = np.asarray(mean_input, dtype=np.float64) @ (
            np.asarray(W, np.float64) - fit.replacement.dense()
        )
    return fit
