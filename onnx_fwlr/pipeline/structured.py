"""Structured replacements (--method kron, --methods A,B, --dope): per site, the structure with the lowest
weighted error at the same number of stored numbers (methods.structured_fit)."""

from __future__ import annotations

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.report import SiteResult
from onnx_fwlr.methods.registry import METHODS, structured_metric
from onnx_fwlr.methods.structured_fit import fit_structured_site
from onnx_fwlr.pipeline.budget import ratio_for_size
from onnx_fwlr.pipeline.build import assemble
from onnx_fwlr.pipeline.prepare import prepare
from onnx_fwlr.rewrite.lowrank import Factors
from onnx_fwlr.sites.find import weight_matrix
from onnx_fwlr.sites.recurrent import is_recurrent


def compress_structured(model, mix, budget, allocation, bias_correction, dope, kron_shape, options):
    """--method kron, --methods A,B and --dope: per site, the structure with the lowest weighted error at
    ratio·K·N stored numbers (structured_sites.fit_structured_site), all judged in one low-rank metric."""
    unknown = [m for m in mix if m not in METHODS]
    low_rank = [m for m in mix if m != "kron"]
    if unknown or len(low_rank) > 1:
        raise FwlrError(f"--methods {','.join(mix)}: give kron and at most one low-rank method of "
                        f"{', '.join(m for m in METHODS if m not in ('kron', 'kfac'))} (e.g. whiten,kron).")
    for m in low_rank:
        structured_metric(m)  # kfac has no structured fit: say so before calibrating
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
        ratio = ratio_for_size(prepared, budget.target_size, [None] * len(sites), list(range(len(sites))))
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
    model_out, report = assemble(prepared, allocation, budget, pairs)
    report.method = ",".join(mix)
    report.budget.update(dope=dope, weighting=weighting, **({"kron_shape": list(kron_shape)} if kron_shape else {}))
    return model_out, report
