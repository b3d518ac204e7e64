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
        # sum_s kron(A_s, B_s): one GEMM gives the rearranged [(i1, j1), (i2, j2)] view, then a transpose.
        terms = self.A.shape[0]
        R = self.A.reshape(terms, m1 * n1).T @ self.B.reshape(terms, m2 * n2)
        return R.reshape(m1, n1, m2, n2).transpose(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


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


EXACT_SVD_SIDE = 256  # a rearranged matrix whose short side is at most this gets LAPACK's full SVD (exact)
SVD_TOL = 1e-7  # subspace iteration stops when the energy the top k capture moves by less than this (relative)
SVD_MAX_ITER = 12  # cold start; a warm start from the previous round typically stops after 2
WARM_SWEEPS = 2  # ALS sweeps per doping round when warm-started from the previous round's factors


def _rearranged(W: np.ndarray, shape) -> np.ndarray:
    """Van Loan–Pitsianis: W [(i1, i2), (j1, j2)] as R [(i1, j1), (i2, j2)]; A⊗B becomes vec(A) vec(B)ᵀ."""
    m1, m2, n1, n2 = shape
    return W.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def truncated_svd(R: np.ndarray, k: int, start: np.ndarray | None = None, seed: int = 0):
    """The top-k singular triplets (U [a, k], sigma [k], Vt [k, b]) of R [a, b], and a right basis that
    warm-starts the next call on a nearby matrix (None when the SVD was exact).

    Exact (LAPACK) when R's short side is at most EXACT_SVD_SIDE or k is a large share of it. Otherwise block
    subspace iteration (Halko, Martinsson & Tropp 2011) with p = k + max(8, k/4) columns, from `start` or a
    seeded Gaussian block, until the energy the top k capture moves by less than SVD_TOL (relative). The
    doping alternation's W − D changes a little per round, so from the previous round's basis one or two
    iterations suffice: measured, a 1024 x 1024 weight's round costs ~0.05 s instead of a full SVD's ~0.9 s.
    """
    a, b = R.shape
    p = k + max(8, k // 4)
    if min(a, b) <= EXACT_SVD_SIDE or 3 * p >= min(a, b):
        U, sigma, Vt = np.linalg.svd(R, full_matrices=False)
        return U[:, :k], sigma[:k], Vt[:k], None
    Q = start if start is not None and start.shape == (b, p) else np.random.default_rng(seed).standard_normal((b, p))
    Q, _ = np.linalg.qr(Q)
    captured = None
    for _ in range(SVD_MAX_ITER):
        left, _ = np.linalg.qr(R @ Q)
        Q, small = np.linalg.qr(R.T @ left)  # leftᵀ R = smallᵀ Qᵀ, so R ≈ left smallᵀ Qᵀ
        energy = float(np.sum(np.linalg.svd(small, compute_uv=False)[:k] ** 2))
        if captured is not None and abs(energy - captured) <= SVD_TOL * energy:
            break
        captured = energy
    Us, sigma, Vts = np.linalg.svd(small.T)
    return left @ Us[:, :k], sigma[:k], Vts[:k] @ Q.T, Q


def _plain_nearest_kron(W: np.ndarray, shape, terms: int, basis=None) -> tuple[KronSum, np.ndarray | None]:
    """Van Loan–Pitsianis: Σ A_s⊗B_s is rank-`terms` in the rearranged R, so a truncated SVD is optimal.
    Returns the sum and the singular basis for a warm start (truncated_svd)."""
    m1, m2, n1, n2 = shape
    U, sigma, Vt, basis = truncated_svd(_rearranged(W, shape), terms, basis)
    root = np.sqrt(sigma)
    A = (U * root).T.reshape(terms, m1, n1)
    B = (Vt.T * root).T.reshape(terms, m2, n2)
    return KronSum(A, B), basis


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
    W: np.ndarray, start: KronSum, row_weights, sweeps: int = 10, tol: float = 1e-9, measure: bool = True
) -> tuple[KronSum, list[float]]:
    """Improve Σ A_s⊗B_s for ‖diag(w)(W − Σ A_s⊗B_s)‖_F by alternating least squares.

    With B fixed the objective is an exact least-squares problem in A (one s×s normal matrix per i1,
    since the weight of entry (i1,i2,j1,j2) depends only on (i1,i2)), and likewise for B with A fixed.
    Each half-sweep is therefore an exact minimisation, so the error never increases. Returns the fit
    and the weighted error before the first and after every sweep; stops early when a sweep improves
    by less than tol (relative). Every contraction is one GEMM on the rearranged weight (BLAS).
    measure False: exactly `sweeps` sweeps and no errors (history []), for warm starts whose caller measures.
    """
    W = np.asarray(W, dtype=np.float64)
    shape = start.shape4
    m1, m2, n1, n2 = shape
    s = start.A.shape[0]
    w = checked_row_weights(row_weights, W.shape[0])
    w2 = np.ones((m1, m2)) if w is None else (w**2).reshape(m1, m2)
    R = _rearranged(W, shape)  # [(i1, j1), (i2, j2)]
    weight4 = w2[:, None, :, None]  # the weight of R's entry ((i1, j1), (i2, j2)) is w2[i1, i2]
    Rw = (R.reshape(m1, n1, m2, n2) * weight4).reshape(m1 * n1, m2 * n2)
    U = start.A.reshape(s, m1 * n1).T.astype(np.float64)  # [(i1, j1), s]
    V = start.B.reshape(s, m2 * n2).T.astype(np.float64)  # [(i2, j2), s]

    def error(U, V):
        diff = R - U @ V.T
        np.square(diff, out=diff)
        return float(np.sqrt(np.sum(diff.reshape(m1, n1, m2, n2).sum(axis=(1, 3)) * w2)))

    def solve(rhs, gram_blocks, outer, inner):
        # per outer index: x [inner, s] = rhs G⁻¹ with G = Σ_other w2 · (block Gram), symmetric positive
        # semi-definite: solved with a ridge of 1e-12 of its mean diagonal (LU, batched; eigh-based pinv cost 10x)
        ridge = 1e-12 * np.einsum("oss->o", gram_blocks)[:, None, None] / s + 1e-300
        G = gram_blocks + ridge * np.eye(s)
        return np.linalg.solve(G, rhs.reshape(outer, inner, s).transpose(0, 2, 1)).transpose(0, 2, 1).reshape(
            outer * inner, s)

    history = [error(U, V)] if measure else []
    for _ in range(sweeps):
        V3 = V.reshape(m2, n2, s)
        G = (w2 @ np.matmul(V3.transpose(0, 2, 1), V3).reshape(m2, s * s)).reshape(m1, s, s)
        U = solve(Rw @ V, G, m1, n1)
        U3 = U.reshape(m1, n1, s)
        G = (w2.T @ np.matmul(U3.transpose(0, 2, 1), U3).reshape(m1, s * s)).reshape(m2, s, s)
        V = solve(Rw.T @ U, G, m2, n2)
        if not measure:
            continue
        history.append(error(U, V))
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    # Split each term's scale evenly between A_s and B_s (the product is unchanged).
    nu, nv = np.linalg.norm(U, axis=0), np.linalg.norm(V, axis=0)
    scale = np.sqrt(np.where(nu > 0, nv / np.where(nu > 0, nu, 1), 1.0))
    U, V = U * scale, V / np.where(scale > 0, scale, 1.0)
    return KronSum(U.T.reshape(s, m1, n1), V.T.reshape(s, m2, n2)), history


class KronFitter:
    """Nearest Σ_{s<terms} A_s ⊗ B_s (as nearest_kron) of a sequence of nearby matrices, such as the doping
    alternation's W − D, each warm-started from the previous answer: the singular basis (plain or factorable
    weights) or the ALS factors (other weights, WARM_SWEEPS sweeps instead of a fresh start and `sweeps`)."""

    def __init__(self, shape, terms: int, row_weights=None, sweeps: int = 10, warm_sweeps: int = WARM_SWEEPS,
                 tol: float = 1e-9):
        self.shape, self.terms, self.row_weights = tuple(int(v) for v in shape), int(terms), row_weights
        self.sweeps, self.warm_sweeps, self.tol = sweeps, warm_sweeps, tol
        self._basis = None
        self._last: KronSum | None = None

    def __call__(self, M: np.ndarray) -> KronSum:
        M = np.asarray(M, dtype=np.float64)
        _check_kron_args(M, self.shape, self.terms)
        w = checked_row_weights(self.row_weights, M.shape[0])
        if w is None:
            fit, self._basis = _plain_nearest_kron(M, self.shape, self.terms, self._basis)
            return fit
        if self._last is not None and self.warm_sweeps > 0:
            self._last, _ = weighted_kron_als(M, self._last, w, sweeps=self.warm_sweeps, measure=False)
            return self._last
        m1, m2, _, _ = self.shape
        a, b, exact = _rank1_weights(w, m1, m2)
        scaled, self._basis = _plain_nearest_kron(np.kron(a, b)[:, None] * M, self.shape, self.terms, self._basis)
        fit = KronSum(scaled.A / a[None, :, None], scaled.B / b[None, :, None])
        if exact or self.sweeps == 0:
            return fit  # exact for factorable weights: every round is solved afresh from the warm basis
        self._last, _ = weighted_kron_als(M, fit, w, sweeps=self.sweeps, tol=self.tol)
        return self._last


def nearest_kron(W: np.ndarray, shape, terms: int = 1, row_weights=None, sweeps: int = 10) -> KronSum:
    """Nearest Σ_{s<terms} A_s ⊗ B_s to W [K, N] for shape (m1, m2, n1, n2).

    Exact (globally optimal; see truncated_svd for large rearranged matrices, where the top singular space is
    found by subspace iteration converged to SVD_TOL):
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
    return KronFitter(shape, terms, row_weights, sweeps=sweeps)(W)


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


def kron_energy_left(W: np.ndarray, shape, terms: int, iterations: int = 2, seed: int = 0) -> float:
    """A quick estimate of ‖W − nearest `terms`-term sum of this shape‖²_F, for ranking shapes before fitting one:
    the energy of W minus what `iterations` block power iterations (from a seeded Gaussian block) capture; exact
    when the rearranged matrix is small. Never below the true value (subspace iteration under-captures)."""
    R = _rearranged(np.asarray(W, dtype=np.float64), shape)
    total = float(np.sum(R * R))
    a, b = R.shape
    p = terms + max(8, terms // 4)
    if min(a, b) <= EXACT_SVD_SIDE or 3 * p >= min(a, b):
        small = R @ R.T if a <= b else R.T @ R  # its eigenvalues are R's squared singular values
    else:
        Q = np.random.default_rng(seed).standard_normal((b, p))
        for _ in range(iterations):
            Q, _ = np.linalg.qr(R.T @ np.linalg.qr(R @ Q)[0])
        RQ = R @ Q
        small = RQ.T @ RQ
    captured = np.linalg.eigvalsh(small)[::-1][:terms]
    return max(total - float(np.sum(np.maximum(captured, 0.0))), 0.0)
