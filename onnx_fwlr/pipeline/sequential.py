"""Sequential error correction: each site is fitted to the input it really receives in the compressed model.

The closed-form methods fit every site to the original model's activations X, so errors of earlier sites
add up. Here sites are compressed in order of depth (the number of sites on the longest path from the
model inputs to the site). For each depth, one pass runs the original and the partially compressed model
(every shallower site already replaced) on the same calibration batches and sums, per site input,

    G̃ = X̃ᵀX̃,   C = X̃ᵀX,   G = XᵀX,   Σx̃,  Σx        (X̃: the input in the compressed model)

(X, which does not change from depth to depth, comes from one run of the original for several depths at a time,
kept in memory up to ORIGINAL_ROWS_BYTES.)

Each site then solves, with the output-side weighting Q of its method (K-FAC: Cholesky of the output
gradient Gram; identity otherwise) and s = mean(diag G̃),

    min over rank r   ‖(X̃W' − XW) Q‖² + λ·s·‖(W' − W) Q‖²

which is a weighted low-rank problem in closed form: with G̃ + λsI = LLᵀ and
W* = (G̃ + λsI)⁻¹(C W + λ s W) the objective is ‖Lᵀ(W' − W*)Q‖² + const, so W' is the truncated SVD of
Lᵀ W* Q mapped back. The ridge pulls W' toward the original weight: without it, a site overfits the
calibration set (measured on all-MiniLM-L6-v2). λ is chosen per site from a grid by the same objective on
held-back batches (every `holdout_every`-th batch, never fitted on), and the closed-form factors of the
method compete too, so a site never gets a solution worse on held-back data than the one it started with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import scipy.linalg
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.batching import MICRO_BATCH, PaddingTrimmer, micro_batches, padded_inputs, sample_axis_first
from onnx_fwlr.io.data import Batches, find_mask_input, open_data
from onnx_fwlr.methods import lowrank
from onnx_fwlr.pipeline.build import site_replacement
from onnx_fwlr.pipeline.prepare import Prepared, site_decompositions
from onnx_fwlr.rewrite.lowrank import Factors, apply_factors
from onnx_fwlr.sites.find import Site
from onnx_fwlr.stats.activations import main_graph_tensors, make_session

RIDGES = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
# The original model's site inputs are kept in memory up to this size for the depths still to come, so one run of
# the original serves several depths (MiniLM: its 24 depths in 4 runs of the original instead of 24; _window).
ORIGINAL_ROWS_BYTES = 256 * 2**20


@dataclass
class SequentialSite:
    """What the correction did for one site, for the report."""

    weight: str
    depth: int
    ridge: float | None  # None: the closed-form factors won on held-back data
    heldout_error_before: float  # relative held-back objective of the closed-form factors
    heldout_error_after: float


def site_depths(model: onnx.ModelProto, sites: list[Site]) -> dict[str, int]:
    """weight name -> number of sites on the longest path from the inputs to the site's input."""
    by_output = {}
    for site in sites:
        for use in site.uses:
            if use.graph_index == 0:
                by_output[use.output] = site.weight
    depth_of_tensor: dict[str, int] = {}
    depths: dict[str, int] = {}
    for node in model.graph.node:  # ONNX main graphs are topologically sorted
        incoming = max((depth_of_tensor.get(name, 0) for name in node.input if name), default=0)
        outgoing = incoming
        for name in node.output:
            if name in by_output:
                weight = by_output[name]
                depths[weight] = max(depths.get(weight, 0), incoming)
                outgoing = incoming + 1
        for name in node.output:
            depth_of_tensor[name] = outgoing
    return depths


def correctable(model: onnx.ModelProto, site: Site) -> bool:
    """Single-use MatMul/Gemm sites of the main graph reading an un-transposed input."""
    if len(site.uses) != 1:
        return False
    use = site.uses[0]
    visible = main_graph_tensors(model)
    return (use.op_type in ("MatMul", "Gemm") and use.graph_index == 0 and not use.trans_a
            and use.input in visible)


def _truncated(model: onnx.ModelProto, names: list[str], copy: bool = True) -> onnx.ModelProto:
    """A copy of the model that returns only the named float tensors and runs only the nodes they need
    (a shallow depth costs a fraction of a full forward pass). copy=False cuts `model` itself: for a throwaway
    model, so that the model is not held twice."""
    needed, keep = set(names), set()
    for index in reversed(range(len(model.graph.node))):
        node = model.graph.node[index]
        if needed.intersection(node.output):
            keep.add(index)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    truncated = model
    if copy:
        truncated = onnx.ModelProto()
        truncated.CopyFrom(model)
    graph = truncated.graph
    kept = [node for index, node in enumerate(graph.node) if index in keep]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return truncated


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside a node's subgraphs (If/Loop/Scan bodies)."""
    reads = set()
    for attribute in node.attribute:
        for graph in list(attribute.g.node and [attribute.g]) + list(attribute.graphs):
            for inner in graph.node:
                reads.update(inner.input)
                reads.update(_subgraph_reads(inner))
    return reads


def _rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[positions, K] float32 of the real positions: padding rows (mask [batch, seq] matching x's leading dims)
    are dropped, not zeroed, so they cost the Grams nothing."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    if mask is not None and x.ndim >= 3 and x.shape[:2] == mask.shape:
        rows = rows[mask.reshape(-1) != 0]
    return rows


def _positions(x: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is not None and x.ndim >= 3 and x.shape[:2] == mask.shape:
        return float(mask.sum())
    return float(np.prod(x.shape[:-1]))


def _accumulate(sums: dict, x_new: np.ndarray, x_old: np.ndarray) -> None:
    for key, value in (("gram_new", x_new.T @ x_new), ("cross", x_new.T @ x_old), ("gram_old", x_old.T @ x_old),
                       ("sum_new", x_new.sum(0)), ("sum_old", x_old.sum(0))):
        if key in sums:
            sums[key] += value  # in place: no new float64 [K, K] per batch
        else:
            sums[key] = value.astype(np.float64)


def _collect(compressed_session, inputs: list[str], batches: Batches, mask_name, holdout_every, pieces,
             original: dict):
    """Per input tensor: sums on fitting batches and on held-back batches; each batch is run in `pieces`, and the
    original's rows for each piece come from `original` (_original_rows)."""
    fit = {name: {} for name in inputs}
    held = {name: {} for name in inputs}
    counts = {"fit": 0.0, "held": 0.0}
    for index, (feed, _) in enumerate(batches):
        part = held if holdout_every and index % holdout_every == holdout_every - 1 else fit
        for j, whole in enumerate(pieces(feed)):
            new, piece = pieces.trimmer(lambda f, _: (dict(zip(inputs, compressed_session.run(inputs, f))), f),
                                        whole, None)
            mask = piece.get(mask_name) if mask_name else None
            old = original[index, j]
            for name in inputs:
                x_new, (x_old, _) = _rows(new[name], mask), old[name]
                if x_new.shape != x_old.shape:
                    raise RuntimeError(f"input {name!r}: the two models gave {x_new.shape} and {x_old.shape} rows")
                _accumulate(part[name], x_new, x_old)
            counts["held" if part is held else "fit"] += old[inputs[0]][1]
    return fit, held, counts


def _original_rows(session, names: list[str], batches: Batches, mask_name, pieces) -> dict:
    """(batch index, piece index) -> input name -> (its real rows in the original model, positions counted): one
    run of the original, truncated at `names`, serves every depth whose inputs are among them."""
    rows = {}
    for index, (feed, _) in enumerate(batches):
        for j, whole in enumerate(pieces(feed)):
            values, piece = pieces.trimmer(lambda f, _: (dict(zip(names, session.run(names, f))), f), whole, None)
            mask = piece.get(mask_name) if mask_name else None
            rows[index, j] = {n: (_rows(values[n], mask), _positions(values[n], mask)) for n in names}
    return rows


def _window(levels: list[int], start: int, inputs_of: dict, widths: dict, positions: float | None,
            budget: int = ORIGINAL_ROWS_BYTES) -> tuple[list[int], list[str]]:
    """The depths from levels[start] on whose original inputs fit in `budget` bytes of float32 rows together, and
    those inputs: at least one depth, and only one while the number of positions is unknown."""
    chosen, names, total = [], set(), 0.0
    for level in levels[start:]:
        new = set(inputs_of[level]) - names
        extra = 4.0 * (positions or 0.0) * sum(widths[n] for n in new)
        if chosen and (positions is None or total + extra > budget):
            break
        chosen.append(level)
        names |= new
        total += extra
    return chosen, sorted(names)


def _session(model: onnx.ModelProto):
    """Pieces are cut to their length, so shapes vary from run to run: no memory arena (io.runtime)."""
    return make_session(model, arena=False)


def _pieces(model: onnx.ModelProto, batches: Batches, mask_name: str | None):
    """feed -> its micro-batches without trailing padding (io.batching): a depth's two truncated models run on
    56 % of MiniLM's padded positions instead of all of them."""
    size = MICRO_BATCH if sample_axis_first(model, batches.specs) else None

    def pieces(feed):
        for part, _ in micro_batches(feed, None, size):
            yield part
    pieces.trimmer = PaddingTrimmer(mask_name, padded_inputs(batches.specs, mask_name))  # cuts, as the model allows
    return pieces


class _Objective:
    """‖(X̃W' − XW)Q‖² from one set of sums, for the many W' tried for one site W: the terms without W' (the
    weighted W, C W Q and the constant) are made once, not per candidate."""

    def __init__(self, sums: dict, W: np.ndarray, right):
        self.sums, self.right = sums, right
        Wq = self._weigh(W)
        self.cross = sums["cross"] @ Wq
        self.constant = np.sum(Wq * (sums["gram_old"] @ Wq))

    def _weigh(self, M: np.ndarray) -> np.ndarray:
        return self.right.apply_right(M) if self.right is not None else M

    def __call__(self, Wp: np.ndarray) -> float:
        Wpq = self._weigh(Wp)
        return float(np.sum(Wpq * (self.sums["gram_new"] @ Wpq)) - 2 * np.sum(Wpq * self.cross) + self.constant)


def _objective(sums: dict, W: np.ndarray, Wp: np.ndarray, right) -> float:
    """‖(X̃W' − XW)Q‖² from the sums, without materialising X."""
    return _Objective(sums, W, right)(Wp)


def _ridge_solution(sums: dict, W: np.ndarray, rank: int, ridge: float, right) -> tuple[np.ndarray, np.ndarray]:
    """The rank-r minimiser of ‖(X̃W' − XW)Q‖² + λ s ‖(W' − W)Q‖² (module docstring)."""
    # Sums grow with the data; in units of s the Cholesky factor is O(1), so A and B come out at the scale of
    # the closed-form factors (an unnormalised L made A ~√count times smaller and B larger, which threw Adam
    # off in refine: it moves every entry by about lr whatever its size).
    scale = float(np.mean(np.diag(sums["gram_new"]))) or 1.0
    regularised = sums["gram_new"] / scale + ridge * np.eye(len(W))
    chol = scipy.linalg.cholesky(regularised, lower=True, check_finite=False)
    target = scipy.linalg.cho_solve((chol, True), sums["cross"] @ W / scale + ridge * W, check_finite=False)
    return lowrank.weighted_svd(target, lowrank.Scaling(chol=chol), right).factors(rank)


def correct_site(fit: dict, held: dict, W: np.ndarray, start: Factors, rank: int, right, ridges=RIDGES):
    """Best of the closed-form start and the ridge solutions, judged on held-back sums (or on fitting sums
    when nothing was held back); the chosen ridge is then refitted on all the data.
    Returns (A, B, ridge or None, relative held-back error before, after)."""
    judge = _Objective(held if held else fit, W, right)
    reference = judge(np.zeros_like(W)) or 1.0
    best = (start.A, start.B, None, judge(start.A @ start.B))
    before = best[3]
    for ridge in ridges:
        A, B = _ridge_solution(fit, W, rank, ridge, right)
        error = judge(A @ B)
        if error < best[3]:
            best = (A, B, ridge, error)
    A, B, ridge, error = best
    if ridge is not None and held:
        A, B = _ridge_solution({k: fit[k] + held[k] for k in fit}, W, rank, ridge, right)
    return A, B, ridge, before / reference, error / reference


def sequential_factors(
    original: onnx.ModelProto,
    sites: list[Site],
    start: dict[str, Factors],
    weights: dict[str, np.ndarray],
    right_scalings: dict,
    batches: Batches,
    mask_input: str | None = None,
    bias_correction: bool = True,
    holdout_every: int = 5,
    progress: bool = True,
) -> tuple[dict[str, Factors], list[SequentialSite]]:
    """Factors corrected depth by depth; sites that cannot be corrected keep their start factors.

    `start`: closed-form factors per weight (their ranks are kept); `right_scalings`: the output-side
    Scaling (or None) per weight; `batches` are read once per depth.
    """
    factors = dict(start)
    eligible = [s for s in sites if s.weight in start and correctable(original, s)]
    if not eligible:
        return factors, []
    depths = site_depths(original, eligible)
    levels = sorted({depths[s.weight] for s in eligible})
    inputs_of = {level: sorted({s.uses[0].input for s in eligible if depths[s.weight] == level}) for level in levels}
    widths = {s.uses[0].input: s.K for s in eligible}
    mask_name = find_mask_input(batches.specs, mask_input)
    pieces = _pieces(original, batches, mask_name)
    report, window, positions = [], [], None
    for i, level in enumerate(tqdm(levels, desc="sequential", unit="depth", disable=not progress, leave=False)):
        level_sites = [s for s in eligible if depths[s.weight] == level]
        inputs = inputs_of[level]
        if level not in window:
            original_rows = None  # the last window's rows go before the next are made
            window, names = _window(levels, i, inputs_of, widths, positions)
            original_rows = _original_rows(_session(_truncated(original, names)), names, batches, mask_name, pieces)
        compressed = onnx.ModelProto()
        compressed.CopyFrom(original)
        apply_factors(compressed, sites, {w: f for w, f in factors.items() if _shallower(w, depths, level)})
        session = _session(_truncated(compressed, inputs, copy=False))
        del compressed  # only its session is needed: the model is not held while the sums are made
        fit, held, counts = _collect(session, inputs, batches, mask_name, holdout_every, pieces, original_rows)
        del session
        positions = counts["fit"] + counts["held"]
        if counts["fit"] == 0:
            raise FwlrError("sequential correction found no calibration positions to fit on; give more data.")
        for site in level_sites:
            name = site.uses[0].input
            W, rank = weights[site.weight], start[site.weight].A.shape[1]
            A, B, ridge, before, after = correct_site(fit[name], held[name] if counts["held"] else {}, W,
                                                      start[site.weight], rank, right_scalings.get(site.weight))
            shift = None
            if bias_correction:
                total = {k: fit[name][k] + held[name].get(k, 0.0) for k in ("sum_new", "sum_old")}
                n = counts["fit"] + counts["held"]
                shift = (total["sum_old"] / n) @ W - ((total["sum_new"] / n) @ A) @ B
            factors[site.weight] = Factors(A, B, shift)
            report.append(SequentialSite(site.weight, level, ridge, before, after))
        del fit, held  # this depth's Grams go before the next depth's model and session are made
    return factors, report


def _shallower(weight: str, depths: dict, level: int) -> bool:
    """Sites decided before this depth (sites outside the correction count as decided from the start)."""
    return depths.get(weight, -1) < level


@dataclass
class Corrected:
    """Sequentially corrected factors per weight, with a report note per site."""

    factors: dict
    notes: dict
    seconds: float


@threadpool_limits.wrap(limits=1, user_api="blas")  # Grams and ridge solves between ORT runs (docs/speed.md)
def correct_sequentially(prepared: Prepared, ranks: list[int | None], calibration, bias_correction: bool, *,
                         batch_size: int = 32, mask_input=None, shapes=None, progress: bool = True) -> Corrected:
    """Refit the factorised sites depth by depth on the partially compressed model (sequential_factors)."""
    if calibration is None:
        raise FwlrError("`sequential` reads the calibration data once per depth; pass `calibration`.")
    start_time = time.perf_counter()
    start, right = {}, {}
    for (site, dec), rank in zip(site_decompositions(prepared, ranks, store=True), ranks):
        replacement = site_replacement(prepared, site, dec, rank, bias_correction)[1]
        if isinstance(replacement, Factors):
            start[site.weight] = replacement
            right[site.weight] = dec.right  # kfac's output-side factor, made once with the decomposition
    batches = open_data(calibration, prepared.model, batch_size=batch_size, shapes=shapes)
    factors, results = sequential_factors(
        prepared.model, prepared.sites, start, prepared.weights, right, batches,
        mask_input=mask_input, bias_correction=bias_correction, progress=progress)
    notes = {r.weight: (f"sequential: ridge {r.ridge:g}" if r.ridge is not None else "sequential: closed form kept")
             + f", held-back rel. error {r.heldout_error_before:.3g} -> {r.heldout_error_after:.3g}" for r in results}
    return Corrected(factors, notes, time.perf_counter() - start_time)
