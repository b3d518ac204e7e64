"""Weighted low-rank factorisation in closed form (numpy/scipy only).

Every method solves   min ‖P (W − A B) Q‖_F   over rank-r products A [K,r] B [r,N]:

    SVD(P W Q) = U Σ Vᵀ,   A = P⁻¹ U_r Σ_r^½,   B = Σ_r^½ V_rᵀ Q⁻¹,   error² = Σ_{i>r} σ_i².

P and Q are a diagonal scaling or a Cholesky factor of a Gram matrix (P = Lᵀ on the input side,
Q = L on the output side, where L Lᵀ = Gram), applied and undone by triangular solves, never inverses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from onnx_fwlr.errors import FwlrError


@dataclass(frozen=True)
class Scaling:
    """One side's weighting: a positive diagonal, or a lower-triangular Cholesky factor of a Gram matrix."""

    diag: np.ndarray | None = None
    chol: np.ndarray | None = None

    def apply_left(self, W: np.ndarray, overwrite: bool = False) -> np.ndarray:  # P W
        """`overwrite`: W is the caller's own float64 scratch and becomes P W (no second [K, N] array: a
        Cholesky factor is applied in column blocks, which give the same numbers as one product, _in_blocks)."""
        if self.diag is not None:
            if overwrite:
                W *= self.diag[:, None]
                return W
            return self.diag[:, None] * W
        return _in_blocks(self.chol.T, W) if overwrite else self.chol.T @ W

    def solve_left(self, U: np.ndarray) -> np.ndarray:  # P⁻¹ U
        if self.diag is not None:
            return U / self.diag[:, None]
        return scipy.linalg.solve_triangular(self.chol, U, lower=True, trans="T", check_finite=False)

    def apply_right(self, W: np.ndarray, overwrite: bool = False) -> np.ndarray:  # W Q
        """`overwrite`: W is the caller's own float64 scratch, scaled in place when Q is diagonal."""
        if self.diag is None:
            return W @ self.chol
        if overwrite:
            W *= self.diag[None, :]
            return W
        return W * self.diag[None, :]

    def solve_right(self, Vt: np.ndarray) -> np.ndarray:  # Vt Q⁻¹
        if self.diag is not None:
            return Vt / self.diag[None, :]
        return scipy.linalg.solve_triangular(self.chol, Vt.T, lower=True, trans="T", check_finite=False).T


# Columns per block of an in-place product (Scaling.apply_left): narrower ones, and a narrow last block, send
# OpenBLAS down other kernels (small-matrix and matrix-vector paths) whose sums round differently; from this
# width on, every column came out bit for bit as in one product (tests/test_quantized_memory.py: K up to 2048,
# N up to 49,152 with ragged ends, one and two threads).
LEFT_BLOCK = 4096


def _in_blocks(P: np.ndarray, W: np.ndarray) -> np.ndarray:
    """W ← P W in place, LEFT_BLOCK columns at a time (the last block takes the remainder: never narrower)."""
    starts = list(range(0, W.shape[1], LEFT_BLOCK))
    if len(starts) > 1 and W.shape[1] - starts[-1] < LEFT_BLOCK:
        starts.pop()
    for start, end in zip(starts, starts[1:] + [W.shape[1]]):
        W[:, start:end] = P @ W[:, start:end]
    return W


def diagonal_scaling(values: np.ndarray, floor: float = 1e-6) -> Scaling:
    """diag(values), with zero or negative entries (dead channels) lifted to floor · max so it stays invertible."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise FwlrError("importance values contain NaN or Inf; check the calibration data for NaN/Inf inputs.")
    top = float(values.max()) if values.size and values.max() > 0 else 1.0
    return Scaling(diag=np.maximum(values, floor * top))


def gram_scaling(gram: np.ndarray, damping: float = 1e-4) -> Scaling:
    """Cholesky factor of gram + λ·mean(diag)·I; λ starts at `damping` and grows ×10 until positive definite.

    Rank-deficient Grams (duplicated or dead channels) are common in real activations; the damping keeps
    the factors finite and acts as a small ridge toward the unweighted solution.
    """
    gram = np.asarray(gram, dtype=np.float64)
    if not np.all(np.isfinite(gram)):
        raise FwlrError("activation statistics contain NaN or Inf; check the calibration data for NaN/Inf inputs.")
    # Two K×K arrays at most (this one and the factor): K = 8192 is 0.5 GB each, so no identity matrix and
    # no temporaries beyond them.
    damped = np.array(gram)
    damped += gram.T
    damped *= 0.5
    diagonal = np.diag(damped).copy()
    scale = float(np.mean(diagonal))
    if scale <= 0:
        return Scaling(diag=np.ones(gram.shape[0]))
    lam = damping
    for _ in range(16):
        np.fill_diagonal(damped, diagonal + lam * scale)
        try:
            chol = scipy.linalg.cholesky(damped, lower=True, check_finite=False)
            return Scaling(chol=chol)
        except np.linalg.LinAlgError:
            lam = max(lam * 10.0, 1e-10)
    raise FwlrError("the activation Gram matrix could not be made positive definite; use `method` svd or asvd.")


@dataclass(frozen=True)
class LowRankDiagonal:
    """An output-side weighting Q with Q Qᵀ = D + Sᵀ S (D diagonal > 0, S [r, N]), applied without forming
    any N × N matrix: Q = D^½ (I + U diag(grow) Uᵀ), U [N, r] orthonormal (the thin SVD of D^-½ Sᵀ), so W Q and
    Vt Q⁻¹ cost O(K·N·r). The weighted low-rank solution depends on Q Qᵀ only, so any square root serves."""

    root_diag: np.ndarray  # √D [N]
    basis: np.ndarray  # U [N, r]
    grow: np.ndarray  # √(1 + σ²) − 1 [r]
    shrink: np.ndarray  # 1/√(1 + σ²) − 1 [r]

    def apply_right(self, W: np.ndarray, overwrite: bool = False) -> np.ndarray:  # W Q
        """`overwrite`: W is the caller's own float64 scratch and becomes W Q (no second [K, N] array)."""
        if overwrite:
            W *= self.root_diag[None, :]
            M = W
        else:
            M = W * self.root_diag[None, :]
        return _add_low_rank(M, (M @ self.basis) * self.grow[None, :], self.basis)

    def solve_right(self, Vt: np.ndarray) -> np.ndarray:  # Vt Q⁻¹
        M = _add_low_rank(np.array(Vt, dtype=np.float64), (Vt @ self.basis) * self.shrink[None, :], self.basis)
        M /= self.root_diag[None, :]
        return M


def _add_low_rank(M: np.ndarray, left: np.ndarray, basis: np.ndarray, columns: int = 4096) -> np.ndarray:
    """M += left @ basisᵀ in column blocks (no second [K, N] temporary)."""
    for start in range(0, M.shape[1], columns):
        M[:, start:start + columns] += left @ basis[start:start + columns].T
    return M


def low_rank_diagonal_scaling(factor: np.ndarray, diagonal: np.ndarray, damping: float = 1e-4) -> LowRankDiagonal:
    """The weighting of a Gram known as Sᵀ S plus a residual diagonal (autodiff.losses.fold_sketch): D is the
    exact diagonal minus diag(Sᵀ S) (clipped at 0), damped by `damping`·mean(diagonal) as gram_scaling damps."""
    factor = np.asarray(factor, dtype=np.float64)
    diagonal = np.asarray(diagonal, dtype=np.float64)
    if not (np.all(np.isfinite(factor)) and np.all(np.isfinite(diagonal))):
        raise FwlrError("gradient statistics contain NaN or Inf; check the calibration data for NaN/Inf inputs.")
    scale = float(np.mean(diagonal)) if diagonal.size else 0.0
    if scale <= 0:
        n = diagonal.shape[0]
        return LowRankDiagonal(np.ones(n), np.zeros((n, 0)), np.zeros(0), np.zeros(0))
    residual = np.maximum(diagonal - np.einsum("rn,rn->n", factor, factor), 0.0) + damping * scale
    root = np.sqrt(residual)
    C = factor.T / root[:, None]  # [N, r]
    values, vectors = np.linalg.eigh(C.T @ C)
    keep = values > values.max(initial=0.0) * 1e-12
    sigma2, vectors = values[keep], vectors[:, keep]
    basis = (C @ vectors) / np.sqrt(sigma2)[None, :]
    lift = np.sqrt(1.0 + sigma2)
    return LowRankDiagonal(root, basis, lift - 1.0, 1.0 / lift - 1.0)


@dataclass
class Decomposition:
    """The SVD of the weighted weight P W Q; any rank's factors and error follow from it without recomputing.

    An exact decomposition holds every singular value, and singular vectors up to `max_rank` (all of them,
    or as many as a rank that saves parameters can use: keep_components). A randomised one holds only the
    leading `max_rank` components; its `total_energy` is still exact (‖PWQ‖_F² needs no SVD), so dropped
    energies and relative errors stay exact.
    """

    U: np.ndarray  # [K, p]
    s: np.ndarray  # [p], descending
    Vt: np.ndarray  # [p, N]
    left: Scaling | None
    right: Scaling | LowRankDiagonal | None
    total_energy: float | None = None  # ‖PWQ‖_F²; None = sum of s² (an exact, complete decomposition)
    exact: bool = True

    @property
    def max_rank(self) -> int:
        """The largest rank whose factors this decomposition can give."""
        return self.U.shape[1]

    def keep_components(self, rank: int) -> "Decomposition":
        """The same decomposition with singular vectors beyond `rank` freed (copies, so the memory goes);
        singular values, energies and errors stay complete."""
        if rank >= self.max_rank:
            return self
        return Decomposition(U=self.U[:, :rank].copy(), s=self.s, Vt=self.Vt[:rank].copy(), left=self.left,
                             right=self.right, total_energy=self.total_energy, exact=self.exact)

    @property
    def energy(self) -> np.ndarray:
        """σ² per component: the weighted error each one removes."""
        return self.s**2

    @property
    def total(self) -> float:
        return float(np.sum(self.energy)) if self.total_energy is None else self.total_energy

    def dropped_energy(self, rank: int) -> float:
        if self.exact:
            return float(np.sum(self.energy[rank:]))
        self._check_rank(rank)
        return max(self.total - float(np.sum(self.energy[:rank])), 0.0)

    def relative_error(self, rank: int) -> float:
        total = self.total
        return self.dropped_energy(rank) / total if total > 0 else 0.0

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A [K, rank], B [rank, N] with the singular values split evenly between them."""
        self._check_rank(rank)
        root = np.sqrt(self.s[:rank])
        A = self.U[:, :rank] * root[None, :]
        B = root[:, None] * self.Vt[:rank]
        if self.left is not None:
            A = self.left.solve_left(A)
        if self.right is not None:
            B = self.right.solve_right(B)
        return A, B

    def _check_rank(self, rank: int) -> None:
        if rank > self.max_rank:
            raise ValueError(f"this decomposition holds factors up to rank {self.max_rank}, not {rank}")


def weighted_matrix(W: np.ndarray, left: Scaling | None = None, right: Scaling | None = None,
                    overwrite: bool = False) -> np.ndarray:
    """P W Q in float64, refusing NaN/Inf. P and Q are applied in place on an array made here (W's float64
    copy), so a [K, N] weight costs one float64 copy beside W (or two: P W beside the caller's float64 W);
    `overwrite`: W (float64) is the caller's scratch and is weighted in place (no copy at all)."""
    M = np.asarray(W, dtype=np.float64)
    own = overwrite or M.dtype != np.asarray(W).dtype
    if not np.all(np.isfinite(M)):
        raise FwlrError("the weight contains NaN or Inf; it cannot be factorised (leave it out with `exclude`).")
    if left is not None:
        M, own = left.apply_left(M, overwrite=own), True
    if right is not None:
        M = right.apply_right(M, overwrite=own)
    return M


def weighted_svd(W: np.ndarray, left: Scaling | None = None, right: Scaling | None = None) -> Decomposition:
    """Decompose P W Q once (float64). Raises FwlrError rather than returning anything made up."""
    U, s, Vt = _svd(weighted_matrix(W, left, right))
    return Decomposition(U=U, s=s, Vt=Vt, left=left, right=right)


# Randomised SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1).
OVERSAMPLE = 10
POWER_ITERATIONS = 4


def randomized_weighted_svd(
    W: np.ndarray, rank: int, left: Scaling | None = None, right: Scaling | None = None, *,
    seed: int = 0, oversample: int = OVERSAMPLE, power_iterations: int = POWER_ITERATIONS,
) -> Decomposition:
    """The leading `rank` components of P W Q from a random range sketch; far cheaper than a full SVD when
    rank ≪ min(K, N). The same seed gives the same bytes. Falls back to the exact SVD when the sketch
    would not be smaller than the matrix."""
    M = weighted_matrix(W, left, right)
    width = rank + oversample
    if width >= min(M.shape):
        return weighted_svd(W, left, right)
    U, s, Vt = _randomized_svd(M, rank, width, seed, power_iterations)
    return Decomposition(U=U, s=s, Vt=Vt, left=left, right=right,
                         total_energy=float(np.sum(M * M)), exact=False)


def _randomized_svd(M: np.ndarray, rank: int, width: int, seed: int, power_iterations: int):
    rng = np.random.default_rng(seed)
    sketch = M @ rng.standard_normal((M.shape[1], width))
    Q = _orthonormal(sketch)
    for _ in range(power_iterations):  # re-orthonormalise each half step so small σ are not lost to rounding
        Q = _orthonormal(M @ _orthonormal(M.T @ Q))
    small_U, s, Vt = _svd(Q.T @ M)  # [width, N]: cheap
    return Q @ small_U[:, :rank], s[:rank], Vt[:rank]


def _orthonormal(Y: np.ndarray) -> np.ndarray:
    Q, _ = np.linalg.qr(Y)
    return Q


def use_randomized(K: int, N: int, rank: int | None, svd: str = "auto") -> bool:
    """The rule for choosing the randomised SVD (measured; see docs/large_models.md).

    exact: never; randomized: whenever a rank is known; auto: when the rank is known and at most a quarter of
    min(K, N), and min(K, N) ≥ 1024 (below that LAPACK's full SVD is fast enough that the sketch does not pay).
    """
    if svd not in SVD_CHOICES:
        raise FwlrError(f"unknown `svd` '{svd}'; choose one of {', '.join(SVD_CHOICES)}.")
    if rank is None or svd == "exact":
        return False
    if svd == "randomized":
        return rank + OVERSAMPLE < min(K, N)
    return min(K, N) >= AUTO_MIN_DIM and rank <= min(K, N) // 4


SVD_CHOICES = ("auto", "exact", "randomized")
AUTO_MIN_DIM = 1024


def _svd(M: np.ndarray):
    try:
        return scipy.linalg.svd(M, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:
        pass
    try:  # the slower driver converges where gesdd does not
        return scipy.linalg.svd(M, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    except np.linalg.LinAlgError:
        raise FwlrError("the SVD did not converge for this weight; exclude it with `exclude`.") from None


def bias_shift(mean_input: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """E[x]ᵀ (W − A B): the mean output the factorisation loses, to fold back into the bias."""
    return mean_input @ W - (mean_input @ A) @ B
