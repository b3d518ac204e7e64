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

LOSSES = ("ce", "mc", "gaussian", "lm")
IGNORE_INDEX = -100  # label value that marks a position without a target (the Hugging Face convention)
_CHUNK_ELEMENTS = 1 << 20  # softmax rows are worked on in float64 chunks of about this many entries


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


def default_seed_loss(target: SeedTarget, output_shape, labels_given: bool, next_token: bool = False,
                      class_scores: bool | None = None) -> str:
    """The Fisher seed: 'ce' with labels; 'lm' for a language model's next-token logits (``next_token``);
    'mc' for logits/probabilities ((Log)Softmax output, or a 2-D [batch, classes] output that the graph says
    is class scores); else 'gaussian' (an embedding: a normalised mean pool is 2-D too, and a softmax over its
    features would weight errors by a distribution that does not exist). ``class_scores`` is the caller's
    reading of the graph (evaluate.outputs.score_outputs); None when unknown, and then every 2-D output counts
    as scores. (refine picks its distillation loss by another rule: refine.losses.default_distillation_loss.)"""
    if labels_given:
        return "ce"
    if next_token:
        return "lm"
    if target.classifier:
        return "mc"
    if len(output_shape) == 2 and class_scores is not False:
        return "mc"
    return "gaussian"


def class_rows(z: np.ndarray, axis: int, legacy_2d: bool) -> np.ndarray:
    """View z as [rows, classes] with the class axis last."""
    if legacy_2d:
        axis = axis % z.ndim
        return z.reshape(int(np.prod(z.shape[:axis], dtype=np.int64)), -1)
    moved = np.moveaxis(z, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def from_rows(rows: np.ndarray, like: np.ndarray, axis: int, legacy_2d: bool) -> np.ndarray:
    if legacy_2d:
        return rows.reshape(like.shape)
    moved_shape = np.moveaxis(like, axis, -1).shape
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def _softmax_rows(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    e = np.exp(rows - rows.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _row_chunks(rows: int, classes: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges whose float64 softmax stays small: a vocabulary-sized output ([B, T, V])
    is never held in float64 at once, only its seed in the output's own dtype."""
    step = max(1, _CHUNK_ELEMENTS // max(classes, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _softmax_minus_onehot(rows: np.ndarray, labels: np.ndarray, dtype) -> np.ndarray:
    """softmax(rows) − onehot(labels), computed in float64 chunk by chunk, returned in ``dtype``."""
    out = np.empty(rows.shape, dtype=dtype)
    for start, stop in _row_chunks(*rows.shape):
        g = _softmax_rows(rows[start:stop])
        g[np.arange(stop - start), labels[start:stop]] -= 1.0
        out[start:stop] = g
    return out


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
    rows = class_rows(logits, axis, legacy_2d)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.shape[0] != rows.shape[0]:
        raise FwlrError(f"Got {labels.shape[0]} labels for {rows.shape[0]} predictions; pass one class "
                        "index per prediction.")
    if labels.size and (labels.min() < 0 or labels.max() >= rows.shape[1]):
        raise FwlrError(f"Labels must lie in [0, {rows.shape[1]}); fix the label encoding.")
    g = _softmax_minus_onehot(rows, labels, logits.dtype)
    return _apply_weight(from_rows(g, logits, axis, legacy_2d), weight)


def mc_seeds(logits: np.ndarray, draws: int, rng: np.random.Generator, *, axis: int = -1,
             legacy_2d: bool = False, weight=None) -> list[np.ndarray]:
    """``draws`` seeds p − onehot(ỹ) with ỹ sampled from the model's own softmax (Monte-Carlo true Fisher)."""
    rows = class_rows(logits, axis, legacy_2d)
    uniforms = [rng.random((rows.shape[0], 1)) for _ in range(draws)]
    seeds = [np.empty(rows.shape, dtype=logits.dtype) for _ in range(draws)]
    for start, stop in _row_chunks(*rows.shape):
        p = _softmax_rows(rows[start:stop])
        cdf = np.cumsum(p, axis=1)
        for u, seed in zip(uniforms, seeds):
            sampled = np.minimum((cdf < u[start:stop] * cdf[:, -1:]).sum(axis=1), rows.shape[1] - 1)
            g = p.copy()
            g[np.arange(stop - start), sampled] -= 1.0
            seed[start:stop] = g
    return [_apply_weight(from_rows(seed, logits, axis, legacy_2d), weight) for seed in seeds]


def next_token_targets(tokens: np.ndarray, mask=None, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Targets [B, T] (position t predicts token t+1) and where they count [B, T] bool.

    The targets are ``labels`` when given (unshifted, as Hugging Face passes them; IGNORE_INDEX skips a
    position), else the input ids. A position counts when its target exists and, with an attention
    mask, both it and the next position are real tokens; the last position never has a target.
    """
    source = np.asarray(tokens if labels is None else labels)
    if source.ndim != 2 or (labels is not None and np.shape(labels) != np.shape(tokens)):
        raise FwlrError(f"The 'lm' loss needs token ids [batch, seq] (got {source.shape}); labels, when given, "
                        "must have the same shape as the input ids.")
    targets = np.zeros(source.shape, dtype=np.int64)
    targets[:, :-1] = source[:, 1:]
    keep = np.zeros(source.shape, dtype=bool)
    keep[:, :-1] = source[:, 1:] != IGNORE_INDEX
    if mask is not None:
        mask = np.asarray(mask) != 0
        keep[:, :-1] &= mask[:, :-1] & mask[:, 1:]
    targets[~keep] = 0
    return targets, keep


def lm_seed(logits: np.ndarray, tokens: np.ndarray, *, mask=None, labels=None) -> np.ndarray:
    """Cotangent of the per-sequence next-token cross-entropy Σ_t −log p(y_{t+1} | y_≤t) w.r.t. logits [B, T, V].

    softmax(z_t) − onehot(y_{t+1}) where a target counts (next_token_targets), zero elsewhere (padding, the
    last position). Worked on in float64 row chunks; the seed has the logits' dtype.
    """
    if logits.ndim != 3 or logits.shape[:2] != np.shape(tokens):
        raise FwlrError(f"The 'lm' loss needs logits [batch, seq, vocab] matching the token ids {np.shape(tokens)}; "
                        f"the seeded output has shape {logits.shape}. Name the logits output with `output`.")
    targets, keep = next_token_targets(tokens, mask, labels)
    vocab = logits.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= vocab):
        raise FwlrError(f"Token ids must lie in [0, {vocab}) for the 'lm' loss; check the data's tokenizer.")
    rows = logits.reshape(-1, vocab)
    seed = _softmax_minus_onehot(rows, targets.reshape(-1), logits.dtype).reshape(logits.shape)
    seed[~keep] = 0
    return seed


def gaussian_seeds(shape, draws: int, rng: np.random.Generator, *, dtype=np.float32,
                   weight=None) -> list[np.ndarray]:
    """``draws`` seeds ε ~ N(0, I): the Fisher of a unit-variance Gaussian likelihood on the output."""
    return [_apply_weight(rng.standard_normal(tuple(shape)).astype(dtype), weight) for _ in range(draws)]


def make_seeds(loss: str, z: np.ndarray, *, target: SeedTarget | None = None, labels=None, draws: int = 1,
               rng: np.random.Generator | None = None, weight=None, tokens=None) -> list[np.ndarray]:
    """Seeds for the values ``z`` of ``target.tensor`` under ``loss`` ('ce' and 'lm' give one seed).

    'lm' reads the input ids ``tokens`` [B, T] and uses ``weight`` (the attention mask) as the padding mask.
    """
    target = target or SeedTarget("")
    rng = rng if rng is not None else np.random.default_rng(0)
    if loss == "lm":
        if tokens is None:
            raise FwlrError("The 'lm' loss needs the model's token ids input; feed input_ids or choose another loss.")
        return [lm_seed(z, tokens, mask=weight, labels=labels)]
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


# The output-side Gram Σ g gᵀ of a site wider than this is never formed: an LM head's is vocabulary²
# (49,152² float64 = 19 GB). It is kept as a rank-SKETCH_RANK factor plus its exact diagonal instead
# (docs/llm.md, "Memory and K-FAC at scale", says why this estimator and these numbers).
SKETCH_MIN_DIM = 8192
SKETCH_RANK = 256


def sketched(n: int, min_dim: int = SKETCH_MIN_DIM) -> bool:
    """Whether an output side of width n gets the low-rank + diagonal estimator instead of its exact Gram."""
    return n > min_dim


def new_accumulator(k: int, n: int, with_gram: bool = True, sketch_rank: int | None = None) -> dict:
    """Zeroed running sums for one site with weight [K, N]; with `sketch_rank`, the output-side Gram is held
    as 'grad_sketch' [≤ rank, N] (S, with Sᵀ S the Gram's leading part) and 'grad_diag' [N] (its exact diagonal)."""
    acc = {"fisher_row": np.zeros(k), "fisher_col": np.zeros(n), "grad_count": 0}
    if with_gram and sketch_rank:
        acc["grad_sketch"] = np.zeros((0, n))
        acc["grad_diag"] = np.zeros(n)
        acc["sketch_rank"] = sketch_rank
    elif with_gram:
        acc["grad_gram"] = np.zeros((n, n))
    return acc


def fold_sketch(sketch: np.ndarray, rows: np.ndarray, rank: int) -> np.ndarray:
    """The best rank-`rank` factor S' (S'ᵀ S' ≈ Sᵀ S + rowsᵀ rows) of the stacked rows, in float64.

    The rows of the result are σ_i v_iᵀ for the leading right singular vectors v_i of [S; rows], found from
    the small (r+m)² Gram of the stack; what is cut is positive semi-definite, so S'ᵀ S' never exceeds the
    true Gram and the exact diagonal minus diag(S'ᵀ S') is the residual's diagonal (≥ 0). Deterministic."""
    for start in range(0, max(len(rows), 1), max(rank, 1)):  # at most `rank` new rows per step: a bounded stack
        stacked = np.concatenate([sketch, np.asarray(rows[start:start + max(rank, 1)], dtype=np.float64)], axis=0)
        if stacked.shape[0] <= rank:
            sketch = stacked
            continue
        values, vectors = np.linalg.eigh(stacked @ stacked.T)
        top = np.argsort(values)[::-1][:rank]
        top = top[values[top] > 0]
        sketch = vectors[:, top].T @ stacked
    return sketch


def sketch_peak_bytes(n: int, rank: int = SKETCH_RANK) -> int:
    """Most bytes the estimator holds for an output side of width n while folding (fold_sketch): the stack of
    the factor and at most `rank` new rows, its (2·rank)² Gram, and the new factor (float64)."""
    return 8 * (2 * rank * n + 4 * rank * rank + rank * n + n)


def output_stat_bytes(n: int, sketch_min_dim: int = SKETCH_MIN_DIM, rank: int = SKETCH_RANK) -> int:
    """Bytes the output-side statistic of a width-n site takes at rest: n² float64, or the estimator's."""
    return 8 * (rank * n + n) if sketched(n, sketch_min_dim) else 8 * n * n


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


def accumulate_fisher(acc: dict, X: np.ndarray, G: np.ndarray, keep: np.ndarray | None = None,
                      sketch_rank: int | None = None) -> dict:
    """Fold one batch of per-sample gradients of a site's weight into running float64 sums.

    X [B, ..., K] is the site input and G [B, ..., N] the cotangent of the site output, per sample B
    (one row per (sample, seed) pair) and position. dW_n = X_nᵀ G_n sums over that sample's positions
    before squaring; `keep` [B, P] (the attention mask) leaves padding positions out, which then cost
    nothing. Updates ``acc`` in place (an empty dict becomes ``new_accumulator(K, N)``; the Gram is
    skipped when 'grad_gram' is absent) and returns it: 'fisher_row' [K] += Σ_n Σ_j dW_n[i,j]²,
    'fisher_col' [N] += Σ_n Σ_i dW_n[i,j]², 'grad_gram' [N,N] += Σ_{n,p} g gᵀ, 'grad_count' += B.
    One sample at a time as 2-D BLAS products, so memory stays at a few [K, N] (or [P, P]) buffers.
    `sketch_rank` (for a new accumulator): hold the output-side Gram as a low-rank factor plus its diagonal
    (fold_sketch) instead of [N, N].
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
        acc.update(new_accumulator(k, n, sketch_rank=sketch_rank))
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
        acc["grad_gram"] += flat.T @ flat  # in place: no new [N, N] float64 array per batch
    elif "grad_sketch" in acc:
        flat = G[keep] if keep is not None else G.reshape(-1, n)
        acc["grad_diag"] += np.einsum("pn,pn->n", flat, flat, dtype=np.float64)
        acc["grad_sketch"] = fold_sketch(acc["grad_sketch"], flat, int(acc["sketch_rank"]))
    acc["grad_count"] = acc["grad_count"] + b
    return acc
