"""Loss seeds and per-sample Fisher accumulation for importance-weighted factorisation.

A *seed* is the cotangent ∂ℓ/∂z of a per-sample loss at the model output z; the backward pass turns it
into G = ∂ℓ/∂Y at every site output, and a site's weight gradient for sample n is dW_n = X_nᵀ G_n.
Fisher statistics are sums of squares of these per-sample gradients (never of a batch sum).

Pure numpy. ``find_seed_target`` reads an ONNX graph through its protobuf fields only, without
importing onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_fwlr.errors import FwlrError

LOSSES = ("ce", "mc", "gaussian")


@dataclass(frozen=True)
class SeedTarget:
    """Where to inject the loss cotangent.

    ``tensor`` is the logits when the chosen output comes from Softmax/LogSoftmax (seeding there gives
    the cotangent of the log-likelihood in its natural coordinates), else the output itself.
    ``classifier`` says whether the output came out of a (Log)Softmax over ``axis``;
    ``legacy_2d`` marks opset < 13 (Log)Softmax, which normalises the input flattened to 2-D at ``axis``.
    """

    tensor: str
    classifier: bool = False
    axis: int = -1
    legacy_2d: bool = False


def find_seed_target(model, output: str) -> SeedTarget:
    """The tensor to seed for ``output``: the logits feeding a final Softmax/LogSoftmax, else ``output``."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for node in model.graph.node:
        if output in node.output and node.domain in ("", "ai.onnx") and node.op_type in ("Softmax", "LogSoftmax"):
            attrs = {a.name: a.i for a in node.attribute}
            if opset >= 13:
                return SeedTarget(node.input[0], True, attrs.get("axis", -1), False)
            return SeedTarget(node.input[0], True, attrs.get("axis", 1), True)
    return SeedTarget(output)


def default_loss(target: SeedTarget, output_shape, labels_given: bool) -> str:
    """'ce' with labels; 'mc' for logits/probabilities ((Log)Softmax output or 2-D [batch, classes]); else 'gaussian'."""
    if labels_given:
        return "ce"
    if target.classifier or len(output_shape) == 2:
        return "mc"
    return "gaussian"


def _class_rows(z: np.ndarray, axis: int, legacy_2d: bool) -> np.ndarray:
    """View z as [rows, classes] with the class axis last."""
    if legacy_2d:
        axis = axis % z.ndim
        return z.reshape(int(np.prod(z.shape[:axis], dtype=np.int64)), -1)
    moved = np.moveaxis(z, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _from_rows(rows: np.ndarray, like: np.ndarray, axis: int, legacy_2d: bool) -> np.ndarray:
    if legacy_2d:
        return rows.reshape(like.shape)
    moved_shape = np.moveaxis(like, axis, -1).shape
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def _softmax_rows(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    e = np.exp(rows - rows.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _apply_weight(seed: np.ndarray, weight) -> np.ndarray:
    """Multiply a seed by per-position weights (e.g. an attention mask [B, T]) along its leading axes."""
    if weight is None:
        return seed
    weight = np.asarray(weight)
    if seed.shape[:weight.ndim] != weight.shape:
        raise FwlrError(f"The position weight has shape {weight.shape} but the seeded output has shape "
                        f"{seed.shape}; pass weights matching the output's leading axes (e.g. [batch, seq]).")
    return seed * weight.reshape(weight.shape + (1,) * (seed.ndim - weight.ndim)).astype(seed.dtype)


def ce_seed(logits: np.ndarray, labels: np.ndarray, *, axis: int = -1, legacy_2d: bool = False,
            weight=None) -> np.ndarray:
    """Cotangent of the per-sample cross-entropy w.r.t. logits: softmax(z) − onehot(y) (no batch mean)."""
    rows = _class_rows(logits, axis, legacy_2d)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.shape[0] != rows.shape[0]:
        raise FwlrError(f"Got {labels.shape[0]} labels for {rows.shape[0]} predictions; pass one class "
                        "index per prediction.")
    if labels.size and (labels.min() < 0 or labels.max() >= rows.shape[1]):
        raise FwlrError(f"Labels must lie in [0, {rows.shape[1]}); fix the label encoding.")
    g = _softmax_rows(rows)
    g[np.arange(rows.shape[0]), labels] -= 1.0
    seed = _from_rows(g.astype(logits.dtype), logits, axis, legacy_2d)
    return _apply_weight(seed, weight)


def mc_seeds(logits: np.ndarray, draws: int, rng: np.random.Generator, *, axis: int = -1,
             legacy_2d: bool = False, weight=None) -> list[np.ndarray]:
    """``draws`` seeds p − onehot(ỹ) with ỹ sampled from the model's own softmax (Monte-Carlo true Fisher)."""
    rows = _class_rows(logits, axis, legacy_2d)
    p = _softmax_rows(rows)
    cdf = np.cumsum(p, axis=1)
    seeds = []
    for _ in range(draws):
        u = rng.random((rows.shape[0], 1)) * cdf[:, -1:]
        sampled = np.minimum((cdf < u).sum(axis=1), rows.shape[1] - 1)
        g = p.copy()
        g[np.arange(rows.shape[0]), sampled] -= 1.0
        seeds.append(_apply_weight(_from_rows(g.astype(logits.dtype), logits, axis, legacy_2d), weight))
    return seeds


def gaussian_seeds(shape, draws: int, rng: np.random.Generator, *, dtype=np.float32,
                   weight=None) -> list[np.ndarray]:
    """``draws`` seeds ε ~ N(0, I): the Fisher of a unit-variance Gaussian likelihood on the output."""
    return [_apply_weight(rng.standard_normal(tuple(shape)).astype(dtype), weight) for _ in range(draws)]


def make_seeds(loss: str, z: np.ndarray, *, target: SeedTarget | None = None, labels=None, draws: int = 1,
               rng: np.random.Generator | None = None, weight=None) -> list[np.ndarray]:
    """Seeds for the values ``z`` of ``target.tensor`` under ``loss`` ('ce' gives one seed)."""
    target = target or SeedTarget("")
    rng = rng if rng is not None else np.random.default_rng(0)
    if loss == "ce":
        if labels is None:
            raise FwlrError("The 'ce' loss needs labels; pass labels or choose loss 'mc' or 'gaussian'.")
        return [ce_seed(z, labels, axis=target.axis, legacy_2d=target.legacy_2d, weight=weight)]
    if loss == "mc":
        return mc_seeds(z, draws, rng, axis=target.axis, legacy_2d=target.legacy_2d, weight=weight)
    if loss == "gaussian":
        return gaussian_seeds(z.shape, draws, rng, dtype=z.dtype if z.dtype.kind == "f" else np.float32,
                              weight=weight)
    raise FwlrError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")


def new_accumulator(k: int, n: int, with_gram: bool = True) -> dict:
    """Zeroed running sums for one site with weight [K, N]."""
    acc = {"fisher_row": np.zeros(k), "fisher_col": np.zeros(n), "grad_count": 0}
    if with_gram:
        acc["grad_gram"] = np.zeros((n, n))
    return acc


def _fisher_squares(pairs, k: int, n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Σ_n Σ_j dW_n[i,j]² [K] and Σ_n Σ_i dW_n[i,j]² [N] over samples (x [P, K], g [P, N]), dW_n = xᵀ g.

    Per sample, whichever is cheaper for its P positions: forming dW_n [K, N] (P·K·N multiply-adds), or
    the position Grams, Σ_j dW[i,j]² = x_iᵀ (g gᵀ) x_i and Σ_i dW[i,j]² = g_jᵀ (x xᵀ) g_j (2P²(K+N)).
    """
    row, col = np.zeros(k), np.zeros(n)
    squares = dw = None
    for x, g in pairs:
        p = x.shape[0]
        if p == 0:
            continue
        if 2 * p * (k + n) < k * n:
            row += np.einsum("pi,pi->i", (g @ g.T) @ x, x, dtype=np.float64)
            col += np.einsum("pj,pj->j", (x @ x.T) @ g, g, dtype=np.float64)
            continue
        if squares is None:
            squares, dw = np.zeros((k, n), dtype=dtype), np.empty((k, n), dtype=dtype)
        np.matmul(x.T, g, out=dw)
        np.square(dw, out=dw)
        squares += dw
    if squares is not None:
        row += squares.sum(axis=1, dtype=np.float64)
        col += squares.sum(axis=0, dtype=np.float64)
    return row, col


def accumulate_fisher(acc: dict, X: np.ndarray, G: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """Fold one batch of per-sample gradients of a site's weight into running float64 sums.

    X [B, ..., K] is the site input and G [B, ..., N] the cotangent of the site output, per sample B
    (one row per (sample, seed) pair) and position. dW_n = X_nᵀ G_n sums over that sample's positions
    before squaring; `keep` [B, P] (the attention mask) leaves padding positions out, which then cost
    nothing. Updates ``acc`` in place (an empty dict becomes ``new_accumulator(K, N)``; the Gram is
    skipped when 'grad_gram' is absent) and returns it: 'fisher_row' [K] += Σ_n Σ_j dW_n[i,j]²,
    'fisher_col' [N] += Σ_n Σ_i dW_n[i,j]², 'grad_gram' [N,N] += Σ_{n,p} g gᵀ, 'grad_count' += B.
    One sample at a time as 2-D BLAS products, so memory stays at a few [K, N] (or [P, P]) buffers.
    """
    if X.shape[0] != G.shape[0]:
        raise FwlrError(f"Site input has {X.shape[0]} samples but its gradient has {G.shape[0]}; pass "
                        "matching batches.")
    b, k, n = X.shape[0], X.shape[-1], G.shape[-1]
    X = X.reshape(b, -1, k)
    G = G.reshape(b, -1, n)
    p = X.shape[1]
    if G.shape[1] != p:
        raise FwlrError(f"Site input has {p} positions per sample but its gradient has {G.shape[1]}; "
                        "pass the input and output of the same site.")
    if not acc:
        acc.update(new_accumulator(k, n))
    dtype = np.result_type(X.dtype, G.dtype, np.float32)
    X, G = X.astype(dtype, copy=False), G.astype(dtype, copy=False)
    if keep is not None:
        keep = np.asarray(keep).reshape(b, p) != 0
        pairs = [(x[m], g[m]) for x, g, m in zip(X, G, keep)]
    else:
        pairs = list(zip(X, G))
    row, col = _fisher_squares(pairs, k, n, dtype)
    acc["fisher_row"] = acc["fisher_row"] + row
    acc["fisher_col"] = acc["fisher_col"] + col
    if "grad_gram" in acc:
        flat = G[keep] if keep is not None else G.reshape(-1, n)
        acc["grad_gram"] = acc["grad_gram"] + flat.T @ flat
    acc["grad_count"] = acc["grad_count"] + b
    return acc
