"""`onnx-fwlr sweep`: one calibration, one decomposition per site and method, then every budget evaluated.

The user sees where the knee of the fidelity-vs-size curve is before choosing a compressed model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.report import format_table
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import load_model, save_model
from onnx_fwlr.pipeline.compress import (
    METHODS,
    Budget,
    build,
    check_method,
    choose_ranks,
    ensure_decompositions,
    prepare,
    validate,
)
from onnx_fwlr.pipeline.defaults import check_data_first
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.stats.activations import collect_activation_stats


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # method/allocation pairs asked for that cannot run
    spectra: dict = field(default_factory=dict)  # config -> [(site, singular values, rank at the middle ratio)]
    files: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)

    def format(self) -> str:
        headers = ["method", "allocation", "ratio", "params kept", "mean cosine", "rel. L2", "top-1 agree",
                   "accuracy", "latency ms"]
        table = [
            [r["method"], r["allocation"], f"{r['ratio']:.2f}", f"{r['param_ratio']:.3f}", f"{r['mean_cosine']:.4f}",
             f"{r['rel_l2_error']:.4f}", _pct(r.get("top1_agreement")), _pct(r.get("accuracy")),
             "" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}"]
            for r in self.rows
        ]
        return "\n".join([format_table(headers, table, align="llrrrrrrr")] + self.skipped)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "calibration": self.calibration, "files": self.files, "skipped": self.skipped}


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f} %"


def sweep(
    model, calibration, validation, *, ratios: list[float], methods: list[str] | None = None,
    allocations: list[str] | None = None, out_dir: str | Path, batch_size: int = 32, mask_input: str | None = None,
    latency: bool = False, latency_runs: int = 20, save_models: bool = False, progress: bool = True,
    fisher_options: dict | None = None, workers: int = 1, force: bool = False,
) -> SweepResult:
    """Every method × allocation × ratio from one calibration, plus the original as the reference row.

    `methods` None: svd, whiten and kfac with calibration data, svd without. `allocations` None: each
    method's default (global for loss-unit methods, fwsvd and kfac; uniform otherwise); given ones run for
    every method they fit, and the pairs that do not fit are listed in `result.skipped`. An existing `out_dir`
    with files in it is refused unless `force`.
    """
    out = _check_folder(out_dir, force)
    for ratio in ratios:
        Budget(ratio=ratio).check()
    methods = methods or (["svd", "whiten", "kfac"] if calibration is not None else ["svd"])
    configs, skipped = _configs(methods, allocations)
    check_data_first(model, [calibration, validation], batch_size, None)
    original = load_model(model)
    gradients = any(METHODS[m].loss_units for m, _ in configs)
    sites, _ = find_all_sites(original, None, None, fisher=gradients)  # the sites compress finds
    if not sites:
        raise FwlrError("the model has no factorisable MatMul/Gemm weight; there is nothing to sweep.")
    out.mkdir(exist_ok=True)
    result = SweepResult(skipped=skipped)
    stats = _sweep_statistics(original, sites, calibration, {m for m, _ in configs}, batch_size, mask_input,
                              progress, fisher_options or {})
    if stats is not None:
        result.calibration = {k: v for k, v in stats.meta.items()}
    original_path = _model_path(model, original, out)
    for method in sorted({m for m, _ in configs}, key=methods.index):
        prepared = prepare(original, method=method, stats=stats if METHODS[method].needs else None, workers=workers,
                           progress=progress)
        ensure_decompositions(prepared)  # every budget, and the spectra plot, read whole spectra: decompose once
        for allocation in [a for m, a in configs if m == method]:
            config = f"{method}/{allocation}"
            middle = sorted(ratios)[len(ratios) // 2]
            for ratio in tqdm(ratios, desc=f"sweep {config}", disable=not progress, leave=False):
                ranks = choose_ranks(prepared, Budget(ratio=ratio), allocation)
                compressed, report = build(prepared, ranks, allocation, Budget(ratio=ratio),
                                           bias_correction=METHODS[method].bias_correction)
                row = _evaluate(original, compressed, report, validation, batch_size)
                row.update(config=config, method=method, allocation=allocation, ratio=ratio)
                if latency or save_models:
                    path = out / f"{method}_{allocation}_{ratio:g}.onnx"
                    save_model(compressed, path)
                    if save_models:
                        result.files.append(str(path))
                    if latency:
                        row["latency_ms"], row["baseline_latency_ms"] = _latency(original_path, path, original,
                                                                                 validation, batch_size, latency_runs)
                    if not save_models:
                        path.unlink()
                result.rows.append(row)
                if ratio == middle:
                    result.spectra[config] = [(s.name, prepared.decompositions[s.weight].s, r)
                                              for s, r in zip(prepared.sites, ranks)]
    result.rows.insert(0, _reference_row(result.rows))
    return result


def _check_folder(out_dir, force: bool) -> Path:
    out = Path(out_dir)
    if not out.parent.is_dir():
        raise FwlrError(f"folder {out.parent} does not exist; create it first or choose another -o.")
    if out.exists() and not out.is_dir():
        raise FwlrError(f"{out} is a file; give a folder for the sweep's results (-o).")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FwlrError(f"folder {out} already holds files; pass --force (force=True) to write into it, or choose "
                        "another -o.")
    return out


def _configs(methods: list[str], allocations: list[str] | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(method, allocation) pairs to run, and a sentence for each pair asked for that cannot run."""
    for method in methods:
        if method not in METHODS or METHODS[method].structure != "lowrank":
            known = ", ".join(m for m in METHODS if METHODS[m].structure == "lowrank")
            raise FwlrError(f"sweep method '{method}' is not a low-rank method; choose from {known}.")
    if allocations is None:
        return [(m, "global" if METHODS[m].loss_units else "uniform") for m in methods], []
    configs, skipped = [], []
    for method in methods:
        for allocation in allocations:
            check_method(method, "uniform" if allocation == "global" else allocation)  # unknown names fail here
            if allocation == "global" and not METHODS[method].loss_units:
                skipped.append(f"{method}/global skipped: global allocation ranks sites in loss units, which needs "
                               "gradient statistics (fwsvd, kfac).")
            else:
                configs.append((method, allocation))
    if not configs:
        raise FwlrError("no method/allocation pair can run: global allocation needs fwsvd or kfac.")
    return configs, skipped


def _reference_row(rows: list[dict]) -> dict:
    """The original model as a row: what every configuration is measured against."""
    first = rows[0] if rows else {}
    row = {"config": "original", "method": "original", "allocation": "", "ratio": 1.0, "param_ratio": 1.0,
           "params_kept": None, "ranks": {}, "output": first.get("output"), "mean_cosine": 1.0, "min_cosine": 1.0,
           "rel_l2_error": 0.0, "top1_agreement": None if first.get("top1_agreement") is None else 1.0,
           "accuracy": first.get("original_accuracy"), "original_accuracy": first.get("original_accuracy")}
    if first.get("baseline_latency_ms") is not None:
        row["latency_ms"] = row["baseline_latency_ms"] = first["baseline_latency_ms"]
    return row


def _sweep_statistics(model, sites, calibration, methods, batch_size, mask_input, progress, fisher_options):
    """One calibration serves every method: gradients (which include activations) when any method needs them."""
    needs = {n for m in methods for n in METHODS[m].needs}
    if not needs:
        return None
    if calibration is None:
        raise FwlrError(f"methods {sorted(methods)} need calibration data; pass --calib DATA.")
    batches = open_data(calibration, model, batch_size=batch_size)
    if "gradients" in needs:
        from onnx_fwlr.stats.fisher import collect_fisher_stats

        return collect_fisher_stats(model, sites, batches, mask_input=mask_input, progress=progress, **fisher_options)
    return collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress)


def _evaluate(original, compressed, report, validation, batch_size) -> dict:
    check = validate(original, compressed, validation, batch_size=batch_size, progress=False)
    first = check.outputs[0]
    return {
        "params_kept": report.site_params_after,
        "param_ratio": report.site_params_after / max(report.site_params_before, 1),
        "ranks": {s.name: s.rank for s in report.sites},
        "output": first.name,
        "mean_cosine": first.mean_cosine,
        "min_cosine": first.min_cosine,
        "rel_l2_error": first.rel_l2_error,
        "top1_agreement": first.top1_agreement,
        "accuracy": check.compressed_accuracy,
        "original_accuracy": check.original_accuracy,
    }


def _model_path(model, loaded: onnx.ModelProto, out: Path) -> Path:
    if isinstance(model, (str, Path)):
        return Path(model)
    path = out / "original.onnx"
    save_model(loaded, path)
    return path


def _latency(original_path, path, structure, validation, batch_size, runs) -> tuple[float, float]:
    from onnx_fwlr.evaluate.profiling import profile_model

    feed, _ = next(iter(open_data(validation, structure, batch_size=batch_size)))
    ours = profile_model(str(path), feed, runs=runs, warmup=3, op_profile=False)
    base = profile_model(str(original_path), feed, runs=runs, warmup=3, op_profile=False)
    return ours["latency_50_percentile"], base["latency_50_percentile"]  # the median resists noise spikes


def write_outputs(result: SweepResult, out_dir: str | Path, plots: bool = True) -> list[str]:
    """sweep.json always; sweep.png and spectra PNGs when matplotlib is installed (else say how to get it)."""
    out = Path(out_dir)
    written = [str(out / "sweep.json")]
    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=float) + "\n")
    if not plots:
        return written
    from onnx_fwlr.evaluate.plots import plot_spectra, plot_sweep

    metric = "accuracy" if all(r.get("accuracy") is not None for r in result.rows) else "mean_cosine"
    written.append(str(plot_sweep(result.rows, metric, out / "sweep.png")))
    for config, spectra in result.spectra.items():
        name = out / f"spectra_{config.replace('/', '_')}.png"
        written.append(str(plot_spectra(spectra, name, title=f"weighted spectra, {config}, middle ratio")))
    return written

