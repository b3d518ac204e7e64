"""The Python API: load, measure, decompose, allocate, rewrite.

    model, report = onnx_fwlr.compress("model.onnx", ratio=0.5, method="whiten", calibration="calib.npz")

The stages are separate functions so a sweep or a fidelity search decomposes each site once and then
tries many budgets: `prepare` (load, find sites, calibrate, decompose) → `choose_ranks` → `build`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import allocation as alloc
from . import factorize
from .calibration import collect_activation_stats
from .data import open_data
from .decompose import decompose_sites
from .errors import FwlrError
from .modelio import load_model
from .report import Report, SiteResult, op_counts
from .rewrite import Factors, apply_factors
from .sites import Site, Skipped, attention_projections, find_sites, model_parameters, validate_regex
from .stats import Statistics, model_fingerprint

# Which statistics each method needs from calibration.
METHODS = {
    "svd": (),
    "asvd": ("activations",),
    "whiten": ("activations",),
    "fwsvd": ("gradients",),
    "kfac": ("activations", "gradients"),
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
    weights: dict = field(default_factory=dict)  # weight name -> float64 [K, N]
    decompositions: dict = field(default_factory=dict)  # weight name -> factorize.Decomposition
    site_methods: dict = field(default_factory=dict)  # weight name -> method actually used
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


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
    progress: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Factorise every selected constant MatMul/Gemm weight; returns the new model and a report.

    The input (path or ModelProto) is never modified. Methods other than svd need statistics: give
    `calibration` data (a .npz path, a folder of them, an iterable of feed dicts, a CalibrationDataReader,
    or "random" for a smoke test) or precomputed `stats` (a Statistics object or a stats file path).
    `max_error` searches the smallest ratio whose outputs stay within that relative L2 error on
    `validation` data.
    """
    budget = Budget(ratio, rank, target_size, max_error, dict(ranks or {}))
    budget.check()
    check_method(method, allocation)
    if max_error is not None and validation is None:
        raise FwlrError("--max-error needs validation data to measure the error on; pass --val DATA.")
    prepared = prepare(
        model, method=method, include=include, exclude=exclude, keep_attention=keep_attention,
        calibration=calibration, stats=stats, batch_size=batch_size, mask_input=mask_input, shapes=shapes,
        fisher_options=fisher_options, progress=progress,
    )
    if bias_correction is None:
        bias_correction = "activations" in METHODS[method]
    if not prepared.sites:
        return build(prepared, [], allocation, budget, bias_correction)
    if max_error is not None:
        return _search_max_error(prepared, budget, allocation, bias_correction, validation, batch_size, progress)
    ranks_chosen = choose_ranks(prepared, budget, allocation)
    return build(prepared, ranks_chosen, allocation, budget, bias_correction)


def prepare(
    model, *, method="svd", include=None, exclude=None, keep_attention=False, calibration=None, stats=None,
    batch_size=32, mask_input=None, shapes=None, fisher_options=None, progress=True,
) -> Prepared:
    """Load, find sites, gather statistics and decompose every site once."""
    validate_regex(include, "--include")
    validate_regex(exclude, "--exclude")
    start = time.perf_counter()
    model = load_model(model)
    sites, skipped = find_sites(model, include, exclude)
    warnings = _unmatched_patterns(include, exclude, sites, skipped)
    if keep_attention:
        projections = attention_projections(model, sites)
        skipped += [Skipped(s.name, s.uses[0].op_type, s.weight, "attention projection kept dense (--keep-attention)")
                    for s in sites if s.weight in projections]
        sites = [s for s in sites if s.weight not in projections]
    prepared = Prepared(model, sites, skipped, method, None, warnings=warnings)
    prepared.timings["load"] = time.perf_counter() - start
    if not sites:
        prepared.warnings.append("the model has no factorisable MatMul/Gemm weight; nothing was changed.")
        return prepared
    start = time.perf_counter()
    prepared.stats = _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes,
                                 fisher_options or {}, progress)
    if prepared.stats is not None:
        prepared.timings["calibrate"] = time.perf_counter() - start
        if prepared.stats.meta.get("smoke_test"):
            prepared.warnings.append("calibrated on random data: a smoke test, not a measurement of quality.")
    start = time.perf_counter()
    prepared.site_methods = {s.weight: method if _has_stats(method, s, prepared.stats) else "svd" for s in sites}
    decomposed = decompose_sites(model, sites, prepared.site_methods, prepared.stats, scalings, progress=progress)
    for weight, (W, dec) in decomposed.items():
        prepared.weights[weight] = W
        prepared.decompositions[weight] = dec
    prepared.timings["decompose"] = time.perf_counter() - start
    return prepared


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
            energies = [prepared.decompositions[sites[i].weight].energy for i in free]
            chosen = alloc.global_ranks(energies, shapes, ratio * sum(K * N for K, N in shapes))
        else:
            chosen = alloc.uniform_ranks(shapes, ratio)
    for i, r in zip(free, chosen):
        ranks[i] = r
    return ranks


def build(prepared: Prepared, ranks: list[int | None], allocation: str, budget: Budget,
          bias_correction: bool = False) -> tuple[onnx.ModelProto, Report]:
    """The compressed model for these ranks, and its report. The prepared original stays untouched."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    report = Report(method=prepared.method, allocation=allocation, budget=budget.describe(),
                    skipped=list(prepared.skipped), warnings=list(prepared.warnings), timings=dict(prepared.timings))
    report.model_params_before = model_parameters(model)
    report.ops_before = op_counts(model)
    if prepared.stats is not None:
        report.calibration = {k: v for k, v in prepared.stats.meta.items()}
    factors = {}
    for site, rank in zip(prepared.sites, ranks):
        result, site_factors = _site_result(prepared, site, rank, bias_correction)
        report.sites.append(result)
        if site_factors is not None:
            factors[site.weight] = site_factors
    apply_factors(model, prepared.sites, factors)
    report.model_params_after = model_parameters(model)
    report.ops_after = op_counts(model)
    report.versions = _versions()
    return model, report


def _site_result(prepared: Prepared, site: Site, rank: int | None, bias_correction: bool):
    dec = prepared.decompositions.get(site.weight)
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
    dense_bytes = prepared.model.ByteSize()
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


def scalings(method: str, site: Site, stats) -> tuple[factorize.Scaling | None, factorize.Scaling | None]:
    """The input-side P and output-side Q of the method (DESIGN §3)."""
    if method == "svd":
        return None, None
    if method == "asvd":
        return factorize.diagonal_scaling(np.sqrt(np.diag(stats.input_gram(site)))), None
    if method == "whiten":
        return factorize.gram_scaling(stats.input_gram(site)), None
    if method == "fwsvd":
        return factorize.diagonal_scaling(np.sqrt(stats.fisher_row(site))), None
    if method == "kfac":
        return factorize.gram_scaling(stats.input_gram(site)), factorize.gram_scaling(stats.output_grad_gram(site))
    raise FwlrError(f"unknown method '{method}'.")


def _has_stats(method: str, site: Site, stats) -> bool:
    needs = METHODS[method]
    return (("activations" not in needs or stats.has_activations(site))
            and ("gradients" not in needs or stats.has_gradients(site)))


def _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes, fisher_options, progress):
    """The statistics the method needs: loaded, given, or measured now; None for svd without data."""
    needs = METHODS[method]
    if isinstance(stats, (str, os.PathLike)):
        stats = Statistics.load(stats, expect_fingerprint=model_fingerprint(model))
    if stats is None and calibration is not None and needs:
        batches = open_data(calibration, model, batch_size=batch_size, shapes=shapes)
        if "gradients" in needs:
            from .fisher_stats import collect_fisher_stats

            stats = collect_fisher_stats(model, sites, batches, mask_input=mask_input, progress=progress,
                                         **fisher_options)
        else:
            stats = collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress)
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

    from . import __version__

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
    sites, _ = find_sites(model, include, exclude)
    if not sites:
        raise FwlrError("the model has no factorisable MatMul/Gemm weight, so there is nothing to calibrate.")
    batches = open_data(calibration, model, batch_size=batch_size, shapes=shapes, shard=shard)
    if fisher:
        from .fisher_stats import collect_fisher_stats

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
    from .validate import compare_models

    reference = original if isinstance(original, onnx.ModelProto) else load_model(original)
    batches = open_data(data, reference, batch_size=batch_size)
    labels = [lab for _, lab in batches if lab is not None]
    feeds = (feed for feed, _ in batches)
    return compare_models(original, compressed, feeds, labels=np.concatenate(labels) if labels else None,
                          outputs=outputs, progress=progress)
