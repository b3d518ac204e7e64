"""Bounded memory of the quantized path's per-site work: a vocabulary-wide head ([576, 49,152]: 226 MB per float64
copy) must not need four float64 copies of itself at once. Asserted on sizes (numpy's allocations, which it reports
to tracemalloc), never on times; and on the numbers staying exactly those of the plain formulas."""

import tracemalloc

import numpy as np
import pytest

from onnx_fwlr.methods import lowrank
from onnx_fwlr.quant import compensate, ortquant, plan
from onnx_fwlr.quant.budget import Option
from onnx_fwlr.quant.ortquant import nbits

K, N, R = 64, 8192, 16  # wide like an LM head, the output side low rank + diagonal (its sketch)
FLOAT64_COPY = K * N * 8


def weight_and_metric(seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    A = rng.standard_normal((K, 2 * K))
    factor = rng.standard_normal((R, N)) * 0.01
    diagonal = np.einsum("rn,rn->n", factor, factor) + rng.random(N) * 1e-3
    metric = plan.Metric(lowrank.gram_scaling(A @ A.T / (2 * K)), lowrank.low_rank_diagonal_scaling(factor, diagonal),
                         rng.standard_normal(K))
    return W, metric


def traced_peak(fn) -> float:
    """Peak of numpy's and Python's allocations during fn(), in float64 copies of the weight (after a warm-up
    call, so imports and caches are not counted)."""
    fn()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / FLOAT64_COPY
    finally:
        tracemalloc.stop()


def test_site_options_and_plans_hold_few_copies_of_the_weight():
    W, metric = weight_and_metric()
    int4 = nbits(4, 32)
    # measured: 1.53, 2.0 and 1.50 copies, the weighting applied in place on the one float64 residual (P in
    # column blocks: methods.lowrank._in_blocks); before that 2.5, 3.0 and 2.0, and before those 4.5, 4.5 and 2.5
    assert traced_peak(lambda: plan.site_options(W, metric, [int4], dense=True, low_rank=True, factor_bytes=2)) < 1.75
    assert traced_peak(lambda: plan.site_plan(W, metric, Option(int4.label, 8, 0, 0.0, key=int4),
                                              bias_correction=True)) < 2.25
    assert traced_peak(lambda: plan.site_plan(W, metric, Option(plan.LOW_RANK, 8, 0, 0.0),
                                              bias_correction=True)) < 1.75


@pytest.mark.parametrize("scheme", [nbits(4, 32), nbits(8, 32), ortquant.INT8_DYNAMIC])
def test_float32_dequantization_is_the_same_numbers(scheme):
    W, _ = weight_and_metric(1)
    wide = plan.dequantized(W, scheme)
    narrow = plan.dequantized(W, scheme, float64=False)
    assert narrow.dtype == np.float32 and wide.dtype == np.float64
    assert np.array_equal(narrow.astype(np.float64), wide) and narrow.flags.f_contiguous == wide.flags.f_contiguous
    assert np.array_equal(compensate.residual(W, narrow), W.astype(np.float64) - wide)


def test_in_place_weighting_gives_the_plain_formulas_numbers():
    W, metric = weight_and_metric(2)
    W64 = W.astype(np.float64)
    expected = metric.right.apply_right(metric.left.apply_left(W64))
    assert np.array_equal(lowrank.weighted_matrix(W, metric.left, metric.right), expected)
    kept = W64.copy()
    assert np.array_equal(lowrank.weighted_matrix(kept, None, metric.right), metric.right.apply_right(W64))
    assert np.array_equal(kept, W64)  # the caller's float64 array is not scaled unless it is given up
    assert compensate.weighted_error(W, metric.left, metric.right) == float(np.sum(expected * expected))
    assert compensate.weighted_error(W64) == float(np.sum(W64 * W64)) and np.array_equal(W64, W.astype(np.float64))


def test_outlier_rows_keep_deq_in_float32_only_when_they_are_float32_numbers():
    W, _ = weight_and_metric(3)
    deq = plan.dequantized(W, nbits(4, 32), float64=False)
    rows = np.array([1, 5])
    exact = plan._with_outliers(W.astype(np.float64), deq, rows)  # SiteWeights' float64 copy of float32 numbers
    assert exact.dtype == np.float32 and np.array_equal(exact[rows], W[rows])
    finer = W.astype(np.float64) + 1e-12  # not float32 numbers: no rounding of them is allowed
    widened = plan._with_outliers(finer, deq, rows)
    assert widened.dtype == np.float64 and np.array_equal(widened[rows], finer[rows])
    assert np.array_equal(np.delete(widened, rows, axis=0), np.delete(deq, rows, axis=0).astype(np.float64))


# --- the weighting applied in place (methods.lowrank._in_blocks) and the tied table's loss -------------------


@pytest.mark.parametrize("K, N", [(576, 49152), (64, 4097), (100, 8193), (300, 12288 + 4095), (5, 9000), (2048, 4100),
                                  (96, 512), (7, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_left_weighting_in_column_blocks_is_one_product_to_the_bit(K, N, threads):
    """The blocks are never narrower than LEFT_BLOCK (a narrow last block joins the one before it): narrower
    products go down OpenBLAS's small-matrix and matrix-vector kernels, which round differently (measured: a
    last block of 1 to 100 columns differed for K = 64 to 576)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(K + N)
    A = rng.standard_normal((K, 2 * K))
    left = lowrank.gram_scaling(A @ A.T / (2 * K))
    E = rng.standard_normal((K, N))
    with threadpool_limits(limits=threads, user_api="blas"):
        expected = left.apply_left(E)
        blocked = left.apply_left(E.copy(), overwrite=True)
    assert np.array_equal(blocked, expected)
    diagonal = lowrank.diagonal_scaling(rng.random(K) + 0.5)
    assert np.array_equal(diagonal.apply_left(E.copy(), overwrite=True), diagonal.apply_left(E))


def test_the_tied_tables_loss_reads_only_the_used_columns():
    """TableStats.head_loss: the loss of the table error (W − deq)ᵀ without the [V, D] float64 residual (the
    same numbers as loss(residual(W, deq).T)); the used rows' residual only."""
    from onnx_fwlr.quant.embedding import TableStats

    W, _ = weight_and_metric(4)  # [D, V]: a head reading its table transposed
    rng = np.random.default_rng(4)
    counts = np.zeros(N)
    counts[rng.choice(N, 300, replace=False)] = rng.integers(1, 9, 300)
    G = rng.standard_normal((K, K))
    stats = TableStats(counts, G @ G.T, float(counts.sum()), 12.0)
    deq = plan.dequantized(W, nbits(4, 32), float64=False)
    assert stats.head_loss(W, deq) == stats.loss(compensate.residual(W, deq).T)
    tracemalloc.start()
    try:
        stats.head_loss(W, deq)
        assert tracemalloc.get_traced_memory()[1] < 4 * 300 * K * 8  # a few float64 copies of the used columns
    finally:
        tracemalloc.stop()
