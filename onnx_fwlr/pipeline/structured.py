"""Structured replacements (--method kron, --methods A,B, --dope): per site, the structure with the lowest
weighted error at the same number of stored numbers (methods.structured_fit)."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.report import KRONECKER_TERMS, LOW_RANK, SiteResult
from onnx_fwlr.methods.registry import METHODS, structured_metric
from onnx_fwlr.methods.structured import KronSum, Structured
from onnx_fwlr.methods.structured_fit import fit_structured_site
from onnx_fwlr.pipeline.budget import ratio_for_size
from onnx_fwlr.pipeline.build import assemble
from onnx_fwlr.pipeline.prepare import prepare
from onnx_fwlr.rewrite.lowrank import Factors
from onnx_fwlr.sites.find import weight_matrix
from onnx_fwlr.sites.recurrent import is_recurrent


def site_doping(K: int, N: int, ratio: float, dope: float, dope_share: float | None) -> float:
    """The doping fraction of a [K, N] site's entries: `dope`, or with `dope_share` the entries that take that
    share of the site's ratio·K·N stored numbers (3 numbers each: the talk's "controlling sparsity")."""
    if dope_share is None:
        return dope
    return int(dope_share * ratio * K * N // 3) / (K * N)


def check_dope_share(dope: float, dope_share: float | None) -> None:
    if dope_share is None:
        return
    if dope:
        raise FwlrError("`dope` and `dope_share` both set the doping budget; pass one of them.")
    if not 0.0 < dope_share < 1.0:
        raise FwlrError(f"`dope_share` {dope_share} is out of range; give the share of each site's stored numbers "
                        "spent on doping, 0 < S < 1 (e.g. 0.3).")


# Long: checks, then one loop over sites; the checks must precede any calibration.
def compress_structured(model, mix, budget, allocation, bias_correction, dope, kron_shape, options, *,
                        dope_share=None, forms="default", form_timer=None, latency=None, feed=None):
    """--method kron, --methods A,B and --dope: per site, the structure with the lowest weighted error at
    ratio·K·N stored numbers (structured_sites.fit_structured_site), all judged in one low-rank metric.

    `dope_share`: doping as a share of each site's stored numbers instead of `dope`. `forms` "measured": each
    site's ONNX form is the fastest measured here at the model's row count (cost.forms, timed with
    `form_timer`, default OrtFormTimer), and a site whose fastest form is slower than its dense weight stays
    dense; "default": the form by multiply-adds (deterministic, no timing). `feed`: the batch to time at
    (pipeline.run's RunContext; default speed.timing_feed).

    Kronecker shapes (without `kron_shape`): chosen by error and measured time at the sites' rows per use
    (cost.kron_speed.KronSpeed, timed with `form_timer`, at `latency`'s threads and cache folder when given):
    the lowest-error shape that runs faster than the dense weight, written in the form it was timed in. A site
    no shape makes faster gets low rank at the same budget when that measures faster (a size budget prefers a
    smaller weight), else stays dense; its note says why.
    """
    check_dope_share(dope, dope_share)
    if forms not in ("default", "measured"):
        raise FwlrError(f"unknown `forms` '{forms}'; choose default or measured.")
    unknown = [m for m in mix if m not in METHODS]
    low_rank = [m for m in mix if m != "kron"]
    if unknown or len(low_rank) > 1:
        raise FwlrError(f"`methods` {','.join(mix)}: give kron and at most one low-rank method of "
                        f"{', '.join(m for m in METHODS if m not in ('kron', 'kfac'))} (e.g. whiten,kron).")
    for m in low_rank:
        structured_metric(m)  # kfac has no structured fit: say so before calibrating
    if allocation != "uniform" or budget.rank is not None or budget.ranks or budget.max_error is not None:
        raise FwlrError("`method` kron, `methods` and `dope` take `ratio` or `target_size` with uniform allocation; "
                        "`rank`, `max_error` and `allocation` global are for plain low-rank methods.")
    if kron_shape is not None and "kron" not in mix:
        raise FwlrError("`kron_shape` only applies to Kronecker structures; add `method` kron (or `methods` ...,kron).")
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
    speeds = site_speeds(prepared, options, form_timer, latency, feed) if "kron" in structures and kron_shape is None \
        else [None] * len(sites)
    pairs, speed_forms = [], {}
    bar = tqdm(list(zip(sites, speeds)), desc="structured fit", unit="site", disable=not options.get("progress"),
               leave=False)  # a 1024 x 1024 site takes ~5-15 s here: elapsed time and ETA per site
    for site, speed in bar:
        method = prepared.site_methods[site.weight]
        recurrent = is_recurrent(site)
        active = stats is not None and stats.has_activations(site)
        fit_options = dict(
            method=method, input_gram=stats.input_gram(site) if active else None,
            fisher_row=stats.fisher_row(site) if stats is not None and stats.has_gradients(site) else None,
            mean_input=stats.mean_input(site) if active and bias_correction else None,
            dope=0.0 if recurrent else site_doping(site.K, site.N, ratio, dope, dope_share),
            kron_shape=None if recurrent else kron_shape,
            itemsize={"float16": 2, "bfloat16": 2, "float64": 8}.get(site.dtype, 4))
        W, budget_params = weight_matrix(prepared.model, site), ratio * site.K * site.N
        speed = None if recurrent else speed
        if speed is not None:
            speed.rejected = None  # shared by the sites timed at the same rows: this site's verdict only
        fit = fit_structured_site(W, ["lowrank"] if recurrent else structures, budget_params, speed=speed,
                                  **fit_options)
        speed_note = None
        if speed is not None and speed.rejected is not None:
            fit, speed_note = _without_kron(W, structures, budget_params, fit, speed, fit_options)
        result = SiteResult(name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N,
                            rank=None, params_before=site.params, params_after=site.params,
                            note="kept dense: no structure fits this budget with fewer stored numbers")
        replacement = None
        if fit is not None:
            structure = fit.replacement.structure
            lowrank = fit.structure == "lowrank"
            result.rank = structure.A.shape[1] if lowrank else structure.A.shape[0]
            result.rank_of = LOW_RANK if lowrank else KRONECKER_TERMS
            result.params_after, result.weighted_error = fit.params, fit.error
            result.relative_error = fit.relative_error
            result.note = f"{fit.description}, {fit.bytes:,} bytes"
            replacement = fit.replacement
            if fit.speed is not None:
                speed_forms[site.weight] = fit.speed.form
                result.note += "; " + _speed_words(fit.speed, fit.structure == "kron", fit.replacement.nnz > 0)
            if recurrent:
                replacement = Factors(structure.A, structure.B, fit.replacement.shift)
                result.note += "; recurrent weight R stays dense, low rank only (the op reads a dense W)"
        if speed_note is not None:
            result.note = speed_note if fit is None else f"{result.note}; {speed_note}"
        if method != weighting:
            result.note += "; no statistics reach this site: plain Frobenius fit"
        pairs.append((result, replacement))
    chosen, measured = speed_forms, None
    if forms == "measured":
        chosen, measured = measured_forms(prepared, pairs, options, form_timer, feed)
    model_out, report = assemble(prepared, allocation, budget, pairs, chosen)
    report.method = ",".join(mix)
    shape_note = {}
    if kron_shape:
        shape_note["kron_shape"] = kron_shape if isinstance(kron_shape, str) else list(kron_shape)
    report.budget.update(dope=dope, weighting=weighting, **shape_note)
    if dope_share is not None:
        report.budget["dope_share"] = dope_share
    if measured is not None:
        report.budget["forms"] = measured
        if measured["kept_dense"]:
            report.warnings.append("kept dense, no structured form is faster than the dense weight here: "
                                   + ", ".join(measured["kept_dense"]))
    return model_out, report


def measured_forms(prepared, pairs, options, timer, feed=None) -> tuple[dict, dict]:
    """Per structured site, the fastest form timed at its rows per use (cost.forms.choose_form); a site whose
    fastest form is slower than its dense weight is put back to dense in `pairs` (in place). Returns (weight name
    -> Form, what was measured for the report). Identical shapes and sparsity are timed once."""
    from onnx_fwlr.cost.forms import OrtFormTimer, choose_form
    from onnx_fwlr.cost.latency import site_rows
    from onnx_fwlr.pipeline.speed import timing_feed
    from onnx_fwlr.rewrite.lowrank import storage_dtype

    timer = timer or OrtFormTimer()
    if feed is None:
        feed = timing_feed(prepared.model, options["calibration"], options["batch_size"], options["shapes"])
    rows = site_rows(prepared.model, prepared.sites, feed)
    chosen, kept_dense, cache = {}, [], {}
    for index, ((result, replacement), site, site_rows_) in enumerate(zip(pairs, prepared.sites, rows)):
        if not isinstance(replacement, Structured) or not site_rows_:
            continue
        tokens = max(1, round(site_rows_ / len(site.uses)))
        dtype = storage_dtype(site)
        key = _timing_key(replacement, tokens, dtype)
        if key not in cache:
            cache[key] = choose_form(replacement, tokens, timer, dtype)
        choice = cache[key]
        doped, kron = replacement.nnz > 0, isinstance(replacement.structure, KronSum)
        if choice.faster:
            chosen[site.weight] = choice.form
            result.note += f"; {choice.describe(kron, doped)}"
            continue
        kept_dense.append(site.name)
        result.rank, result.params_after, result.weighted_error, result.relative_error = None, site.params, None, None
        result.rank_of = ""
        result.note = (f"kept dense: its fastest structured form takes {choice.ms:.3g} ms, the dense weight "
                       f"{choice.dense_ms:.3g} ms at {tokens} rows")
        pairs[index] = (result, None)
    return chosen, {"measured": True, "timed": len(cache), "kept_dense": kept_dense,
                    "forms": {w: f.label() for w, f in chosen.items()}}


def _timing_key(rep: Structured, tokens: int, dtype) -> tuple:
    """What a form's time depends on: shapes, terms or rank, doping count and the rows it touches."""
    touched = 0 if rep.doping is None else len(np.unique(rep.doping.rows))
    return (type(rep.structure).__name__, rep.structure.A.shape, rep.structure.B.shape, rep.nnz, touched, tokens,
            str(np.dtype(dtype)))


def site_speeds(prepared, options, timer, latency, feed=None) -> list:
    """Per site, the KronSpeed that times its Kronecker candidates at its rows per use: one batch of the
    calibration file or the `shapes` feed when given, else cost.kron_speed.DEFAULT_ROWS. Sites with the same
    rows share one (and its cache). `feed`: that batch when the run already built it (pipeline.run's RunContext)."""
    from onnx_fwlr.cost.kron_speed import DEFAULT_ROWS, KronSpeed
    from onnx_fwlr.cost.latency import site_rows
    from onnx_fwlr.pipeline.speed import timing_feed
    from onnx_fwlr.rewrite.lowrank import storage_dtype

    calibration, shapes = options["calibration"], options["shapes"]
    rows = [None] * len(prepared.sites)
    if shapes or (calibration is not None and not (isinstance(calibration, str) and calibration == "random")
                  and not hasattr(calibration, "get_next")):
        try:
            if feed is None:
                feed = timing_feed(prepared.model, calibration, options["batch_size"], shapes)
        except FwlrError:
            feed = None  # an in-memory iterable: the model's rows are unknown, the default ones are timed
        if feed is not None:
            rows = site_rows(prepared.model, prepared.sites, feed)
    made = {}
    speeds = []
    for site, site_rows_ in zip(prepared.sites, rows):
        wanted = (max(1, round(site_rows_ / len(site.uses))),) if site_rows_ else DEFAULT_ROWS
        key = (wanted, str(np.dtype(storage_dtype(site))))
        if key not in made:
            made[key] = KronSpeed(wanted, timer=timer, threads=getattr(latency, "threads", None),
                                  cache_dir=getattr(latency, "cache_dir", None), dtype=storage_dtype(site),
                                  progress=options.get("progress", False))
        speeds.append(made[key])
    return speeds


def _without_kron(W, structures, budget_params, fit, speed, fit_options):
    """No Kronecker shape beats the dense weight here: (the fit to keep, the note). With a low-rank method in the
    mix its fit stands; with kron alone, low rank at the same budget when it measures faster than dense (the
    size budget prefers a smaller weight), else nothing (dense)."""
    why = f"kron: {speed.rejected}"
    if fit is not None or structures != ["kron"]:
        return fit, why
    fallback = fit_structured_site(W, ["lowrank"], budget_params, **fit_options)
    if fallback is None:
        return None, f"kept dense: {why}"
    rank = fallback.replacement.structure.A.shape[1]
    measured = speed.measure(W.shape[0], W.shape[1], None, rank, fallback.replacement.nnz)
    if not measured.faster():
        return None, (f"kept dense: {why}; low rank {rank} at the same budget took {measured.ratio:.2f}x the dense "
                      f"time at {speed.describe_rows()}")
    fallback.speed = measured
    return fallback, f"{why}; low rank at the same budget instead"


def _speed_words(speed, kron: bool, doped: bool) -> str:
    at = ", ".join(f"{ratio:.2f}x at {rows} rows" for rows, ratio in sorted(speed.ratios.items()))
    return f"form {speed.form.label(kron, doped)}: {at} the dense time (measured)"
