"""The Python API: load, measure, decompose, allocate, rewrite.

    model, report = onnx_fwlr.compress("model.onnx", ratio=0.5, method="whiten", calibration="calib.npz")

The stages are separate functions so a sweep or a fidelity search decomposes each site once and then
tries many budgets: `prepare` (load, find sites, calibrate, decompose) → `choose_ranks` → `build`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnx_fwlr.methods import allocation as alloc
from onnx_fwlr.methods import lowrank as factorize
from onnx_fwlr.stats.activations import collect_activation_stats
from onnx_fwlr.io.data import open_data
from onnx_fwlr.methods.decompose import Weighting, iter_decompositions
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import external_bytes, load_model
from onnx_fwlr.evaluate.report import Report, SiteResult, op_counts
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.rewrite.lowrank import Factors, apply_factors, storage_dtype
from onnx_fwlr.sites.find import Site, Skipped, attention_projections, model_parameters, validate_regex, weight_matrix
from onnx_fwlr.stats.store import Statistics, activation_key, model_fingerprint

# Which statistics each method needs from calibration.
METHODS = {
    "svd": (),
    "asvd": ("activations",),
    "whiten": ("activations",),
    "fwsvd": ("gradients",),
    "kfac": ("activations", "gradients"),
    "kron": (),  # Kronecker sums (structured_sites); weighted like whiten when activation statistics exist
}
ALLOCATIONS = ("uniform", "global")


@dataclass
class Budget:
    """How much the factorised weights may keep. Exactly one of ratio, rank, target_size, max_error."""

    ratio: float | None = None  # parameters kept / original parameters of the factorisable weights
    rank: int | None = None  # one rank for every site
    target_size: int | None = None  # bytes of the output model
    max_error: float | None = None  # largest relative L2 output error allowed on validation data
    ranks: dict = field(default_factory=dict)  # per-site overrides: site, node or weight name -> rank

    def check(self) -> None:
        given = [n for n in ("ratio", "rank", "target_size", "max_error") if getattr(self, n) is not None]
        if len(given) > 1:
            raise FwlrError(f"{' and '.join('--' + g.replace('_', '-') for g in given)} given together; pass one budget.")
        if not given and not self.ranks:
            raise FwlrError("no budget given; pass --ratio R (0 < R <= 1), --rank N, --target-size or --max-error.")
        if self.ratio is not None and not (0 < self.ratio <= 1):
            raise FwlrError(f"--ratio {self.ratio} is out of range; it must satisfy 0 < ratio <= 1.")
        if self.rank is not None and self.rank < 1:
            raise FwlrError(f"--rank {self.rank} is out of range; it must be a positive integer.")
        if self.target_size is not None and self.target_size <= 0:
            raise FwlrError(f"--target-size {self.target_size} is out of range; give a positive number of bytes.")
        if self.max_error is not None and not (self.max_error > 0):
            raise FwlrError(f"--max-error {self.max_error} is out of range; give a positive relative error.")
        for name, rank in self.ranks.items():
            if int(rank) < 1:
                raise FwlrError(f"--rank {name}={rank} is out of range; ranks are positive integers.")

    def describe(self) -> dict:
        data = {k: getattr(self, k) for k in ("ratio", "rank", "target_size", "max_error") if getattr(self, k) is not None}
        if self.ranks:
            data["ranks"] = dict(self.ranks)
        return data


@dataclass
class Prepared:
    """Everything that does not depend on the budget: sites, statistics and one decomposition per site."""

    model: onnx.ModelProto  # the loaded original; never modified
    sites: list[Site]
    skipped: list[Skipped]
    method: str
    stats: Statistics | None
    weights: dict = field(default_factory=dict)  # weight name -> float64 [K, N] (SiteWeights: read on access)
    decompositions: dict = field(default_factory=dict)  # weight name -> factorize.Decomposition (the cache)
    site_methods: dict = field(default_factory=dict)  # weight name -> method actually used
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    svd: str = "exact"  # exact | randomized | auto (factorize.use_randomized)
    workers: int = 1  # processes for decomposition
    progress: bool = True


class SiteWeights(Mapping):
    """weight name -> float64 [K, N], read from the model on each access (memory-mapped when it was loaded
    lazily) instead of holding every weight in memory at once."""

    def __init__(self, model: onnx.ModelProto, sites: list[Site]):
        self._model = model
        self._sites = {s.weight: s for s in sites}

    def __getitem__(self, weight: str) -> np.ndarray:
        return weight_matrix(self._model, self._sites[weight])

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


def check_method(method: str, allocation: str) -> None:
    if method not in METHODS:
        raise FwlrError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    if allocation not in ALLOCATIONS:
        raise FwlrError(f"unknown allocation '{allocation}'; choose one of {', '.join(ALLOCATIONS)}.")
    if allocation == "global" and "gradients" not in METHODS[method]:
        raise FwlrError(
            "--allocation global ranks sites in loss units and needs gradient statistics; use --method fwsvd or "
            "kfac with it, or --allocation uniform."
        )


def compress(
    model: str | onnx.ModelProto,
    *,
    ratio: float | None = None,
    rank: int | None = None,
    ranks: dict | None = None,
    target_size: int | None = None,
    max_error: float | None = None,
    validation=None,
    method: str = "svd",
    allocation: str = "uniform",
    include: str | None = None,
    exclude: str | None = None,
    keep_attention: bool = False,
    calibration=None,
    stats=None,
    batch_size: int = 32,
    mask_input: str | None = None,
    shapes: dict | None = None,
    bias_correction: bool | None = None,
    fisher_options: dict | None = None,
    sequential: bool = False,
    methods: list[str] | None = None,
    dope: float = 0.0,
    kron_shape: tuple[int, int, int, int] | None = None,
    svd: str = "auto",
    workers: int = 1,
    stats_memory: int | None = None,
    progress: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Factorise every selected constant MatMul/Gemm weight; returns the new model and a report.

    The input (path or ModelProto) is never modified. Methods other than svd need statistics: give
    `calibration` data (a .npz path, a folder of them, an iterable of feed dicts, a CalibrationDataReader,
    or "random" for a smoke test) or precomputed `stats` (a Statistics object or a stats file path).
    `max_error` searches the smallest ratio whose outputs stay within that relative L2 error on
    `validation` data. `sequential` refits every site, depth by depth, to the input it receives in the
    partially compressed model (sequential.py); it reads `calibration` once per depth. `svd` "auto" uses a
    randomised SVD where the rank is known first and small (factorize.use_randomized); `workers` decomposes
    sites in that many processes (same output bytes). `stats_memory` (bytes; default a third of physical
    memory) bounds the activation Grams held at once: beyond it calibration reads the data once per group
    of sites (calibration.GroupedStatistics).
    """
    budget = Budget(ratio, rank, target_size, max_error, dict(ranks or {}))
    budget.check()
    mix = list(methods) if methods else [method]
    if len(mix) > 1 or "kron" in mix or dope or kron_shape is not None:
        if sequential:
            raise FwlrError("--sequential refits plain low-rank factors only; drop it with --method kron, --methods or --dope.")
        return _compress_structured(
            model, mix, budget, allocation, bias_correction, dope, kron_shape,
            dict(include=include, exclude=exclude, keep_attention=keep_attention, calibration=calibration, stats=stats,
                 batch_size=batch_size, mask_input=mask_input, shapes=shapes, fisher_options=fisher_options,
                 stats_memory=stats_memory, progress=progress))
    method = mix[0]
    check_method(method, allocation)
    if max_error is not None and validation is None:
        raise FwlrError("--max-error needs validation data to measure the error on; pass --val DATA.")
    prepared = prepare(
        model, method=method, include=include, exclude=exclude, keep_attention=keep_attention,
        calibration=calibration, stats=stats, batch_size=batch_size, mask_input=mask_input, shapes=shapes,
        fisher_options=fisher_options, svd=svd, workers=workers, stats_memory=stats_memory, progress=progress,
    )
    if bias_correction is None:
        bias_correction = "activations" in METHODS[method]
    if not prepared.sites:
        return build(prepared, [], allocation, budget, bias_correction)
    if max_error is not None:
        return _search_max_error(prepared, budget, allocation, bias_correction, validation, batch_size, progress)
    ranks_chosen = choose_ranks(prepared, budget, allocation)
    corrected = None
    if sequential:
        corrected = correct_sequentially(prepared, ranks_chosen, calibration, bias_correction, batch_size=batch_size,
                                         mask_input=mask_input, shapes=shapes, progress=progress)
    return build(prepared, ranks_chosen, allocation, budget, bias_correction, corrected=corrected,
                 keep_decompositions=False)


def prepare(
    model, *, method="svd", include=None, exclude=None, keep_attention=False, calibration=None, stats=None,
    batch_size=32, mask_input=None, shapes=None, fisher_options=None, svd="exact", workers=1, stats_memory=None,
    progress=True,
) -> Prepared:
    """Load, find sites and gather statistics: everything but the decompositions.

    Sites are decomposed when first needed (ensure_decompositions, choose_ranks for global allocation, build),
    so a one-shot build can drop each decomposition as soon as its factors exist, and "auto" or "randomized"
    SVDs can stop at the rank needed. Each is decomposed once: the cache serves every later budget.
    """
    factorize.use_randomized(1, 1, None, svd)  # rejects an unknown choice before any work
    if workers < 1:
        raise FwlrError(f"--workers {workers} is out of range; give 1 or more worker processes.")
    validate_regex(include, "--include")
    validate_regex(exclude, "--exclude")
    start = time.perf_counter()
    model = load_model(model)
    sites, skipped = find_all_sites(model, include, exclude, fisher="gradients" in METHODS.get(method, ()))
    warnings = _unmatched_patterns(include, exclude, sites, skipped)
    if keep_attention:
        projections = attention_projections(model, sites)
        skipped += [Skipped(s.name, s.uses[0].op_type, s.weight, "attention projection kept dense (--keep-attention)")
                    for s in sites if s.weight in projections]
        sites = [s for s in sites if s.weight not in projections]
    prepared = Prepared(model, sites, skipped, method, None, warnings=warnings, svd=svd, workers=workers,
                        progress=progress)
    prepared.weights = SiteWeights(model, sites)
    prepared.timings["load"] = time.perf_counter() - start
    if not sites:
        prepared.warnings.append("the model has no factorisable MatMul/Gemm weight; nothing was changed.")
        return prepared
    start = time.perf_counter()
    prepared.stats = _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes,
                                 fisher_options or {}, stats_memory, progress)
    if prepared.stats is not None:
        prepared.timings["calibrate"] = time.perf_counter() - start
        if prepared.stats.meta.get("smoke_test"):
            prepared.warnings.append("calibrated on random data: a smoke test, not a measurement of quality.")
    prepared.site_methods = {s.weight: method if _has_stats(method, s, prepared.stats) else "svd" for s in sites}
    return prepared


def ensure_decompositions(prepared: Prepared, ranks: list[int | None] | None = None) -> None:
    """Fill the decomposition cache so every site can give its rank (ranks None = the whole spectrum).

    An exact decomposition serves every rank; a randomised one serves ranks up to its own and is recomputed
    only for a higher one. Sites kept dense (rank None in `ranks`) need nothing.
    """
    for _ in site_decompositions(prepared, ranks, store=True):
        pass


def site_decompositions(prepared: Prepared, ranks: list[int | None] | None, store: bool):
    """(site, decomposition serving its rank, or None for a dense site) in site order.

    Missing decompositions are computed as the iteration reaches them and put in the cache only when
    `store`; otherwise a one-shot build turns each into factors and lets it go (bounded memory on large
    models), and cached ones are taken out of the cache once given.
    """
    needed = {}
    for i, site in enumerate(prepared.sites):
        rank = None if ranks is None else ranks[i]
        if ranks is not None and rank is None:
            continue
        cached = prepared.decompositions.get(site.weight)
        if cached is not None and (cached.exact or (rank is not None and rank <= cached.max_rank)):
            continue
        needed[site.weight] = rank
    fresh = iter_decompositions(
        prepared.model, [s for s in prepared.sites if s.weight in needed], prepared.site_methods, prepared.stats,
        WEIGHTING, progress=prepared.progress, ranks=needed, svd="exact" if ranks is None else prepared.svd,
        workers=prepared.workers) if needed else iter(())
    for i, site in enumerate(prepared.sites):
        if site.weight in needed:
            start, calibrating = time.perf_counter(), _later_calibration_seconds(prepared)
            _, dec = next(fresh)
            calibrating = _later_calibration_seconds(prepared) - calibrating  # a pass for the next group of sites
            for stage, seconds in (("decompose", time.perf_counter() - start - calibrating), ("calibrate", calibrating)):
                prepared.timings[stage] = prepared.timings.get(stage, 0.0) + seconds
            if store:
                prepared.decompositions[site.weight] = dec
        elif store:
            dec = prepared.decompositions.get(site.weight)
        else:
            dec = prepared.decompositions.pop(site.weight, None)
        yield site, (dec if ranks is None or ranks[i] is not None else None)


def _later_calibration_seconds(prepared: Prepared) -> float:
    return getattr(prepared.stats, "later_seconds", 0.0)


def choose_ranks(prepared: Prepared, budget: Budget, allocation: str) -> list[int | None]:
    """One rank per site (None = dense) under the budget; per-site overrides are honoured first."""
    sites = prepared.sites
    fixed = _rank_overrides(sites, budget.ranks)
    free = [i for i, s in enumerate(sites) if i not in fixed]
    ranks: list[int | None] = [None] * len(sites)
    for i, r in fixed.items():
        ranks[i] = alloc.clamp_rank(sites[i].K, sites[i].N, min(r, min(sites[i].K, sites[i].N)))
    shapes = [(sites[i].K, sites[i].N) for i in free]
    if budget.rank is not None:
        chosen = [alloc.clamp_rank(K, N, min(budget.rank, min(K, N))) for K, N in shapes]
    elif budget.ratio is None and budget.target_size is None:
        chosen = [None] * len(free)  # only overrides were given: the other sites stay dense
    else:
        ratio = budget.ratio if budget.ratio is not None else _ratio_for_size(prepared, budget.target_size, ranks, free)
        if allocation == "global":
            if any(prepared.site_methods[sites[i].weight] != prepared.method for i in free):
                raise FwlrError("--allocation global needs gradient statistics for every site; some have none "
                                "(inside subgraphs?): use --allocation uniform or --exclude them.")
            ensure_decompositions(prepared)  # global allocation compares whole spectra: exact SVDs
            energies = [prepared.decompositions[sites[i].weight].energy for i in free]
            chosen = alloc.global_ranks(energies, shapes, ratio * sum(K * N for K, N in shapes))
        else:
            chosen = alloc.uniform_ranks(shapes, ratio)
    for i, r in zip(free, chosen):
        ranks[i] = r
    return ranks


def build(prepared: Prepared, ranks: list[int | None], allocation: str, budget: Budget,
          bias_correction: bool = False, corrected=None, keep_decompositions: bool = True
          ) -> tuple[onnx.ModelProto, Report]:
    """The compressed model for these ranks, and its report. The prepared original stays untouched.

    `corrected`: the result of `correct_sequentially` for these ranks; its factors replace the closed-form ones.
    `keep_decompositions` False: a one-shot build, which drops each decomposition once its factors are made
    (the cache is then empty; another build decomposes again).
    """
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    report = Report(method=prepared.method, allocation=allocation, budget=budget.describe(),
                    skipped=list(prepared.skipped), warnings=list(prepared.warnings), timings=dict(prepared.timings))
    report.model_params_before = model_parameters(model)
    report.ops_before = op_counts(model)
    factors = {}
    for (site, dec), rank in zip(site_decompositions(prepared, ranks, store=keep_decompositions), ranks):
        result, site_factors = _site_result(prepared, site, dec, rank, bias_correction)
        if corrected is not None and site.weight in corrected.factors and site_factors is not None:
            site_factors = corrected.factors[site.weight]
            result.note = corrected.notes.get(site.weight, result.note)
        report.sites.append(result)
        if site_factors is not None:  # held as the model will store them, not as float64 copies of every factor
            dtype = storage_dtype(site)
            factors[site.weight] = Factors(np.asarray(site_factors.A, dtype=dtype),
                                           np.asarray(site_factors.B, dtype=dtype), site_factors.shift)
    apply_factors(model, prepared.sites, factors)
    report.timings = dict(prepared.timings)  # with the decomposition time spent during this build
    if prepared.stats is not None:  # after the build: grouped statistics count the passes it made
        report.calibration = dict(prepared.stats.meta)
    if corrected is not None:
        report.timings["sequential"] = corrected.seconds
    report.model_params_after = model_parameters(model)
    report.ops_after = op_counts(model)
    report.versions = _versions()
    return model, report


def _site_result(prepared: Prepared, site: Site, dec, rank: int | None, bias_correction: bool):
    result = SiteResult(
        name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N, rank=rank,
        params_before=site.params, params_after=alloc.site_params(site.K, site.N, rank),
    )
    if prepared.site_methods.get(site.weight, prepared.method) != prepared.method:
        result.note = "no calibration statistics reach this site (inside a subgraph?): plain svd"
    if rank is None:
        result.note = "kept dense: factorising at this budget would not save parameters"
        return result, None
    A, B = dec.factors(rank)
    shift = None
    stats = prepared.stats
    if bias_correction and stats is not None and stats.has_activations(site):
        shift = factorize.bias_shift(stats.mean_input(site), prepared.weights[site.weight], A, B)
    result.weighted_error = dec.dropped_energy(rank)
    result.relative_error = dec.relative_error(rank)
    return result, Factors(A, B, shift)


@dataclass
class Corrected:
    """Sequentially corrected factors per weight, with a report note per site."""

    factors: dict
    notes: dict
    seconds: float


def correct_sequentially(prepared: Prepared, ranks: list[int | None], calibration, bias_correction: bool, *,
                         batch_size: int = 32, mask_input=None, shapes=None, progress: bool = True) -> Corrected:
    """Refit the factorised sites depth by depth on the partially compressed model (sequential.py)."""
    from onnx_fwlr.pipeline.sequential import sequential_factors

    if calibration is None:
        raise FwlrError("--sequential reads the calibration data once per depth; pass --calib DATA.")
    start_time = time.perf_counter()
    start, right = {}, {}
    for (site, dec), rank in zip(site_decompositions(prepared, ranks, store=True), ranks):
        site_factors = _site_result(prepared, site, dec, rank, bias_correction)[1]
        if isinstance(site_factors, Factors):
            start[site.weight] = site_factors
            right[site.weight] = dec.right  # kfac's output-side factor, made once with the decomposition
    batches = open_data(calibration, prepared.model, batch_size=batch_size, shapes=shapes)
    factors, results = sequential_factors(
        prepared.model, prepared.sites, start, prepared.weights, right, batches,
        mask_input=mask_input, bias_correction=bias_correction, progress=progress)
    notes = {r.weight: (f"sequential: ridge {r.ridge:g}" if r.ridge is not None else "sequential: closed form kept")
             + f", held-back rel. error {r.heldout_error_before:.3g} -> {r.heldout_error_after:.3g}" for r in results}
    return Corrected(factors, notes, time.perf_counter() - start_time)


def _compress_structured(model, mix, budget, allocation, bias_correction, dope, kron_shape, options):
    """--method kron, --methods A,B and --dope: per site, the structure with the lowest weighted error at
    ratio·K·N stored numbers (structured_sites.fit_structured_site), all judged in one low-rank metric."""
    from onnx_fwlr.sites.recurrent import is_recurrent
    from onnx_fwlr.methods.structured_fit import fit_structured_site, metric_options
    from onnx_fwlr.sites.find import weight_matrix

    unknown = [m for m in mix if m not in METHODS]
    low_rank = [m for m in mix if m != "kron"]
    if unknown or len(low_rank) > 1:
        raise FwlrError(f"--methods {','.join(mix)}: give kron and at most one low-rank method of "
                        f"{', '.join(m for m in METHODS if m not in ('kron', 'kfac'))} (e.g. whiten,kron).")
    for m in low_rank:
        metric_options(m)  # kfac has no structured fit: say so before calibrating
    if allocation != "uniform" or budget.rank is not None or budget.ranks or budget.max_error is not None:
        raise FwlrError("--method kron, --methods and --dope take --ratio or --target-size with uniform allocation; "
                        "--rank, --max-error and --allocation global are for plain low-rank methods.")
    if kron_shape is not None and "kron" not in mix:
        raise FwlrError("--kron-shape only applies to Kronecker structures; add --method kron (or --methods ...,kron).")
    has_stats = options["calibration"] is not None or options["stats"] is not None
    weighting = low_rank[0] if low_rank else ("whiten" if has_stats else "svd")
    prepared = prepare(model, method=weighting, svd="auto", **options)  # "auto": no low-rank decomposition needed
    if bias_correction is None:
        bias_correction = prepared.stats is not None
    sites, stats = prepared.sites, prepared.stats
    ratio = budget.ratio
    if ratio is None and sites:
        ratio = _ratio_for_size(prepared, budget.target_size, [None] * len(sites), list(range(len(sites))))
    structures = ["kron" if m == "kron" else "lowrank" for m in mix]
    pairs = []
    for site in sites:
        method = prepared.site_methods[site.weight]
        recurrent = is_recurrent(site)
        active = stats is not None and stats.has_activations(site)
        fit = fit_structured_site(
            weight_matrix(prepared.model, site), ["lowrank"] if recurrent else structures, ratio * site.K * site.N,
            method=method, input_gram=stats.input_gram(site) if active else None,
            fisher_row=stats.fisher_row(site) if stats is not None and stats.has_gradients(site) else None,
            mean_input=stats.mean_input(site) if active and bias_correction else None,
            dope=0.0 if recurrent else dope, kron_shape=None if recurrent else kron_shape,
            itemsize={"float16": 2, "bfloat16": 2, "float64": 8}.get(site.dtype, 4))
        result = SiteResult(name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N,
                            rank=None, params_before=site.params, params_after=site.params,
                            note="kept dense: no structure fits this budget with fewer stored numbers")
        replacement = None
        if fit is not None:
            structure = fit.replacement.structure
            result.rank = structure.A.shape[1] if fit.structure == "lowrank" else structure.A.shape[0]
            result.params_after, result.weighted_error = fit.params, fit.error
            result.relative_error = fit.relative_error
            result.note = f"{fit.description}, {fit.bytes:,} bytes"
            replacement = fit.replacement
            if recurrent:
                replacement = Factors(structure.A, structure.B, fit.replacement.shift)
                result.note += "; recurrent weight R stays dense, low rank only (the op reads a dense W)"
        if method != weighting:
            result.note += "; no statistics reach this site: plain Frobenius fit"
        pairs.append((result, replacement))
    model_out, report = _assemble(prepared, allocation, budget, pairs)
    report.method = ",".join(mix)
    report.budget.update(dope=dope, weighting=weighting, **({"kron_shape": list(kron_shape)} if kron_shape else {}))
    return model_out, report


def _assemble(prepared: Prepared, allocation: str, budget: Budget, pairs) -> tuple[onnx.ModelProto, Report]:
    """The model with each (SiteResult, replacement or None) applied, and its report."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    report = Report(method=prepared.method, allocation=allocation, budget=budget.describe(),
                    skipped=list(prepared.skipped), warnings=list(prepared.warnings), timings=dict(prepared.timings),
                    calibration=dict(prepared.stats.meta) if prepared.stats is not None else {})
    report.model_params_before, report.ops_before = model_parameters(model), op_counts(model)
    report.sites = [result for result, _ in pairs]
    apply_factors(model, prepared.sites, {r.weight: f for r, f in pairs if f is not None})
    report.model_params_after, report.ops_after = model_parameters(model), op_counts(model)
    report.versions = _versions()
    return model, report


def _rank_overrides(sites: list[Site], overrides: dict) -> dict[int, int]:
    """Map override names (site, node or weight) to site indices; an unknown name is an error."""
    found = {}
    for name, rank in overrides.items():
        matches = [i for i, s in enumerate(sites) if name in {s.name, s.weight} | {u.node_name for u in s.uses}]
        if not matches:
            known = ", ".join(s.name for s in sites[:8]) + (" ..." if len(sites) > 8 else "")
            raise FwlrError(f"--rank {name}={rank}: no site is named '{name}'; sites are: {known}.")
        for i in matches:
            found[i] = int(rank)
    return found


def _ratio_for_size(prepared: Prepared, target_size: int, ranks, free) -> float:
    """The parameter ratio of the free sites that makes the output about `target_size` bytes."""
    itemsize = {"float16": 2, "bfloat16": 2, "float64": 8}
    dense_bytes = prepared.model.ByteSize() + external_bytes(prepared.model)
    fixed_bytes = 0
    for i, site in enumerate(prepared.sites):
        size = itemsize.get(site.dtype, 4)
        dense_bytes -= site.params * size
        if i not in free:
            fixed_bytes += alloc.site_params(site.K, site.N, ranks[i]) * size
    free_params = sum(prepared.sites[i].params for i in free)
    free_itemsize = itemsize.get(prepared.sites[free[0]].dtype, 4) if free else 4
    overhead = 600 * len(prepared.sites)  # new node and initializer records, names, bias corrections (measured bound)
    available = target_size - dense_bytes - fixed_bytes - overhead
    if available <= 0 or free_params == 0:
        raise FwlrError(
            f"--target-size {target_size:,} bytes is too small: the model without its factorisable weights already "
            f"takes about {dense_bytes + fixed_bytes + overhead:,} bytes."
        )
    return min(1.0, available / (free_params * free_itemsize))


def _search_max_error(prepared, budget, allocation, bias_correction, validation, batch_size, progress):
    """Bisection over the ratio: the smallest one whose worst relative output error stays under max_error."""
    low, high, best = 0.0, 1.0, None
    history = []
    ensure_decompositions(prepared)  # the search moves up and down in rank: decompose fully once
    for _ in tqdm(range(8), desc="search ratio", disable=not progress, leave=False):
        middle = (low + high) / 2
        trial = Budget(ratio=middle, ranks=budget.ranks)
        model, report = build(prepared, choose_ranks(prepared, trial, allocation), allocation, budget, bias_correction)
        result = validate(prepared.model, model, validation, batch_size=batch_size, progress=False)
        error = max(o.rel_l2_error for o in result.outputs)
        history.append({"ratio": middle, "rel_error": error})
        if error <= budget.max_error:
            high, best = middle, (model, report, result, middle)
        else:
            low = middle
    if best is None:
        model, report = build(prepared, [None] * len(prepared.sites), allocation, budget, bias_correction)
        report.warnings.append(f"no ratio met --max-error {budget.max_error}; every site was kept dense.")
        report.budget["search"] = history
        return model, report
    model, report, result, ratio = best
    report.budget.update(ratio_found=ratio, search=history)
    report.validation = result.to_dict()
    return model, report


def input_scaling(method: str, site: Site, stats) -> factorize.Scaling | None:
    """The input-side weighting P of the method (DESIGN §3)."""
    if method == "svd":
        return None
    if method == "asvd":
        return factorize.diagonal_scaling(np.sqrt(np.diag(stats.input_gram(site))))
    if method in ("whiten", "kfac"):
        return factorize.gram_scaling(stats.input_gram(site))
    if method == "fwsvd":
        return factorize.diagonal_scaling(np.sqrt(stats.fisher_row(site)))
    raise FwlrError(f"unknown method '{method}'.")


def output_scaling(method: str, site: Site, stats) -> factorize.Scaling | None:
    """The output-side weighting Q: the Gram of the gradients at the site's output, for kfac only."""
    return factorize.gram_scaling(stats.output_grad_gram(site)) if method == "kfac" else None


def input_scaling_key(method: str, site: Site):
    """Sites with equal keys share one input scaling (Q, K and V read one input: one Cholesky factor of its
    Gram); None when the scaling depends on the site's own weight (fwsvd) or there is none."""
    if method in ("asvd", "whiten", "kfac"):
        return tuple(activation_key(u) for u in site.uses)
    return None


WEIGHTING = Weighting(input_scaling, output_scaling, input_scaling_key)


def _has_stats(method: str, site: Site, stats) -> bool:
    needs = METHODS[method]
    return (("activations" not in needs or stats.has_activations(site))
            and ("gradients" not in needs or stats.has_gradients(site)))


def _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes, fisher_options, stats_memory,
                progress):
    """The statistics the method needs: loaded, given, or measured now; None for svd without data."""
    needs = METHODS[method]
    if isinstance(stats, (str, os.PathLike)):
        stats = Statistics.load(stats, expect_fingerprint=model_fingerprint(model))
    if stats is None and calibration is not None and needs:
        batches = open_data(calibration, model, batch_size=batch_size, shapes=shapes)
        if "gradients" in needs:
            from onnx_fwlr.stats.fisher import collect_fisher_stats

            stats = collect_fisher_stats(model, sites, batches, mask_input=mask_input, progress=progress,
                                         **fisher_options)
        else:
            stats = collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress,
                                             memory_limit=stats_memory)
    if needs:
        if stats is None:
            raise FwlrError(f"--method {method} needs calibration data; pass --calib DATA (or --stats FILE).")
        stats.require(sites, needs, method)
    return stats


def _unmatched_patterns(include, exclude, sites, skipped) -> list[str]:
    """A pattern that matches no node or weight name is almost always a typo: say so."""
    names = [n for s in sites for n in [s.weight] + [u.node_name for u in s.uses]]
    names += [n for s in skipped for n in (s.node, s.weight) if n]
    return [
        f"{option} '{pattern}' matched no node or weight name; check the names with `onnx-fwlr inspect`."
        for pattern, option in ((include, "--include"), (exclude, "--exclude"))
        if pattern and not any(re.search(pattern, n) for n in names)
    ]


def _versions() -> dict:
    import onnxruntime
    import scipy

    from onnx_fwlr import __version__

    return {"onnx_fwlr": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


def calibrate(
    model: str | onnx.ModelProto,
    calibration,
    *,
    fisher: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    batch_size: int = 32,
    mask_input: str | None = None,
    shapes: dict | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    **fisher_options,
) -> Statistics:
    """Statistics for every site, to save and reuse across compress runs (and to merge across shards)."""
    model = load_model(model)
    validate_regex(include, "--include")
    validate_regex(exclude, "--exclude")
    sites, _ = find_all_sites(model, include, exclude, fisher=fisher)
    if not sites:
        raise FwlrError("the model has no factorisable MatMul/Gemm weight, so there is nothing to calibrate.")
    batches = open_data(calibration, model, batch_size=batch_size, shapes=shapes, shard=shard)
    if fisher:
        from onnx_fwlr.stats.fisher import collect_fisher_stats

        return collect_fisher_stats(model, sites, batches, mask_input=mask_input, progress=progress, **fisher_options)
    return collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress)


def validate(
    original: str | onnx.ModelProto,
    compressed: str | onnx.ModelProto,
    data,
    *,
    batch_size: int = 32,
    outputs: list[str] | None = None,
    progress: bool = True,
):
    """Compare both models on the same batches (labels from the data's `labels` key, when present)."""
    from onnx_fwlr.evaluate.validation import compare_models

    reference = original if isinstance(original, onnx.ModelProto) else load_model(original)
    batches = open_data(data, reference, batch_size=batch_size)
    labels = [lab for _, lab in batches if lab is not None]
    feeds = (feed for feed, _ in batches)
    return compare_models(original, compressed, feeds, labels=np.concatenate(labels) if labels else None,
                          outputs=outputs, progress=progress)
