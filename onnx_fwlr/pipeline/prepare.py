"""Everything a compression needs that does not depend on the budget: the loaded model, its sites, the
statistics the method reads, and (on demand, cached) one decomposition per site.

`prepare` once, then `budget.choose_ranks` and `build.build` per budget: a sweep or a fidelity search
decomposes each site once.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import LAZY_THRESHOLD, external_bytes, load_model, message_bytes
from onnx_fwlr.io.spill import SpillFile
from onnx_fwlr.methods import lowrank
from onnx_fwlr.methods.registry import GRADIENTS, METHODS, get_method, input_scaling, output_scaling
from onnx_fwlr.pipeline.decompose import SpilledDecomposition, Weighting, iter_decompositions, spill_needed
from onnx_fwlr.sites.find import Site, Skipped, attention_projections, validate_regex, weight_matrix
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.sites.tied import find_ties
from onnx_fwlr.stats.activations import collect_activation_stats, default_memory_limit
from onnx_fwlr.stats.store import Statistics, activation_key, model_fingerprint


def input_scaling_key(method: str, site: Site):
    """Sites with equal keys share one input scaling (Q, K and V read one input: one Cholesky factor of its
    Gram); None when the scaling depends on the site's own weight (fwsvd) or there is none."""
    if get_method(method).shares_input_scaling:
        return tuple(activation_key(u) for u in site.uses)
    return None


WEIGHTING = Weighting(input_scaling, output_scaling, input_scaling_key)


@dataclass
class Prepared:
    """Everything that does not depend on the budget: sites, statistics and one decomposition per site."""

    model: onnx.ModelProto  # the loaded original; never modified
    sites: list[Site]
    skipped: list[Skipped]
    method: str
    stats: Statistics | None
    weights: dict = field(default_factory=dict)  # weight name -> float64 [K, N] (SiteWeights: read on access)
    decompositions: dict = field(default_factory=dict)  # weight name -> lowrank.Decomposition (the cache)
    site_methods: dict = field(default_factory=dict)  # weight name -> method actually used
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    svd: str = "exact"  # exact | randomized | auto (lowrank.use_randomized)
    workers: int = 1  # processes for decomposition
    executor: object = None  # pipeline.distributed.Executor: where decompositions and calibration shards run
    progress: bool = True
    spill: SpillFile | None = None  # where SpilledDecomposition factors are kept (large models)
    ties: list = field(default_factory=list)  # sites.tied.Tie: heads that repeat their embedding table
    quant_stats: object = None  # quant.calibration.QuantStats the Fisher pass folded (prepare's `pricing`), or None


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


def prepare(
    model, *, method="svd", include=None, exclude=None, keep_attention=False, calibration=None, stats=None,
    batch_size=32, mask_input=None, shapes=None, fisher_options=None, svd="exact", workers=1, stats_memory=None,
    progress=True, fallback=None, tie_heads=False, executor=None, budget=None, pricing=None,
) -> Prepared:
    """Load, find sites and gather statistics: everything but the decompositions.

    `fallback`: the method to use instead of a gradient `method` the caller did not choose (a default) when
    its statistics cannot be measured on this model (defaults.gradient_obstacle); the report says why.
    `tie_heads`: an LM head that repeats its embedding table (sites.tied) is no site; `build` points it at the
    table instead of its copy, so the pair is stored once.

    Sites are decomposed when first needed (ensure_decompositions, choose_ranks for global allocation, build),
    so a one-shot build can drop each decomposition as soon as its factors exist, and "auto" or "randomized"
    SVDs can stop at the rank needed. Each is decomposed once: the cache serves every later budget.
    `executor` (pipeline.distributed.Executor): calibration in shards and decompositions on a Ray cluster.
    `budget` (pipeline.budget.Budget): refused before any statistics when the sites' shapes cannot meet it.
    `pricing(model, sites, method)`: a quant.calibration.Pricing (or None) for the gradient statistics' pass to
    fold as well (--quantize's tables and int8 ranges); its statistics are `prepared.quant_stats` when a local
    Fisher pass folded them (statistics loaded or measured in shards leave it None).
    """
    lowrank.use_randomized(1, 1, None, svd)  # rejects an unknown choice before any work
    if workers < 1:
        raise FwlrError(f"`workers` {workers} is out of range; give 1 or more worker processes.")
    validate_regex(include, "`include`")
    validate_regex(exclude, "`exclude`")
    start = time.perf_counter()
    source = model  # what calibration shards on a cluster load the model from
    model = load_model(model)
    if (fisher_options or {}).get("output") is not None:  # a typo is an error, not a quiet switch of method
        from onnx_fwlr.stats.fisher import default_output

        default_output(model, fisher_options["output"])
    gradients = method in METHODS and GRADIENTS in METHODS[method].needs
    sites, skipped = find_all_sites(model, include, exclude, fisher=gradients)
    warnings = _unmatched_patterns(include, exclude, sites, skipped)
    ties = find_ties(model, sites) if tie_heads else []  # a head repeating its table: one weight, re-tied
    sites = _untied(sites, ties)
    if fallback is not None and sites and stats is None and calibration is not None:
        from onnx_fwlr.pipeline.defaults import gradient_obstacle

        obstacle = gradient_obstacle(model, sites, fisher_options, stats_memory)
        if obstacle is not None:
            warnings.append(f"default method {fallback} rather than {method}: {obstacle.rstrip('.')}.")
            method = fallback
            sites, skipped = find_all_sites(model, include, exclude, fisher=GRADIENTS in METHODS[method].needs)
            sites = _untied(sites, ties)
    if keep_attention:
        projections = attention_projections(model, sites)
        skipped += [Skipped(s.name, s.uses[0].op_type, s.weight, "attention projection kept dense (`keep_attention`)")
                    for s in sites if s.weight in projections]
        sites = [s for s in sites if s.weight not in projections]
    prepared = Prepared(model, sites, skipped, method, None, warnings=warnings, svd=svd, workers=workers,
                        progress=progress, ties=ties, executor=executor)
    prepared.weights = SiteWeights(model, sites)
    prepared.timings["load"] = time.perf_counter() - start
    if budget is not None:
        from onnx_fwlr.pipeline.budget import check_reachable

        check_reachable(prepared, budget)
    if not sites:
        prepared.warnings.append("the model has no factorisable MatMul/Gemm weight; nothing was changed.")
        return prepared
    start = time.perf_counter()
    wanted = pricing(model, sites, method) if pricing is not None else None
    prepared.stats = _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes,
                                 fisher_options or {}, stats_memory, progress, executor, source, wanted)
    if wanted is not None and wanted.batches:
        prepared.quant_stats = wanted.result(prepared.stats.meta.get("data", "the calibration data"))
    if prepared.stats is not None:
        prepared.timings["calibrate"] = time.perf_counter() - start
        prepared.warnings += getattr(prepared.stats, "warnings", [])  # Ray's group tasks: where they ran
        if prepared.stats.meta.get("smoke_test"):
            prepared.warnings.append("calibrated on random data: a smoke test, not a measurement of quality.")
    prepared.site_methods = {s.weight: method if _has_stats(method, s, prepared.stats) else "svd" for s in sites}
    return prepared


def _untied(sites: list[Site], ties) -> list[Site]:
    heads = {tie.head for tie in ties}
    return [s for s in sites if s.weight not in heads]


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
        workers=prepared.workers, executor=prepared.executor) if needed else iter(())
    for i, site in enumerate(prepared.sites):
        if site.weight in needed:
            start, calibrating = time.perf_counter(), _later_calibration_seconds(prepared)
            _, dec = next(fresh)
            calibrating = _later_calibration_seconds(prepared) - calibrating  # a pass for the next group of sites
            decomposing = time.perf_counter() - start - calibrating
            for stage, seconds in (("decompose", decomposing), ("calibrate", calibrating)):
                prepared.timings[stage] = prepared.timings.get(stage, 0.0) + seconds
            if store:
                if spill_needed(prepared.sites) and not isinstance(dec, SpilledDecomposition):
                    dec = SpilledDecomposition(dec, _spill_file(prepared))  # spectra in memory, factors on disk
                    # (large models; a Ray group task spills its own: pipeline.distributed)
                prepared.decompositions[site.weight] = dec
        elif store:
            dec = prepared.decompositions.get(site.weight)
        else:
            dec = prepared.decompositions.pop(site.weight, None)
        yield site, (dec if ranks is None or ranks[i] is not None else None)


def _spill_file(prepared: Prepared) -> SpillFile:
    """The file the prepared model's spilled factors go to (made on first use; each SpilledDecomposition keeps
    it open, so it lasts as long as any of them, whatever happens to `prepared`)."""
    if prepared.spill is None:
        prepared.spill = SpillFile(prefix="onnx-fwlr-factors-")
    return prepared.spill


def _later_calibration_seconds(prepared: Prepared) -> float:
    return getattr(prepared.stats, "later_seconds", 0.0)


def _has_stats(method: str, site: Site, stats) -> bool:
    needs = get_method(method).needs
    return (("activations" not in needs or stats.has_activations(site))
            and ("gradients" not in needs or stats.has_gradients(site)))


def _statistics(model, sites, method, calibration, stats, batch_size, mask_input, shapes, fisher_options, stats_memory,
                progress, executor=None, source=None, pricing=None):
    """The statistics the method needs: loaded, given, or measured now (in shards when `executor` says so);
    None for svd without data."""
    needs = get_method(method).needs
    if isinstance(stats, (str, os.PathLike)):
        stats = Statistics.load(stats, expect_fingerprint=model_fingerprint(model))
    groups = None
    if stats is None and calibration is not None and "gradients" in needs and executor is not None \
            and executor.kind == "ray" and executor.shards == 1:
        groups = _fisher_groups(sites, fisher_options, _gradient_memory(model, stats_memory))
    if groups is not None:  # per-group units: each group's pass and decompositions in one task on the cluster
        from onnx_fwlr.pipeline.distributed import ray_grouped_statistics

        stats = ray_grouped_statistics(model if source is None else source, model, sites, calibration, executor,
                                       groups, batch_size=batch_size, shapes=shapes, mask_input=mask_input,
                                       fisher_options=fisher_options)
    elif stats is None and calibration is not None and needs and executor is not None and executor.sharded:
        from onnx_fwlr.pipeline.distributed import sharded_statistics

        stats = sharded_statistics(model if source is None else source, model, sites, calibration, executor,
                                   gradients="gradients" in needs, batch_size=batch_size, shapes=shapes,
                                   mask_input=mask_input, fisher_options=fisher_options, memory_limit=stats_memory)
    elif stats is None and calibration is not None and needs:
        batches = open_data(calibration, model, batch_size=batch_size, shapes=shapes)
        if "gradients" in needs:
            stats = _gradient_statistics(model, sites, batches, mask_input, progress, fisher_options, stats_memory,
                                         pricing)
        else:
            stats = collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress,
                                             memory_limit=stats_memory)
    if needs:
        if stats is None:
            raise FwlrError(f"`method` {method} needs calibration data; pass `calibration` (or `stats`).")
        stats.require(sites, needs, method)
    return stats


def model_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's tensors: in memory (measured without serialising them), and in external data files."""
    return message_bytes(model) + external_bytes(model)


def _fisher_groups(sites, fisher_options, stats_memory):
    """Consecutive groups of sites whose gradient statistics fit `stats_memory` (default
    activations.default_memory_limit()), or None when all of them fit together."""
    from onnx_fwlr.stats import fisher  # imports the backward pass: only when needed

    sketch = {k: fisher_options[k] for k in ("sketch_min_dim", "sketch_rank") if k in fisher_options}
    limit = default_memory_limit() if stats_memory is None else stats_memory
    if fisher.fisher_stats_bytes(sites, **sketch) > limit:
        return fisher.fisher_groups(sites, limit, **sketch)
    return None


def _gradient_statistics(model, sites, batches, mask_input, progress, fisher_options, stats_memory, pricing=None):
    """Gradient statistics in one pass, held one group of sites at a time when they would not fit `stats_memory`
    together (the Grams of a 1 B decoder take 30 GB; stats.fisher.GroupedFisherStatistics). A model with more
    than LAZY_THRESHOLD bytes of weights holds, by default, at most half its weights' bytes of statistics at a
    time: grouping costs no extra pass (the pass is set aside on disk), so memory stays near the weights ONNX
    Runtime holds plus one sample's forward values (docs/llm.md, "The memory rule"). `pricing` is folded from
    the same pass (quant.calibration.Pricing)."""
    from onnx_fwlr.stats import fisher  # imports the backward pass: only when needed

    options = dict(mask_input=mask_input, progress=progress, **fisher_options)
    groups = _fisher_groups(sites, fisher_options, _gradient_memory(model, stats_memory))
    if groups is not None:
        return fisher.GroupedFisherStatistics(model, sites, groups, batches, options, pricing)
    return fisher.collect_fisher_stats(model, sites, batches, pricing=pricing, **options)


def _gradient_memory(model, stats_memory):
    """`stats_memory` for gradient statistics: the caller's, else half the weights' bytes for a model over
    LAZY_THRESHOLD (the memory rule, _gradient_statistics; a Ray group task holds this much too), else None."""
    if stats_memory is None and model_weight_bytes(model) > LAZY_THRESHOLD:
        return min(default_memory_limit(), model_weight_bytes(model) // 2)
    return stats_memory


def _unmatched_patterns(include, exclude, sites, skipped) -> list[str]:
    """A pattern that matches no node or weight name is almost always a typo: say so."""
    names = [n for s in sites for n in [s.weight] + [u.node_name for u in s.uses]]
    names += [n for s in skipped for n in (s.node, s.weight) if n]
    return [
        f"{option} '{pattern}' matched no node or weight name; check the names with `onnx-fwlr inspect`."
        for pattern, option in ((include, "`include`"), (exclude, "`exclude`"))
        if pattern and not any(re.search(pattern, n) for n in names)
    ]
