"""`onnx-fwlr sweep`: one calibration, one decomposition per site and method, then every budget evaluated.

The user sees where the knee of the fidelity-vs-size curve is before choosing a compressed model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import load_model, save_model
from onnx_fwlr.pipeline.budget import least_ratio, rank_one_shortfall
from onnx_fwlr.pipeline.compress import METHODS, check_method
from onnx_fwlr.pipeline.config import BudgetOptions, DataOptions, MethodOptions, RunConfig
from onnx_fwlr.pipeline.defaults import check_data_first
from onnx_fwlr.pipeline.distributed import ready_executor, sharded_statistics
from onnx_fwlr.pipeline.run import Reuse, run
from onnx_fwlr.quant.ortquant import BASELINES, LEVEL4_BASELINES
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.stats.activations import collect_activation_stats
from onnx_fwlr.tables import format_table
from onnx_fwlr.workflows.frontier import (
    DEFAULT_INT8_FRACTIONS,
    INT8_BASELINE,
    QUANT_METHOD,
    baseline_models,
    budget_label,
    fidelity,
    frontier_metric,
    mark_pareto,
    model_bytes,
    quantized_models,
)


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # configurations asked for that cannot run, one sentence each
    spectra: dict = field(default_factory=dict)  # config -> [(site, singular values, rank at the middle ratio)]
    files: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    metric: str = "mean_cosine"  # what the Pareto points are judged by (frontier.frontier_metric)
    timed_on: str = "the first validation batch"  # what the latency column was measured on

    def format(self) -> str:
        headers = ["config", "budget", "bytes", "vs original", "params kept", "mean cosine", "min cosine", "rel. L2",
                   "top-1 agree", "accuracy", "latency x", "Pareto"]
        base = self.rows[0]["bytes"] if self.rows and self.rows[0].get("bytes") else None
        table = [
            [r["config"], budget_label(r), f"{r['bytes']:,}", "" if base is None else f"{r['bytes'] / base:.3f}",
             "" if r.get("param_ratio") is None else f"{r['param_ratio']:.3f}", _digits(r.get("mean_cosine")),
             _digits(r.get("min_cosine")), _digits(r.get("rel_l2_error")), _pct(r.get("top1_agreement")),
             _pct(r.get("accuracy")), "" if r.get("latency_ratio") is None else f"{r['latency_ratio']:.3f}",
             ", ".join(r.get("pareto", []))]
            for r in self.rows
        ]
        note = (f"Pareto: no other row is as small (bytes; latency) and as good ({self.metric.replace('_', ' ')}), "
                "and better in one of the two.")
        if self.metric == "accuracy":
            note += " Accuracy ties (common on small test sets) are broken by the mean cosine with the original."
        if any(r.get("kind") in ("baseline", "quantized") or r["config"].startswith("ORT int8") for r in self.rows):
            from onnx_fwlr.quant.int8_kernels import WHY, int8_saturates

            if int8_saturates():
                note += f" Dynamic int8 here: {WHY}."
        if any(r.get("latency_ratio") is not None for r in self.rows):
            note += (" latency x: the row's latency over the original's, the median of alternating pairs on "
                     f"{self.timed_on} (profile --compare's measure).")
        return "\n".join([format_table(headers, table, align="llrrrrrrrrrl"), note] + self.skipped)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "calibration": self.calibration, "files": self.files, "skipped": self.skipped,
                "pareto_metric": self.metric}


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f} %"


def _digits(value) -> str:
    """Four decimals; blank where the row was not judged (compress's latency table without validation data)."""
    return "" if value is None else f"{value:.4f}"


# Long: the sweep's loop over methods, allocations and budgets reads best in one place.
def sweep(
    model, calibration, validation, *, ratios: list[float], methods: list[str] | None = None,
    allocations: list[str] | None = None, out_dir: str | Path, batch_size: int = 32, mask_input: str | None = None,
    latency: bool = False, latency_runs: int = 20, save_models: bool = False, progress: bool = True,
    fisher_options: dict | None = None, workers: int = 1, force: bool = False, quantize: list[str] | None = None,
    sizes: list[int] | None = None, int8_fractions: list[float] | None = None, baselines: bool | None = None,
    block_size: int = 32, judge: str | None = None, executor=None,
) -> SweepResult:
    """Every method × allocation × ratio from one calibration, every quantize mode × byte budget, ONNX Runtime's
    own quantizations of the original, and the original as the reference row; Pareto points marked.

    `methods` None: svd, whiten and kfac with calibration data, svd without (no low-rank rows when `ratios` is
    empty). `allocations` None: each method's default (global for loss-unit methods, fwsvd and kfac; uniform
    otherwise); given ones run for every method they fit, and the pairs that do not fit are listed in
    `result.skipped`. `quantize` (int4, int8, auto): kfac-corrected quantization (pipeline.quantized) at each of
    `sizes` (bytes) and `int8_fractions` of the bytes of ONNX Runtime's int8 model (default 0.7, 0.8, 0.9, 1.0
    when no sizes are given). `baselines` (default: with `quantize` or `latency`): ONNX Runtime's int8
    per-channel and int4 block 32/128 models of the original. `latency`: each row's latency over the
    original's (alternating pairs), and the latency frontier. `judge`: the output whose cosines the table
    reports (default: the Fisher output when named, else the first). An existing `out_dir` with files in it is
    refused unless `force`. `executor` (pipeline.distributed.Executor): calibration shards and decompositions
    on a Ray cluster (docs/distributed.md).
    """
    if workers < 1:  # before the folder is made
        raise FwlrError(f"`workers` {workers} is out of range; give 1 or more worker processes.")
    executor = ready_executor(executor, workers)
    out = _check_folder(out_dir, force)
    for ratio in ratios:
        if not 0 < ratio <= 1:
            raise FwlrError(f"`ratios` entry {ratio:g} is out of range; each ratio must satisfy 0 < ratio <= 1.")
    quantize = list(quantize or [])
    _check_quantize(quantize, calibration, list(sizes or []) + list(int8_fractions or []), block_size)
    if not ratios and not quantize and not baselines:
        raise FwlrError("nothing to sweep: give parameter ratios (`ratios`), `quantize` modes or `baselines`.")
    methods = methods or ((["svd", "whiten", "kfac"] if calibration is not None else ["svd"]) if ratios else [])
    configs, skipped = _configs(methods, allocations) if ratios else ([], [])
    check_data_first(model, [calibration, validation], batch_size, None)
    original = load_model(model)
    judge = judge or (fisher_options or {}).get("output")
    if judge is not None and judge not in {o.name for o in original.graph.output}:
        raise FwlrError(f"output '{judge}' is not an output of the model; name one of its outputs to judge by.")
    needed = {m for m, _ in configs} | ({QUANT_METHOD} if quantize else set())
    gradients = any(METHODS[m].loss_units for m in needed)
    sites, _ = find_all_sites(original, None, None, fisher=gradients)  # the sites compress finds
    if not sites:
        raise FwlrError("the model has no factorisable MatMul/Gemm weight; there is nothing to sweep.")
    _check_ratios_reachable(ratios, sites)
    out.mkdir(exist_ok=True)
    result = SweepResult(skipped=skipped)
    stats = _sweep_statistics(original, sites, calibration, needed, batch_size, mask_input, progress,
                              fisher_options or {}, executor, model)
    if stats is not None:
        result.calibration = {k: v for k, v in stats.meta.items()}
    measure = _Measure(original, _model_path(model, original, out), out, validation, batch_size, latency,
                       latency_runs, save_models, result, judge)
    _lowrank_rows(measure, original, configs, methods, ratios, stats, workers, progress, executor)
    int8_bytes = None
    if baselines or (baselines is None and (quantize or latency)):
        names = tuple(BASELINES) + (tuple(LEVEL4_BASELINES) if latency else ())
        for name, baseline in baseline_models(original, names):
            measure.row(baseline, {"config": name, "kind": "baseline", "method": "ONNX Runtime", "allocation": "",
                                   "params_kept": None, "param_ratio": None}, _stem(name))
            int8_bytes = result.rows[-1]["bytes"] if name == INT8_BASELINE else int8_bytes
    if quantize:
        budgets = _byte_budgets(original, sizes, int8_fractions, int8_bytes)
        for fields, compressed in quantized_models(
                original, quantize, budgets, stats=stats, calibration=calibration, block_size=block_size,
                batch_size=batch_size, mask_input=mask_input, fisher_options=fisher_options, progress=progress,
                skipped=result.skipped):
            measure.row(compressed, fields, f"quantize_{fields['allocation']}_{fields['target_size']}")
    result.rows.insert(0, _reference_row(result.rows, model_bytes(original)))
    result.metric = frontier_metric(result.rows)
    mark_pareto(result.rows, result.metric)
    return result


def _check_ratios_reachable(ratios: list[float], sites) -> None:
    """Refuse, before any statistics, a ratio that rank 1 on every site already passes (each run would refuse
    it after the calibration pass)."""
    low = [ratio for ratio in ratios if rank_one_shortfall(sites, ratio) is not None]
    if low:
        smallest, total = rank_one_shortfall(sites, min(low))
        raise FwlrError(f"`ratios` entry {min(low):g} is below what rank 1 on every factorised site keeps "
                        f"({smallest:,} of {total:,} parameters); give ratios of at least "
                        f"{least_ratio(smallest, total):g}.")


def _lowrank_rows(measure, original, configs, methods, ratios, stats, workers, progress, executor=None) -> None:
    """Every method × allocation × ratio, each a pipeline.run.run of its own config; the runs share each method's
    decompositions (Reuse: made whole once, by its first run)."""
    result, reuse = measure.result, Reuse()
    for method in sorted({m for m, _ in configs}, key=methods.index):
        for allocation in [a for m, a in configs if m == method]:
            config = f"{method}/{allocation}"
            middle = sorted(ratios)[len(ratios) // 2]
            for ratio in tqdm(ratios, desc=f"sweep {config}", disable=not progress, leave=False):
                compressed, report = run(RunConfig(
                    model=original, data=DataOptions(stats=stats if METHODS[method].needs else None),
                    budget=BudgetOptions(ratio=ratio),
                    method=MethodOptions(method=method, allocation=allocation,
                                         bias_correction=METHODS[method].bias_correction, workers=workers,
                                         executor=executor),
                    progress=progress), reuse=reuse)
                fields = {"config": config, "kind": "lowrank", "method": method, "allocation": allocation,
                          "ratio": ratio, "params_kept": report.site_params_after,
                          "param_ratio": report.site_params_after / max(report.site_params_before, 1),
                          "ranks": {s.name: s.rank for s in report.sites}}
                measure.row(compressed, fields, f"{method}_{allocation}_{ratio:g}")
                if ratio == middle:
                    prepared = reuse.prepared[method]
                    ranks = {s.name: s.rank for s in report.sites}
                    result.spectra[config] = [(s.name, prepared.decompositions[s.weight].s, ranks.get(s.name))
                                              for s in prepared.sites]


@dataclass
class _Measure:
    """Fidelity, bytes and (optionally) latency of each model, saved in the sweep's folder when asked."""

    original: onnx.ModelProto
    original_path: Path
    out: Path
    validation: object
    batch_size: int
    latency: bool
    latency_runs: int
    save_models: bool
    result: SweepResult
    judge: str | None = None  # the output whose cosines the rows report (else the first compared one)

    def row(self, model: onnx.ModelProto, fields: dict, stem: str) -> None:
        row = dict(fields, bytes=model_bytes(model))
        row.update(fidelity(self.original, model, self.validation, self.batch_size, judge=self.judge))
        if self.latency or self.save_models:
            path = self.out / f"{stem}.onnx"
            save_model(model, path)
            if self.save_models:
                self.result.files.append(str(path))
            if self.latency:
                row.update(_latency(self.original_path, path, self.original, self.validation, self.batch_size,
                                    self.latency_runs))
            if not self.save_models:
                path.unlink()
        self.result.rows.append(row)


def _stem(name: str) -> str:
    """A file name from a configuration's name: 'ORT int4 b32 (MatMul only)' -> 'ort_int4_b32_matmul_only'."""
    return "_".join(re.findall(r"[a-z0-9]+", name.lower()))


def _check_quantize(quantize: list[str], calibration, budgets: list, block_size: int) -> None:
    from onnx_fwlr.pipeline.quantized import QUANTIZE_MODES
    from onnx_fwlr.quant.ortquant import check_block_size

    for mode in quantize:
        if mode not in QUANTIZE_MODES:
            raise FwlrError(f"unknown `quantize` '{mode}'; choose from {', '.join(QUANTIZE_MODES)}.")
    if quantize and calibration is None:
        raise FwlrError("sweep `quantize` spreads byte budgets in loss units, which needs calibration data; pass "
                        "`calibration`.")
    if any(budget <= 0 for budget in budgets):
        raise FwlrError("every `sizes` entry must be positive (a size such as 20MB, or a multiple such as 0.8x).")
    check_block_size(block_size)


def _byte_budgets(original, sizes, int8_fractions, int8_bytes) -> list[tuple[int, str]]:
    """The byte budgets of the quantized rows, (bytes, how it was asked for): the sizes given, and fractions of
    the bytes of ONNX Runtime's int8 model."""
    fractions = list(int8_fractions or ([] if sizes else DEFAULT_INT8_FRACTIONS))
    if fractions and int8_bytes is None:  # baselines off, or the quantizer refused: make it for its bytes alone
        int8_bytes = next((model_bytes(m) for _, m in baseline_models(original, [INT8_BASELINE])), None)
        if int8_bytes is None:
            raise FwlrError("ONNX Runtime cannot quantize this model to int8, so budgets relative to its int8 model "
                            "have no size; give byte budgets with `sizes` (e.g. 20MB).")
    budgets = {size: f"{size:,} bytes" for size in sizes or []}
    budgets.update({int(f * int8_bytes): f"{f:g} x ORT int8" for f in fractions})
    return sorted(budgets.items())


def _check_folder(out_dir, force: bool) -> Path:
    out = Path(out_dir)
    if not out.parent.is_dir():
        raise FwlrError(f"folder {out.parent} does not exist; create it first or choose another -o.")
    if out.exists() and not out.is_dir():
        raise FwlrError(f"{out} is a file; give a folder for the sweep's results (-o).")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FwlrError(f"folder {out} already holds files; pass `force` to write into it, or choose "
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


def _reference_row(rows: list[dict], original_bytes: int) -> dict:
    """The original model as a row: what every configuration is measured against."""
    first = rows[0] if rows else {}
    row = {"config": "original", "kind": "original", "method": "original", "allocation": "", "ratio": 1.0,
           "param_ratio": 1.0, "params_kept": None, "ranks": {}, "bytes": original_bytes, "output": first.get("output"),
           "mean_cosine": 1.0, "min_cosine": 1.0, "rel_l2_error": 0.0,
           "top1_agreement": None if first.get("top1_agreement") is None else 1.0,
           "accuracy": first.get("original_accuracy"), "original_accuracy": first.get("original_accuracy")}
    if first.get("baseline_latency_ms") is not None:
        row["latency_ms"] = row["baseline_latency_ms"] = first["baseline_latency_ms"]
        row["latency_ratio"] = 1.0
    return row


def _sweep_statistics(model, sites, calibration, methods, batch_size, mask_input, progress, fisher_options,
                      executor=None, source=None):
    """One calibration serves every method: gradients (which include activations) when any method needs them;
    measured in shards when `executor` says so (`source`: what the shards load the model from)."""
    needs = {n for m in methods for n in METHODS[m].needs}
    if not needs:
        return None
    if calibration is None:
        raise FwlrError(f"methods {sorted(methods)} need calibration data; pass `calibration`.")
    if executor is not None and executor.sharded:
        return sharded_statistics(model if source is None else source, model, sites, calibration, executor,
                                  gradients="gradients" in needs, batch_size=batch_size, mask_input=mask_input,
                                  fisher_options=fisher_options)
    batches = open_data(calibration, model, batch_size=batch_size)
    if "gradients" in needs:
        from onnx_fwlr.stats.fisher import collect_fisher_stats

        return collect_fisher_stats(model, sites, batches, mask_input=mask_input, progress=progress, **fisher_options)
    return collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress)


def _model_path(model, loaded: onnx.ModelProto, out: Path) -> Path:
    if isinstance(model, (str, Path)):
        return Path(model)
    path = out / "original.onnx"
    save_model(loaded, path)
    return path


def _latency(original_path, path, structure, validation, batch_size, runs) -> dict:
    """The row's latency against the original's on the first validation batch, as profile --compare measures it:
    alternating pairs in one fresh process, the median of the per-pair ratios (a shared machine's load moves
    separate timings far more than it moves a ratio)."""
    from onnx_fwlr.cost.limits import paired_ratio

    feed, _ = next(iter(open_data(validation, structure, batch_size=batch_size)))
    paired = paired_ratio(str(original_path), str(path), feed, runs=runs)
    return {"latency_ratio": paired["ratio_p50"], "latency_ratio_p10": paired["ratio_p10"],
            "latency_ratio_p90": paired["ratio_p90"], "latency_ms": paired["compressed_p50_ms"],
            "baseline_latency_ms": paired["original_p50_ms"]}


def write_outputs(result: SweepResult, out_dir: str | Path, plots: bool = True) -> list[str]:
    """sweep.json always; sweep.png and spectra PNGs when matplotlib is installed (else say how to get it)."""
    out = Path(out_dir)
    written = [str(out / "sweep.json")]
    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=float) + "\n")
    if not plots:
        return written
    from onnx_fwlr.evaluate.plots import plot_spectra, plot_sweep

    written.append(str(plot_sweep(result.rows, result.metric, out / "sweep.png")))
    for config, spectra in result.spectra.items():
        name = out / f"spectra_{config.replace('/', '_')}.png"
        written.append(str(plot_spectra(spectra, name, title=f"weighted spectra, {config}, middle ratio")))
    return written

