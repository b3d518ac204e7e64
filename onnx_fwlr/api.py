"""The Python API: one call that loads, measures, decomposes, allocates and rewrites.

    model, report = onnx_fwlr.compress("model.onnx", ratio=0.5, method="whiten", calibration="calib.npz")
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import allocation as alloc
from . import factorize
from .errors import FwlrError
from .calibration import collect_activation_stats
from .data import open_data
from .modelio import load_model
from .report import Report, SiteResult, op_counts
from .rewrite import Factors, apply_factors
from .sites import Site, find_sites, model_parameters, validate_regex, weight_matrix
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
    """How many parameters the factorised weights may keep: a ratio, or a fixed rank per site."""

    ratio: float | None = None
    rank: int | None = None
    ranks: dict | None = None  # per-site overrides, site or weight name -> rank

    def describe(self) -> dict:
        return {k: v for k, v in (("ratio", self.ratio), ("rank", self.rank), ("ranks", self.ranks)) if v is not None}


def check_options(method: str, allocation_name: str, ratio, rank) -> None:
    """Reject impossible option values before any work is done."""
    if method not in METHODS:
        raise FwlrError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    if allocation_name not in ALLOCATIONS:
        raise FwlrError(f"unknown allocation '{allocation_name}'; choose one of {', '.join(ALLOCATIONS)}.")
    if ratio is None and rank is None:
        raise FwlrError("no budget given; pass --ratio R (0 < R <= 1) or --rank N.")
    if ratio is not None and rank is not None:
        raise FwlrError("--ratio and --rank both given; pass one of them.")
    if ratio is not None and not (0 < ratio <= 1):
        raise FwlrError(f"--ratio {ratio} is out of range; it must satisfy 0 < ratio <= 1.")
    if rank is not None and rank < 1:
        raise FwlrError(f"--rank {rank} is out of range; it must be a positive integer.")


def compress(
    model: str | onnx.ModelProto,
    *,
    ratio: float | None = None,
    rank: int | None = None,
    method: str = "svd",
    allocation: str = "uniform",
    include: str | None = None,
    exclude: str | None = None,
    calibration=None,
    stats=None,
    batch_size: int = 32,
    mask_input: str | None = None,
    shapes: dict | None = None,
    bias_correction: bool | None = None,
    progress: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Factorise every selected constant MatMul/Gemm weight; returns the new model and a report.

    The input (path or ModelProto) is never modified. Methods other than svd need statistics: give
    `calibration` data (a .npz path, a folder of them, an iterable of feed dicts, a CalibrationDataReader,
    or "random" for a smoke test) or precomputed `stats` (a Statistics object or the path of a stats file).
    """
    check_options(method, allocation, ratio, rank)
    validate_regex(include, "--include")
    validate_regex(exclude, "--exclude")
    timings = {}
    start = time.perf_counter()
    model = load_model(model)
    sites, skipped = find_sites(model, include, exclude)
    report = Report(method=method, allocation=allocation, budget=Budget(ratio, rank).describe(), skipped=skipped)
    report.model_params_before = model_parameters(model)
    report.ops_before = op_counts(model)
    report.warnings += _unmatched_patterns(include, exclude, sites, skipped)
    if not sites:
        report.warnings.append("the model has no factorisable MatMul/Gemm weight; nothing was changed.")
        report.model_params_after = report.model_params_before
        report.ops_after = report.ops_before
        return model, report
    if bias_correction is None:
        bias_correction = "activations" in METHODS[method]
    timings["load"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes, progress)
    if stats is not None:
        report.calibration = dict(stats.meta)
        timings["calibrate"] = time.perf_counter() - start
        if stats.meta.get("smoke_test"):
            report.warnings.append("calibrated on random data: a smoke test, not a measurement of quality.")

    start = time.perf_counter()
    decompositions = {}
    for site in tqdm(sites, desc="decompose", unit="site", disable=not progress, leave=False):
        W = weight_matrix(model, site)
        site_method = method if _has_stats(method, site, stats) else "svd"
        left, right = scalings(site_method, site, stats)
        decompositions[site.weight] = (W, factorize.weighted_svd(W, left, right), site_method)
    timings["decompose"] = time.perf_counter() - start

    shapes = [(s.K, s.N) for s in sites]
    if rank is not None:
        ranks = [allocation_clamp(s, rank) for s in sites]
    elif allocation == "global":
        if "gradients" not in METHODS[method]:
            raise FwlrError(
                "--allocation global needs loss-unit (gradient) statistics; use --method fwsvd or kfac, "
                "or --allocation uniform."
            )
        energies = [decompositions[s.weight][1].energy for s in sites]
        if any(decompositions[s.weight][2] != method for s in sites):
            raise FwlrError("--allocation global needs gradient statistics for every site; some have none "
                            "(inside subgraphs?): use --allocation uniform or --exclude them.")
        ranks = alloc.global_ranks(energies, shapes, ratio * sum(K * N for K, N in shapes))
    else:
        ranks = alloc.uniform_ranks(shapes, ratio)

    factors = {}
    for site, site_rank in zip(sites, ranks):
        W, dec, site_method = decompositions[site.weight]
        result = SiteResult(
            name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N, rank=site_rank,
            params_before=site.params, params_after=alloc.site_params(site.K, site.N, site_rank),
        )
        if site_method != method:
            result.note = "no calibration statistics reach this site (inside a subgraph?): plain svd"
        if site_rank is None:
            result.note = "kept dense: factorising at this budget would not save parameters"
        else:
            A, B = dec.factors(site_rank)
            shift = None
            if bias_correction and stats is not None and stats.has_activations(site):
                shift = factorize.bias_shift(stats.mean_input(site), W, A, B)
            factors[site.weight] = Factors(A, B, shift)
            result.weighted_error = dec.dropped_energy(site_rank)
            result.relative_error = dec.relative_error(site_rank)
        report.sites.append(result)

    apply_factors(model, sites, factors)
    report.model_params_after = model_parameters(model)
    report.ops_after = op_counts(model)
    report.timings = timings
    report.versions = _versions()
    return model, report


def _unmatched_patterns(include, exclude, sites, skipped) -> list[str]:
    """A pattern that matches no node or weight name is almost always a typo: say so."""
    names = [n for s in sites for n in [s.weight] + [u.node_name for u in s.uses]]
    names += [n for s in skipped for n in (s.node, s.weight) if n]
    return [
        f"{option} '{pattern}' matched no node or weight name; check the names with `onnx-fwlr inspect`."
        for pattern, option in ((include, "--include"), (exclude, "--exclude"))
        if pattern and not any(re.search(pattern, n) for n in names)
    ]


def allocation_clamp(site: Site, rank: int) -> int | None:
    return alloc.clamp_rank(site.K, site.N, min(rank, min(site.K, site.N)))


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


def _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes, progress):
    """The statistics the method needs: loaded, given, or measured now; None for svd without data."""
    needs = METHODS[method]
    fingerprint = None
    if isinstance(stats, (str, os.PathLike)):
        fingerprint = model_fingerprint(model)
        stats = Statistics.load(stats, expect_fingerprint=fingerprint)
    if stats is None and calibration is not None and needs:
        batches = open_data(calibration, model, batch_size=batch_size, shapes=shapes)
        if "gradients" in needs:
            from .fisher_stats import collect_fisher_stats

            stats = collect_fisher_stats(model, sites, batches, mask_input=mask_input, progress=progress)
        else:
            stats = collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress)
    if needs:
        if stats is None:
            raise FwlrError(f"--method {method} needs calibration data; pass --calib DATA (or --stats FILE).")
        stats.require(sites, needs, method)
    return stats


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

    reference = load_model(original) if not isinstance(original, onnx.ModelProto) else original
    batches = open_data(data, reference, batch_size=batch_size)
    labels = [lab for _, lab in batches if lab is not None]
    feeds = (feed for feed, _ in batches)
    return compare_models(original, compressed, feeds, labels=np.concatenate(labels) if labels else None,
                          outputs=outputs, progress=progress)
