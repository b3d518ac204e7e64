"""The Python API: one call that loads, measures, decomposes, allocates and rewrites.

    model, report = onnx_fwlr.compress("model.onnx", ratio=0.5, method="whiten", calibration="calib.npz")
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import allocation as alloc
from . import factorize
from .errors import FwlrError
from .modelio import load_model
from .report import Report, SiteResult, op_counts
from .rewrite import Factors, apply_factors
from .sites import Site, find_sites, model_parameters, validate_regex, weight_matrix

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
    stats=None,
    bias_correction: bool | None = None,
    progress: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Factorise every selected constant MatMul/Gemm weight; returns the new model and a report.

    The input (path or ModelProto) is never modified. `stats` are calibration statistics
    (onnx_fwlr.stats.Statistics) for the methods that need them.
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
    _check_stats(method, stats, sites)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    decompositions = {}
    for site in tqdm(sites, desc="decompose", unit="site", disable=not progress, leave=False):
        W = weight_matrix(model, site)
        left, right = scalings(method, site, stats)
        decompositions[site.weight] = (W, factorize.weighted_svd(W, left, right))
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
        ranks = alloc.global_ranks(energies, shapes, ratio * sum(K * N for K, N in shapes))
    else:
        ranks = alloc.uniform_ranks(shapes, ratio)

    factors = {}
    for site, site_rank in zip(sites, ranks):
        W, dec = decompositions[site.weight]
        result = SiteResult(
            name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N, rank=site_rank,
            params_before=site.params, params_after=alloc.site_params(site.K, site.N, site_rank),
        )
        if site_rank is None:
            result.note = "kept dense: factorising at this budget would not save parameters"
        else:
            A, B = dec.factors(site_rank)
            shift = None
            if bias_correction and stats is not None:
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


def _check_stats(method: str, stats, sites: list[Site]) -> None:
    needs = METHODS[method]
    if not needs:
        return
    if stats is None:
        raise FwlrError(f"--method {method} needs calibration data; pass --calib DATA (or --stats FILE).")
    stats.require(sites, needs, method)


def _versions() -> dict:
    import onnxruntime
    import scipy

    from . import __version__

    return {"onnx_fwlr": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}
