"""Doped structured matrices, post-training form: W ≈ S + D.

S is structured (a sum of Kronecker products Σ_s A_s ⊗ B_s, or low rank A B) and D is an extremely
sparse "doping" matrix holding the few entries the structure cannot express (Thakker et al., MLSys 2021).
Convention as in ONNX MatMul: y = x @ W with W [K, N]; the Kronecker convention is numpy.kron, so
W[i1*m2 + i2, j1*n2 + j2] = Σ_s A_s[i1, j1] B_s[i2, j2] with A_s [m1, n1], B_s [m2, n2].

Errors are measured in the row-weighted Frobenius norm ‖diag(w) (W − W')‖_F, where w [K] weights the
input features (e.g. √E[x_i²]); w = None means all ones. `dope` also takes a full input Gram metric
‖Lᵀ (W − W')‖_F with L Lᵀ = E[x xᵀ] (the expected output error), see there for what is exact.

Pure numpy; no ONNX here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_fwlr.errors import FwlrError


@dataclass(frozen=True)
class KronSum:
    """Σ_s A[s] ⊗ B[s] with A [terms, m1, n1] and B [terms, m2, n2]."""

    A: np.ndarray
    B: np.ndarray

    @property
    def shape4(self) -> tuple[int, int, int, int]:
        """(m1, m2, n1, n2)."""
        return (self.A.shape[1], self.B.shape[1], self.A.shape[2], self.B.shape[2])

    def dense(self) -> np.ndarray:
        m1, m2, n1, n2 = self.shape4
        # sum_s kron(A_s, B_s), written as one einsum over the 4-index view.
        return np.einsum("sac,sbd->abcd", self.A, self.B).reshape(m1 * m2, n1 * n2)


@dataclass(frozen=True)
class LowRank:
    """A @ B with A [K, r] and B [r, N]."""

    A: np.ndarray
    B: np.ndarray

    def dense(self) -> np.ndarray:
        return self.A @ self.B


@dataclass(frozen=True)
class Coo:
    """A sparse [K, N] matrix as coordinates: D[rows[i], cols[i]] = vals[i]; sorted row-major, no repeats."""

    rows: np.ndarray  # int64 [nnz]
    cols: np.ndarray  # int64 [nnz]
    vals: np.ndarray  # float [nnz]
    shape: tuple[int, int]

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.float64)
        out[self.rows, self.cols] = self.vals
        return out


@dataclass
class Structured:
    """One site's replacement W' = structure + doping, and an optional output shift (bias correction).

    This is what the graph rewrite turns into ONNX nodes computing y = x @ W' (+ shift).
    """

    structure: KronSum | LowRank
    doping: Coo | None = None
    shift: np.ndarray | None = None  # [N], added to x @ W'

    def dense(self) -> np.ndarray:
        out = self.structure.dense()
        if self.doping is not None and len(self.doping.vals):
            out = out + self.doping.dense()
        return out

    @property
    def nnz(self) -> int:
        return 0 if self.doping is None else len(self.doping.vals)

    @property
    def factor_entries(self) -> int:
        return int(self.structure.A.size + self.structure.B.size)

    @property
    def params(self) -> int:
        """Stored numbers: factor entries + doping values + two indices per doping entry."""
        return self.factor_entries + 3 * self.nnz


@dataclass(frozen=True)
class DopedFit:
    """Result of `dope`: W ≈ structure.dense() + doping.dense().

    history[t] is the weighted error ‖diag(w)(W − S − D)‖_F after accepted iteration t (non-increasing);
    the returned pair is the one of the last entry.
    """

    structure: object
    doping: Coo
    history: list[float]


@dataclass(frozen=True)
class DopingParams:
    """Storage of k doping entries: k values plus 2k indices (a row and a column per entry)."""

    values: int
    indices: int
    index_dtype: str  # "int32" when K and N are below 2**31, else "int64"
    index_bytes: int


# ---------------------------------------------------------------------------------------------------
# Shapes and costs


def _divisor_pairs(n: int) -> list[tuple[int, int]]:
    return [(d, n // d) for d in range(1, n + 1) if n % d == 0]


def kron_shapes(K: int, N: int) -> list[tuple[int, int, int, int]]:
    """Candidate (m1, m2, n1, n2) with K = m1·m2, N = n1·n2, most balanced first.

    A trivial split (1·K or K·1) of a dimension is used only when that dimension has no other (K prime or
    1), and a pair where A or B would be a single number (no structure at all) is never listed unless
    nothing else exists. Order: |log m1/m2| + |log n1/n2|, then fewest one-term parameters m1·n1 + m2·n2.
    """
    if K < 1 or N < 1:
        raise FwlrError(f"Kronecker shapes need positive dimensions, got K={K}, N={N}; pass the weight's real shape.")

    def splits(n: int) -> list[tuple[int, int]]:
        pairs = _divisor_pairs(n)
        nontrivial = [p for p in pairs if 1 not in p]
        return nontrivial or pairs

    combos = [(m1, m2, n1, n2) for m1, m2 in splits(K) for n1, n2 in splits(N)]
    structured = [c for c in combos if c[0] * c[2] > 1 and c[1] * c[3] > 1]
    candidates = structured or combos

    def key(c: tuple[int, int, int, int]):
        m1, m2, n1, n2 = c
        balance = abs(math.log(m1 / m2)) + abs(math.log(n1 / n2))
        return (round(balance, 12), m1 * n1 + m2 * n2, m1, n1)

    return sorted(candidates, key=key)


def kron_params(shape: tuple[int, int, int, int], terms: int) -> int:
    """Parameters of a sum of `terms` Kronecker products: terms·(m1·n1 + m2·n2)."""
    m1, m2, n1, n2 = shape
    return terms * (m1 * n1 + m2 * n2)


def low_rank_params(K: int, N: int, rank: int) -> int:
    """Parameters of A [K, r] @ B [r, N]: r·(K + N)."""
    return rank * (K + N)


def index_dtype_for(K: int, N: int) -> np.dtype:
    """int32 when every index fits (K, N < 2**31), else int64."""
    return np.dtype(np.int32) if max(K, N) < 2**31 else np.dtype(np.int64)


def doping_params(k: int, K: int, N: int) -> DopingParams:
    """k values + 2k indices; index bytes counted with the narrowest index type that fits."""
    dtype = index_dtype_for(K, N)
    return DopingParams(values=k, indices=2 * k, index_dtype=dtype.name, index_bytes=2 * k * dtype.itemsize)


def kron_macs(shape: tuple[int, int, int, int], terms: int) -> tuple[int, int]:
    """Multiply-adds per input row of y = x @ Σ A_s⊗B_s for the two contraction orders (FLOPs = 2×).

    Returns (b_first, a_first):
      b_first = s·m1·n2·(m2 + n1)   (x[m1,m2] @ B_s -> [m1,n2], then A_sᵀ @ · -> [n1,n2])
      a_first = s·m2·n1·(m1 + n2)   (A_sᵀ @ x -> [n1,m2], then · @ B_s -> [n1,n2])
    A dense row costs K·N; low rank r·(K + N); doping adds nnz.
    """
    m1, m2, n1, n2 = shape
    return terms * m1 * n2 * (m2 + n1), terms * m2 * n1 * (m1 + n2)


# ---------------------------------------------------------------------------------------------------
# Errors and weights


def checked_row_weights(row_weights, K: int) -> np.ndarray | None:
    """Validate w [K]; weights below 1e-8·max(w) are raised to that floor so every fit stays defined."""
    if row_weights is None:
        return None
    w = np.asarray(row_weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != K:
        raise FwlrError(
            f"row_weights has {w.shape[0]} entries but the weight has K={K} rows; pass one weight per input feature."
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise FwlrError("row_weights must be finite, non-negative and not all zero; check the calibration statistics.")
    return np.maximum(w, 1e-8 * w.max())


def weighted_error(W: np.ndarray, approx: np.ndarray, row_weights=None) -> float:
    """‖diag(w)(W − approx)‖_F (plain Frobenius norm when row_weights is None)."""
    diff = np.asarray(W, dtype=np.float64) - approx
    w = checked_row_weights(row_weights, diff.shape[0])
    if w is not None:
        diff = w[:, None] * diff
    return float(np.linalg.norm(diff))


# ---------------------------------------------------------------------------------------------------
# Nearest Kronecker sum


def _check_kron_args(W: np.ndarray, shape, terms: int) -> None:
    if W.ndim != 2:
        raise FwlrError(f"Expected a 2-D weight [K, N], got shape {W.shape}; reshape it first.")
    m1, m2, n1, n2 = shape
    if m1 * m2 != W.shape[0] or n1 * n2 != W.shape[1]:
        raise FwlrError(
            f"Kronecker shape {tuple(shape)} does not factor W {W.shape}; pick one from kron_shapes(K, N)."
        )
    if not 1 <= terms <= min(m1 * n1, m2 * n2):
        raise FwlrError(f"terms must be between 1 and {min(m1 * n1, m2 * n2)} for shape {tuple(shape)}, got {terms}.")


def _plain_nearest_kron(W: np.ndarray, shape, terms: int) -> KronSum:
    """Van Loan–Pitsianis: Σ A_s⊗B_s is rank-`terms` in the rearranged R, so a truncated SVD is optimal."""
    m1, m2, n1, n2 = shape
    R = W.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    U, sigma, Vt = np.linalg.svd(R, full_matrices=False)
    root = np.sqrt(sigma[:terms])
    A = (U[:, :terms] * root).T.reshape(terms, m1, n1)
    B = (Vt[:terms].T * root).T.reshape(terms, m2, n2)
    return KronSum(A, B)


def _rank1_weights(w: np.ndarray, m1: int, m2: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Best a [m1], b [m2] > 0 with w[i1*m2 + i2] ≈ a[i1]·b[i2]; third value: whether that is exact."""
    M = w.reshape(m1, m2)
    U, sigma, Vt = np.linalg.svd(M)
    # A positive matrix has positive leading singular vectors (Perron); fix the sign and guard the floor.
    a = np.abs(U[:, 0]) * np.sqrt(sigma[0])
    b = np.abs(Vt[0]) * np.sqrt(sigma[0])
    floor = 1e-12 * max(a.max(), b.max())
    a, b = np.maximum(a, floor), np.maximum(b, floor)
    exact = np.linalg.norm(M - np.outer(a, b)) <= 1e-12 * np.linalg.norm(M)
    return a, b, bool(exact)


def weighted_kron_als(
    W: np.ndarray, start: KronSum, row_weights, sweeps: int = 10, tol: float = 1e-9
) -> tuple[KronSum, list[float]]:
    """Improve Σ A_s⊗B_s for ‖diag(w)(W − Σ A_s⊗B_s)‖_F by alternating least squares.

    With B fixed the objective is an exact least-squares problem in A (one s×s normal matrix per i1,
    since the weight of entry (i1,i2,j1,j2) depends only on (i1,i2)), and likewise for B with A fixed.
    Each half-sweep is therefore an exact minimisation, so the error never increases. Returns the fit
    and the weighted error before the first and after every sweep; stops early when a sweep improves
    by less than tol (relative).
    """
    W = np.asarray(W, dtype=np.float64)
    m1, m2, n1, n2 = start.shape4
    w = checked_row_weights(row_weights, W.shape[0])
    w2 = np.ones((m1, m2)) if w is None else (w**2).reshape(m1, m2)
    W4w = W.reshape(m1, m2, n1, n2) * w2[:, :, None, None]  # ω·W in the (i1, i2, j1, j2) view
    U = start.A.transpose(1, 2, 0).astype(np.float64)  # [m1, n1, s]
    V = start.B.transpose(1, 2, 0).astype(np.float64)  # [m2, n2, s]

    def error(U, V):
        return weighted_error(W, KronSum(U.transpose(2, 0, 1), V.transpose(2, 0, 1)).dense(), w)

    history = [error(U, V)]
    for _ in range(sweeps):
        # A-step: for each i1, G = Σ_i2 ω[i1,i2] V[i2]ᵀV[i2]; rhs[i1,j1] = Σ_{i2,j2} ω W V.
        G = np.einsum("ab,bst->ast", w2, np.einsum("bds,bdt->bst", V, V))
        rhs = np.einsum("abcd,bds->acs", W4w, V)
        U = np.einsum("acs,ast->act", rhs, np.linalg.pinv(G, hermitian=True))
        # B-step, symmetric.
        G = np.einsum("ab,ast->bst", w2, np.einsum("acs,act->ast", U, U))
        rhs = np.einsum("abcd,acs->bds", W4w, U)
        V = np.einsum("bds,bst->bdt", rhs, np.linalg.pinv(G, hermitian=True))
        history.append(error(U, V))
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    # Split each term's scale evenly between A_s and B_s (the product is unchanged).
    nu, nv = np.linalg.norm(U, axis=(0, 1)), np.linalg.norm(V, axis=(0, 1))
    scale = np.sqrt(np.where(nu > 0, nv / np.where(nu > 0, nu, 1), 1.0))
    U, V = U * scale, V / np.where(scale > 0, scale, 1.0)
    return KronSum(U.transpose(2, 0, 1), V.transpose(2, 0, 1)), history


def nearest_kron(W: np.ndarray, shape, terms: int = 1, row_weights=None, sweeps: int = 10) -> KronSum:
    """Nearest Σ_{s<terms} A_s ⊗ B_s to W [K, N] for shape (m1, m2, n1, n2).

    Exact (globally optimal):
      - row_weights None: Van Loan–Pitsianis rearrangement + truncated SVD (Eckart–Young).
      - row weights that factor over the split, w[i1*m2 + i2] = a[i1]·b[i2] (to 1e-12 relative):
        diag(w)(A⊗B) = (diag(a)A)⊗(diag(b)B), so fit diag(w)W unweighted and unscale A by a, B by b.
    Approximate (general row weights; elementwise-weighted low rank has no closed form):
      start from the exact answer for the nearest factorable weights a·b (rank-1 SVD of w as [m1, m2]),
      then `sweeps` sweeps of weighted_kron_als on the true weights; the weighted error never increases
      from that start, but a global optimum is not guaranteed.
    Weights below 1e-8·max(w) are raised to that floor.
    """
    W = np.asarray(W, dtype=np.float64)
    _check_kron_args(W, shape, terms)
    w = checked_row_weights(row_weights, W.shape[0])
    if w is None:
        return _plain_nearest_kron(W, shape, terms)
    m1, m2, _, _ = shape
    a, b, exact = _rank1_weights(w, m1, m2)
    scaled = _plain_nearest_kron(np.kron(a, b)[:, None] * W, shape, terms)
    start = KronSum(scaled.A / a[None, :, None], scaled.B / b[None, :, None])
    if exact or sweeps == 0:
        return start
    fit, _ = weighted_kron_als(W, start, w, sweeps=sweeps)
    return fit


# ---------------------------------------------------------------------------------------------------
# Low rank (for doping a low-rank structure)


def nearest_low_rank(W: np.ndarray, rank: int, row_weights=None) -> LowRank:
    """Best rank-r A B in ‖diag(w)(W − A B)‖_F: exact via SVD(diag(w) W), A = diag(w)⁻¹ U_r Σ_r^½."""
    W = np.asarray(W, dtype=np.float64)
    if not 1 <= rank <= min(W.shape):
        raise FwlrError(f"rank must be between 1 and {min(W.shape)} for a {W.shape} weight, got {rank}.")
    w = checked_row_weights(row_weights, W.shape[0])
    scaled = W if w is None else w[:, None] * W
    U, sigma, Vt = np.linalg.svd(scaled, full_matrices=False)
    root = np.sqrt(sigma[:rank])
    A = U[:, :rank] * root
    if w is not None:
        A = A / w[:, None]
    return LowRank(A, root[:, None] * Vt[:rank])
