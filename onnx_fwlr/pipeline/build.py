"""The compressed model for chosen ranks, and its report."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnx_fwlr.evaluate.report import LOW_RANK, Report, SiteResult, op_counts, relative_frobenius
from onnx_fwlr.io.spill import SpillFile
from onnx_fwlr.methods import allocation as alloc
from onnx_fwlr.methods import lowrank
from onnx_fwlr.pipeline.budget import Budget
from onnx_fwlr.pipeline.decompose import spill_needed
from onnx_fwlr.pipeline.prepare import Prepared, site_decompositions
from onnx_fwlr.rewrite.lowrank import Factors, apply_factors, storage_dtype
from onnx_fwlr.sites.find import Site, model_parameters
from onnx_fwlr.sites.tied import retie


def build(prepared: Prepared, ranks: list[int | None], allocation: str, budget: Budget,
          bias_correction: bool = False, corrected=None, keep_decompositions: bool = True
          ) -> tuple[onnx.ModelProto, Report]:
    """The compressed model for these ranks, and its report. The prepared original stays untouched.

    `corrected`: the result of `correct_sequentially` for these ranks; its factors replace the closed-form ones.
    `keep_decompositions` False: a one-shot build, which drops each decomposition once its factors are made
    (the cache is then empty; another build decomposes again).
    """
    report = Report(method=prepared.method, allocation=allocation, budget=budget.describe(),
                    skipped=list(prepared.skipped), warnings=list(prepared.warnings), timings=dict(prepared.timings))
    report.model_params_before = model_parameters(prepared.model)
    report.ops_before = op_counts(prepared.model)
    report.warnings += getattr(ranks, "warnings", [])  # budget.RankChoice: why sites stay dense
    notes = getattr(ranks, "notes", {})
    factors = _FactorStore(spill_needed(prepared.sites))
    for index, ((site, dec), rank) in enumerate(zip(site_decompositions(prepared, ranks, store=keep_decompositions),
                                                   ranks)):
        result, site_factors = site_replacement(prepared, site, dec, rank, bias_correction)
        result.note = notes.get(index, result.note)
        if corrected is not None and site.weight in corrected.factors and site_factors is not None:
            site_factors = corrected.factors[site.weight]
            result.note = corrected.notes.get(site.weight, result.note)
        report.sites.append(result)
        if site_factors is not None:  # held as the model will store them, not as float64 copies of every factor
            dtype = storage_dtype(site)
            factors.add(site.weight, Factors(np.asarray(site_factors.A, dtype=dtype),
                                             np.asarray(site_factors.B, dtype=dtype), site_factors.shift))
    model = onnx.ModelProto()  # copied only now: a one-shot build has let its decompositions go (peak memory)
    model.CopyFrom(prepared.model)
    apply_factors(model, prepared.sites, factors)
    retie(model, prepared.ties)
    report.tied = [tie.describe() for tie in prepared.ties]
    report.timings = dict(prepared.timings)  # with the decomposition time spent during this build
    if prepared.stats is not None:  # after the build: grouped statistics count the passes it made
        report.calibration = dict(prepared.stats.meta)
    if corrected is not None:
        report.timings["sequential"] = corrected.seconds
    report.model_params_after = model_parameters(model)
    report.ops_after = op_counts(model)
    report.versions = _versions()
    return model, report


class _FactorStore(Mapping):
    """weight name -> Factors for apply_factors. A large model's (`spill`: decompose.spill_needed) wait in an
    anonymous temporary file, in the dtype the model stores them in, and are read back on access: the model
    being written then holds its factors once, instead of beside a second copy of every site's (the 1.1 B
    decoder's are 3 GB)."""

    def __init__(self, spill: bool):
        self._spill = SpillFile(prefix="onnx-fwlr-build-") if spill else None
        self._items: dict = {}

    def add(self, weight: str, factors: Factors) -> None:
        if self._spill is None:
            self._items[weight] = factors
            return
        refs = [(self._spill.append(a), a.dtype.str, a.shape) for a in (factors.A, factors.B)]
        self._items[weight] = (refs, factors.shift)

    def __getitem__(self, weight: str) -> Factors:
        item = self._items[weight]
        if self._spill is None:
            return item
        refs, shift = item
        A, B = (self._spill.read(offset, np.dtype(dtype), shape) for offset, dtype, shape in refs)
        return Factors(A, B, shift)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def site_replacement(prepared: Prepared, site: Site, dec, rank: int | None, bias_correction: bool):
    """The site's report row and its factors at this rank (None: kept dense), bias correction included."""
    result = SiteResult(
        name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N, rank=rank,
        params_before=site.params, params_after=alloc.site_params(site.K, site.N, rank),
        rank_of="" if rank is None else LOW_RANK,
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
        shift = lowrank.bias_shift(stats.mean_input(site), prepared.weights[site.weight], A, B)
    result.weighted_error = dec.dropped_energy(rank)
    result.relative_error = relative_frobenius(result.weighted_error, dec.total)
    return result, Factors(A, B, shift)


def assemble(prepared: Prepared, allocation: str, budget: Budget, pairs, forms: dict | None = None
             ) -> tuple[onnx.ModelProto, Report]:
    """The model with each (SiteResult, replacement or None) applied, and its report; `forms` (weight name ->
    rewrite.structured.Form) realises structured replacements in a measured form."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    report = Report(method=prepared.method, allocation=allocation, budget=budget.describe(),
                    skipped=list(prepared.skipped), warnings=list(prepared.warnings), timings=dict(prepared.timings),
                    calibration=dict(prepared.stats.meta) if prepared.stats is not None else {})
    report.model_params_before, report.ops_before = model_parameters(model), op_counts(model)
    report.sites = [result for result, _ in pairs]
    apply_factors(model, prepared.sites, {r.weight: f for r, f in pairs if f is not None}, forms)
    report.model_params_after, report.ops_after = model_parameters(model), op_counts(model)
    report.versions = _versions()
    return model, report


def _versions() -> dict:
    import onnxruntime
    import scipy

    from onnx_fwlr.version import __version__

    return {"onnx_fwlr": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}
