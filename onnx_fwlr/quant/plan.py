"""From a weight and its metric to options (bytes, predicted loss) and from a chosen option to a SitePlan.

The predicted loss of storing W as deq(Q(W)) + A B is ‖P (W − deq(Q(W)) − A B) Q‖², the energy the rank-r
correction leaves of the weighted residual: one SVD per site and scheme gives it for every rank. Only the
singular values are kept while allocating (σ² from the eigenvalues of the smaller Gram, compensate.spectrum_energy:
a fraction of an SVD's time); the chosen option's factors are recomputed (quantization is deterministic) from
the leading eigenvectors of the same Gram, so memory stays at one site's decomposition at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_fwlr.methods.allocation import LOW_RANK, Option
from onnx_fwlr.methods.lowrank import Scaling, weighted_matrix
from onnx_fwlr.quant import compensate, ortquant
from onnx_fwlr.quant.budget import rank_grid
from onnx_fwlr.quant.graph import SitePlan
from onnx_fwlr.quant.ortquant import Scheme

FP32 = "fp32"


@dataclass
class Metric:
    """A site's weighting (P, Q of the method; None = identity) and its mean input for the bias shift."""

    left: Scaling | None = None
    right: Scaling | None = None
    mean_input: np.ndarray | None = None


def dequantized(W: np.ndarray, scheme: Scheme, dtype=np.float32, float64: bool = True) -> np.ndarray:
    """deq(Q(W)) as ONNX Runtime computes it, float64 [K, N]; `dtype`: the weight's storage (float16 weights are
    quantized as stored, with float16 scales). `float64` False: the same numbers kept as float32 (they are
    float32 values; compensate.residual subtracts them exactly), half the memory."""
    if scheme.kind == "dynamic":
        return ortquant.dynamic_int8_weight(W, float64=float64)
    return ortquant.dequantize_matmul_weight(ortquant.quantize_matmul_weight(W, scheme, "w", dtype), float64=float64)


def dequantized_table(T: np.ndarray, scheme: Scheme) -> np.ndarray:
    if scheme.kind == "dynamic":
        return ortquant.dynamic_int8_table(T)
    return ortquant.dequantize_table(ortquant.quantize_table(T, scheme, "t"))


def site_options(W: np.ndarray, metric: Metric, schemes: list[Scheme], *, dense: bool, low_rank: bool,
                 rank_step: int = 8, factor_bytes: int = 4, scheme_loss: dict | None = None,
                 dtype=np.float32, dense_bytes: int | None = None, low_rank_bytes=None) -> list[Option]:
    """Every option for one weight [K, N]: each scheme at correction ranks 0, step, 2·step, … (while it stays
    smaller than the weight as it is), plus the weight as it is and low rank alone when asked; factors take
    `factor_bytes` per number. `scheme_loss[scheme]` is a loss the correction cannot remove (the activation
    rounding of dynamic int8), added to each of that scheme's options. `dtype`: the weight's storage (float16
    weights are quantized as stored). `dense_bytes`: the bytes of the weight as it is (default: its dtype's;
    a quantized input's stored bytes), above which no option is offered; `low_rank_bytes(r)`: the bytes of low
    rank r alone when its factors are stored otherwise (a quantized input's scheme), default `factor_bytes` per
    number."""
    K, N = W.shape
    dense_bytes = np.dtype(dtype).itemsize * K * N if dense_bytes is None else dense_bytes
    options = [Option(FP32, 0, dense_bytes, 0.0)] if dense else []
    ranks = rank_grid(K, N, rank_step)
    per_rank = factor_bytes * (K + N)
    if low_rank:
        energy = compensate.spectrum_energy(weighted_matrix(W, metric.left, metric.right))
        size = low_rank_bytes or (lambda r: r * per_rank)
        tail = _tail(energy)
        options += [Option(LOW_RANK, r, size(r), float(tail[min(r, len(energy))])) for r in ranks
                    if size(r) < dense_bytes]
    for scheme in schemes:
        energy = compensate.residual_energy(W, dequantized(W, scheme, dtype, float64=False), metric.left,
                                            metric.right)
        base = scheme.matmul_bytes(K, N)
        if base >= dense_bytes:
            continue  # no smaller than the weight as it is
        usable = [0] + [r for r in ranks if base + r * per_rank < dense_bytes]
        extra = (scheme_loss or {}).get(scheme, 0.0)
        options += _ranked(scheme.label, scheme, energy, base, usable, per_rank, extra)
    return options


def _tail(energy: np.ndarray) -> np.ndarray:
    """tail[r] = Σ_{i≥r} σ_i²: the energy rank r leaves."""
    return np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])


def _ranked(storage: str, scheme, energy: np.ndarray, base: int, ranks: list[int], per_rank: int,
            extra: float = 0.0) -> list[Option]:
    tail = _tail(energy)
    return [Option(storage, r, base + r * per_rank, extra + float(tail[min(r, len(energy))]), key=scheme)
            for r in ranks]


def table_options(T: np.ndarray, loss, schemes: list[Scheme], dense: bool = True) -> list[Option]:
    """Options for an embedding table [V, D]; `loss(ΔT)` is its predicted loss (embedding.TableStats.loss)."""
    V, D = T.shape
    options = [Option(FP32, 0, 4 * V * D, 0.0)] if dense else []
    for scheme in schemes:
        options.append(Option(scheme.label, 0, scheme.table_bytes(V, D), loss(T - dequantized_table(T, scheme)),
                              key=scheme))
    return options


def site_plan(W: np.ndarray, metric: Metric, option: Option, *, bias_correction: bool,
              alternate_rounds: int = 0, dtype=np.float32, outliers=None) -> tuple[SitePlan | None, float]:
    """The chosen option made concrete, and its weighted error ‖P (W − W') Q‖² (None: the site stays dense).
    `outliers`: the input channels a dynamic int8 main branch leaves to float (SitePlan.outliers).

    With `alternate_rounds`, quantization and correction alternate (compensate.alternate) and the best
    round is kept. The mean output shift E[x]ᵀ (W − W') goes into the bias when `bias_correction`.
    """
    if option.storage == FP32:
        return None, 0.0
    if option.storage == LOW_RANK:
        M = weighted_matrix(W, metric.left, metric.right)
        decomposition = compensate.leading_svd(M, option.rank, metric.left, metric.right,
                                               overwrite=not np.may_share_memory(M, W))
        del M
        A, B = decomposition.factors(option.rank)
        return _with_shift(SitePlan(None, A, B), W, A @ B, metric, bias_correction, overwrite=True), \
            decomposition.dropped_energy(option.rank)
    scheme = option.key
    plan, error = _quantized_plan(W, metric, option, scheme, bias_correction, alternate_rounds, dtype, outliers)
    plan.outliers = outliers
    return plan, error


def _with_outliers(W: np.ndarray, deq: np.ndarray, outliers) -> np.ndarray:
    """deq(Q(W)) with the rows of the input channels computed in float taken from W (they are exact there); a
    float32 deq becomes float64 when those rows are not float32 numbers."""
    if outliers is None:
        return deq
    rows = W[outliers]
    exact = deq.dtype != np.float32 or np.array_equal(rows.astype(np.float32), rows)
    deq = deq.copy() if exact else deq.astype(np.float64, order="C")
    deq[outliers] = rows
    return deq


def _quantized_plan(W, metric, option, scheme, bias_correction, alternate_rounds, dtype, outliers=None):
    """The plan of a quantized option. deq(Q(W)) is kept as its float32 numbers and every float64 [K, N] array
    is made once and let go (a vocabulary-wide head: two float64 copies at a time, not four)."""
    if option.rank == 0:
        approx = _with_outliers(W, dequantized(W, scheme, dtype, float64=False), outliers)
        error = compensate.weighted_error(compensate.residual(W, approx), metric.left, metric.right)
        return _with_shift(SitePlan(scheme), W, approx, metric, bias_correction), error
    if alternate_rounds:
        result = compensate.alternate(W, lambda M: dequantized(M, scheme, dtype), option.rank, alternate_rounds,
                                      metric.left, metric.right)
        deq, A, B, error = result.dequantized, result.A, result.B, result.errors[result.chosen_round]
        plan = SitePlan(scheme, A, B, quantized=result.quantized if result.chosen_round else None)
        return _with_shift(plan, W, deq + A @ B, metric, bias_correction), error
    deq = _with_outliers(W, dequantized(W, scheme, dtype, float64=False), outliers)
    spectrum = compensate.residual_leading(W, deq, option.rank, metric.left, metric.right)
    A, B = spectrum.factors(option.rank)
    error = spectrum.dropped_energy(option.rank)
    del spectrum
    if not (bias_correction and metric.mean_input is not None):
        return SitePlan(scheme, A, B), error
    approx = A @ B
    approx += deq  # deq + A B, in A B's array
    del deq
    return _with_shift(SitePlan(scheme, A, B), W, approx, metric, bias_correction, overwrite=True), error


def _with_shift(plan: SitePlan, W: np.ndarray, approx: np.ndarray, metric: Metric, bias_correction: bool,
                overwrite: bool = False) -> SitePlan:
    """The mean output shift E[x]ᵀ (W − approx) into the plan; `overwrite`: approx (float64) is scratch and
    holds W − approx afterwards."""
    if bias_correction and metric.mean_input is not None:
        difference = np.subtract(W, approx, out=approx) if overwrite else compensate.residual(W, approx)
        plan.shift = metric.mean_input @ difference
    return plan
