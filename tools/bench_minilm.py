"""Benchmark on a real pretrained transformer: all-MiniLM-L6-v2 sentence embeddings.

    python tools/export_minilm.py            # once: model, calibration and evaluation sentences
    python tools/bench_minilm.py --sequential --refine 150 --latency --curve 128,512,2048,3000,8000 \
        --ecosystem --json .cache/minilm/bench/results.json        # --ecosystem needs `pip install sympy`

Methods × allocations × ratios (ratio = parameters kept in the 36 MatMul weights), judged on 512 held-out
sentences against the original model: mean and min cosine of `sentence_embedding`, Spearman correlation of
all pairwise cosine similarities (what a semantic-search user feels), top-1 nearest-neighbour agreement.
Then the best configuration with --sequential (and with refinement when asked), latency at batch 32 ×
seq 128 with 2 threads next to the FLOP ratio, a curve of quality against calibration-set size, and the
ecosystem round-trip (dynamic quantisation, ONNX Runtime's BERT fusion). Every part can be switched off.

Calibration sentences are bucketed by length (batches of 32 sentences of similar length, each padded to
its own longest), which changes no statistic (padding is masked out) and saves ~2/3 of the compute.
Statistics files are cached under --cache/minilm/bench and reused on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread: numpy's sums run between ONNX Runtime calls, and spinning BLAS threads next to ORT's made
# the gradient pass several times slower on this 2-core machine. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
import onnxruntime as ort
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]

import onnx_fwlr
from onnx_fwlr.api import Budget, build, choose_ranks, correct_sequentially, prepare
from onnx_fwlr.stats.store import Statistics
from onnx_fwlr.tables import format_table

OUTPUT = "sentence_embedding"
GRADIENT_METHODS = ("fwsvd", "kfac")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(ROOT / ".cache"), help="folder given to export_minilm.py")
    p.add_argument("--calib-size", type=int, default=3000, help="calibration sentences (up to 3000)")
    p.add_argument("--ratios", default="0.9,0.7,0.5,0.3")
    p.add_argument("--methods", default="svd,asvd,whiten,fwsvd,kfac")
    p.add_argument("--sequential", action="store_true", help="also the best configuration with --sequential")
    p.add_argument("--sequential-size", type=int, default=1024, help="calibration sentences the correction reads")
    p.add_argument("--sequential-ratios", default="0.7,0.5", help="ratios the sequential correction is run at")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS", help="also refine the best configuration")
    p.add_argument("--refine-lr", type=float, default=3e-5)
    p.add_argument("--latency", action="store_true", help="latency at batch 32 x seq 128, 2 threads")
    p.add_argument("--curve", default="", metavar="SIZES", help="calibration sizes for the data curve, e.g. 128,512,2048")
    p.add_argument("--ecosystem", action="store_true", help="quantize_dynamic and BERT fusion round-trip")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    return p.parse_args()


# ------------------------------------------------------------------ data and metrics

def bucketed(source: Path, folder: Path, count: int, batch: int = 32) -> Path:
    """The first `count` samples of an .npz as a folder of length-bucketed batches (cached)."""
    folder = folder / f"calib_{count}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    data = {k: v[:count] for k, v in np.load(source).items()}
    if len(data["input_ids"]) < count:
        sys.exit(f"{source} holds {len(data['input_ids'])} sentences, fewer than {count}; "
                 f"rerun `python tools/export_minilm.py --calib-size {count}`.")
    lengths = data["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    for b, start in enumerate(range(0, len(order), batch)):
        index = np.sort(order[start:start + batch])
        width = int(lengths[index].max())
        np.savez(folder / f"batch{b:04d}.npz", **{k: v[index, :width] for k, v in data.items()})
    (folder / "done").write_text(str(count))
    return folder


def session(model, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def embed(model, data: dict, batch: int = 64) -> np.ndarray:
    run = session(model)
    n = len(next(iter(data.values())))
    return np.concatenate([run.run([OUTPUT], {k: v[i:i + batch] for k, v in data.items()})[0]
                           for i in range(0, n, batch)])


def quality(reference: np.ndarray, embedding: np.ndarray) -> dict:
    def unit(e):
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    ref, emb = unit(reference.astype(np.float64)), unit(embedding.astype(np.float64))
    cosine = np.sum(ref * emb, axis=1)
    sim_ref, sim_emb = ref @ ref.T, emb @ emb.T
    upper = np.triu_indices(len(ref), k=1)
    np.fill_diagonal(sim_ref, -np.inf)
    np.fill_diagonal(sim_emb, -np.inf)
    return {
        "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
        "spearman": float(spearmanr(sim_ref[upper], sim_emb[upper]).statistic),
        "nn_agreement": float(np.mean(sim_ref.argmax(1) == sim_emb.argmax(1))),
    }


def inference_seconds(model, folder: Path) -> float:
    run = session(model)
    start = time.perf_counter()
    for path in sorted(folder.glob("*.npz")):
        run.run([OUTPUT], dict(np.load(path)))
    return time.perf_counter() - start


def statistics(model_path, folder: Path, cache: Path, fisher: bool, timings: dict) -> Statistics:
    """Activation (+ Gaussian-cotangent Fisher) statistics of the calibration folder, cached on disk."""
    name = cache / f"stats_{folder.name}_{'fisher' if fisher else 'act'}.npz"
    seconds_file = name.with_suffix(".seconds")  # stats files leave timings out to keep their bytes reproducible
    if name.exists():
        stats = Statistics.load(name)
        stats.meta["seconds"] = float(seconds_file.read_text()) if seconds_file.exists() else None
        timings[name.stem] = stats.meta["seconds"]
        return stats
    start = time.perf_counter()
    stats = onnx_fwlr.calibrate(model_path, str(folder), fisher=fisher, output=OUTPUT if fisher else None,
                                progress=True) if fisher else onnx_fwlr.calibrate(model_path, str(folder), progress=True)
    stats.meta["seconds"] = time.perf_counter() - start
    timings[name.stem] = stats.meta["seconds"]
    stats.save(name)
    seconds_file.write_text(f"{stats.meta['seconds']:.3f}")
    return stats


# ------------------------------------------------------------------ parts

def method_grid(model_path, stats, methods, ratios, reference, evaluation):
    rows, prepared_by_method = [], {}
    for method in methods:
        start = time.perf_counter()
        prepared = prepare(model_path, method=method, stats=stats, progress=False)
        decompose_seconds = time.perf_counter() - start
        prepared_by_method[method] = prepared
        for allocation in ("uniform", "global") if method in GRADIENT_METHODS else ("uniform",):
            for ratio in ratios:
                start = time.perf_counter()
                budget = Budget(ratio=ratio)
                model, report = build(prepared, choose_ranks(prepared, budget, allocation), allocation, budget,
                                      bias_correction=method != "svd")
                row = {"method": method, "allocation": allocation, "ratio": ratio,
                       "params_kept": report.site_params_after / report.site_params_before,
                       "decompose_s": decompose_seconds, "build_s": time.perf_counter() - start}
                row.update(quality(reference, embed(model, evaluation)))
                rows.append(row)
                print(f"  {method:6s} {allocation:7s} {ratio:.1f}  mean cosine {row['mean_cosine']:.4f}", flush=True)
    return rows, prepared_by_method


def sequential_rows(prepared, allocation, ratios, folder, reference, evaluation, models: dict):
    rows = []
    for ratio in ratios:
        budget = Budget(ratio=ratio)
        ranks = choose_ranks(prepared, budget, allocation)
        corrected = correct_sequentially(prepared, ranks, str(folder), True, progress=True)
        model, _ = build(prepared, ranks, allocation, budget, True, corrected=corrected)
        models[ratio] = model
        row = {"method": prepared.method, "allocation": allocation + "+sequential", "ratio": ratio,
               "sequential_s": corrected.seconds}
        row.update(quality(reference, embed(model, evaluation)))
        rows.append(row)
        print(f"  sequential {ratio:.1f}  mean cosine {row['mean_cosine']:.4f} ({corrected.seconds:.0f} s)", flush=True)
    return rows


def latency_rows(model_path, prepared, allocation, ratios, work: Path):
    from onnx_fwlr.cost.profiling import profile_model

    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 20000, size=(32, 128)).astype(np.int64),
            "attention_mask": np.ones((32, 128), np.int64), "token_type_ids": np.zeros((32, 128), np.int64)}
    base = profile_model(model_path, feed, runs=20, warmup=3, threads=2, op_profile=False)
    rows = []
    for ratio in ratios:
        budget = Budget(ratio=ratio)
        model, _ = build(prepared, choose_ranks(prepared, budget, allocation), allocation, budget, True)
        path = work / f"latency_{ratio}.onnx"
        onnx_fwlr.save_model(model, path)
        result = profile_model(path, feed, runs=20, warmup=3, threads=2, op_profile=False)
        rows.append({"ratio": ratio, "latency_ms": result["latency_50_percentile"],
                     "latency_ratio": result["latency_50_percentile"] / base["latency_50_percentile"],
                     "flop_ratio": result["matmul_flops"] / base["matmul_flops"],
                     "original_latency_ms": base["latency_50_percentile"]})
        path.unlink()
    return rows


def curve_rows(model_path, method, allocation, ratio, sizes, calib_npz, cache, reference, evaluation):
    rows = []
    for size in sizes:
        folder = bucketed(calib_npz, cache, size)
        stats = statistics(model_path, folder, cache, True, {})
        prepared = prepare(model_path, method=method, stats=stats, progress=False)
        budget = Budget(ratio=ratio)
        model, _ = build(prepared, choose_ranks(prepared, budget, allocation), allocation, budget, True)
        row = {"calib_sentences": size, "seconds": stats.meta.get("seconds")}
        row.update(quality(reference, embed(model, evaluation)))
        rows.append(row)
        print(f"  {size:5d} sentences  mean cosine {row['mean_cosine']:.4f}", flush=True)
    return rows


def refine_rows(model_path, prepared, allocation, ratio, folder, steps, lr, reference, evaluation, start_model=None):
    """Distillation of the best start at this ratio (the sequential result when there is one)."""
    from onnx_fwlr.refine.loop import refine

    budget = Budget(ratio=ratio)
    label = allocation + ("+sequential" if start_model is not None else "") + "+refine"
    if start_model is None:
        start_model, _ = build(prepared, choose_ranks(prepared, budget, allocation), allocation, budget, True)
    start = time.perf_counter()
    refined, result = refine(model_path, start_model, str(folder), steps=steps, lr=lr, output=OUTPUT, progress=True)
    row = {"method": prepared.method, "allocation": label, "ratio": ratio, "steps": steps, "lr": lr,
           "refine_s": time.perf_counter() - start, "best_step": result.best_step, "stopped": result.stopped,
           "curve": result.curve}
    row.update(quality(reference, embed(refined, evaluation)))
    print(f"  refine {ratio:.1f}  mean cosine {row['mean_cosine']:.4f} ({row['refine_s']:.0f} s)", flush=True)
    return [row]


def ecosystem_rows(model_path, prepared, allocation, ratio, work: Path, reference, evaluation):
    """Dynamic int8 quantisation and ONNX Runtime's BERT fusion on the original and compressed models."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        import sympy  # noqa: F401  (ONNX Runtime's BERT fusion needs its symbolic shape inference)
    except ImportError:
        sys.exit("--ecosystem needs sympy for onnxruntime.transformers: pip install sympy")

    budget = Budget(ratio=ratio)
    model, _ = build(prepared, choose_ranks(prepared, budget, allocation), allocation, budget, True)
    compressed = work / "compressed.onnx"
    onnx_fwlr.save_model(model, compressed)
    paths = {"original": Path(model_path), "compressed": compressed}
    rows = []
    for name in ("original", "compressed"):
        quantised = work / f"{name}.int8.onnx"
        quantize_dynamic(str(paths[name]), str(quantised), weight_type=QuantType.QInt8)
        for label, path in ((name, paths[name]), (name + "+int8", quantised)):
            row = {"model": label, "size_bytes": path.stat().st_size}
            row.update(quality(reference, embed(path, evaluation)))
            rows.append(row)
    fusion = []
    for keep_attention in (False, True):
        prepared_k = prepare(model_path, method=prepared.method, stats=prepared.stats, keep_attention=keep_attention,
                             progress=False)
        model_k, _ = build(prepared_k, choose_ranks(prepared_k, budget, allocation), allocation, budget, True)
        onnx_fwlr.save_model(model_k, work / "k.onnx")
        for label, path in (("original", paths["original"]),
                            ("compressed" + (" --keep-attention" if keep_attention else ""), work / "k.onnx")):
            if label == "original" and keep_attention:
                continue
            # opt_level 0: the Python fusions only (levels >= 1 first run ONNX Runtime's optimiser, which
            # imports torch in onnxruntime 1.32).
            optimised = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
            counts = optimised.get_fused_operator_statistics()
            optimised_path = work / "opt.onnx"
            optimised.save_model_to_file(str(optimised_path))
            start = time.perf_counter()
            embedding = embed(optimised_path, evaluation)
            fusion.append({"model": label, "Attention": counts.get("Attention", 0),
                           "SkipLayerNormalization": counts.get("SkipLayerNormalization", 0),
                           "BiasGelu": counts.get("BiasGelu", 0), "Gelu": counts.get("Gelu", 0),
                           "eval_inference_s": time.perf_counter() - start,
                           "cosine": quality(reference, embedding)["mean_cosine"]})
    return rows, fusion


# ------------------------------------------------------------------ main

def main() -> int:
    args = parse_args()
    assets = Path(args.cache) / "minilm"
    model_path = assets / "minilm.onnx"
    if not model_path.exists():
        print(f"{model_path} not found; run `python tools/export_minilm.py` first.", file=sys.stderr)
        return 2
    work = assets / "bench"
    work.mkdir(exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    evaluation = dict(np.load(assets / "eval.npz"))
    calib_npz = assets / "calib.npz"
    folder = bucketed(calib_npz, work, args.calib_size)
    results = {"calib_sentences": args.calib_size, "eval_sentences": len(evaluation["input_ids"]), "timings": {}}
    timings = results["timings"]

    def save():  # after every part, so a failure late in a long run keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    reference = embed(model_path, evaluation)
    timings["plain_inference_calib_s"] = inference_seconds(model_path, folder)
    need_fisher = any(m in GRADIENT_METHODS for m in methods)
    stats = statistics(model_path, folder, work, need_fisher, timings)
    if need_fisher:
        activation_only = statistics(model_path, folder, work, False, timings)
        del activation_only
    print(f"plain inference over calibration data {timings['plain_inference_calib_s']:.1f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k.startswith("stats_") and v), flush=True)

    print("method grid:", flush=True)
    grid, prepared_by_method = method_grid(model_path, stats, methods, ratios, reference, evaluation)
    results["grid"] = grid
    save()
    best = max((r for r in grid if r["ratio"] == 0.5) or grid, key=lambda r: r["mean_cosine"])
    best_prepared, best_allocation = prepared_by_method[best["method"]], best["allocation"]
    results["best"] = {"method": best["method"], "allocation": best_allocation}
    print(f"best closed-form configuration at 0.5: {best['method']} {best_allocation}", flush=True)

    sequential_models = {}
    if args.sequential:
        seq_folder = bucketed(calib_npz, work, min(args.sequential_size, args.calib_size))
        results["sequential"] = sequential_rows(best_prepared, best_allocation,
                                                [float(r) for r in args.sequential_ratios.split(",") if r],
                                                seq_folder, reference, evaluation, sequential_models)
        save()
    if args.refine:  # from the closed-form start, and from the sequential one when there is one
        results["refine"] = []
        for start_model in [None] + ([sequential_models[0.5]] if 0.5 in sequential_models else []):
            results["refine"] += refine_rows(model_path, best_prepared, best_allocation, 0.5, folder, args.refine,
                                             args.refine_lr, reference, evaluation, start_model)
            save()
    if args.latency:
        results["latency"] = latency_rows(model_path, best_prepared, best_allocation, ratios, work)
        save()
    if args.curve:
        sizes = [int(s) for s in args.curve.split(",") if s]
        results["curve"] = curve_rows(model_path, best["method"], best_allocation, 0.5, sizes, calib_npz, work,
                                      reference, evaluation)
        save()
    if args.ecosystem:
        with tempfile.TemporaryDirectory() as tmp:
            results["quantised"], results["fusion"] = ecosystem_rows(model_path, best_prepared, best_allocation,
                                                                     0.5, Path(tmp), reference, evaluation)

    print_tables(results, ratios)
    save()
    if args.json:
        print(f"wrote {args.json}")
    return 0


def print_tables(results: dict, ratios: list[float]) -> None:
    rows = {}
    for r in results["grid"] + results.get("sequential", []) + results.get("refine", []):
        rows.setdefault((r["method"], r["allocation"]), {})[r["ratio"]] = r
    table = [[m, a] + [f"{cells[x]['mean_cosine']:.3f} / {cells[x]['spearman']:.3f} / {cells[x]['nn_agreement']:.2f}"
                       if x in cells else "" for x in ratios] for (m, a), cells in rows.items()]
    print("\nmean cosine / Spearman of pairwise similarities / top-1 neighbour agreement "
          f"({results['eval_sentences']} held-out sentences, {results['calib_sentences']} calibration sentences)")
    print(format_table(["method", "allocation"] + [f"ratio {x}" for x in ratios], table))
    if "latency" in results:
        print("\nlatency, batch 32 x seq 128, 2 threads (best configuration)")
        print(format_table(["ratio", "p50 ms", "latency ratio", "FLOP ratio"],
                           [[r["ratio"], f"{r['latency_ms']:.1f}", f"{r['latency_ratio']:.3f}", f"{r['flop_ratio']:.3f}"]
                            for r in results["latency"]]))
    if "curve" in results:
        print("\nquality against calibration-set size (best configuration, ratio 0.5)")
        print(format_table(["sentences", "mean cosine", "Spearman", "calibration s"],
                           [[r["calib_sentences"], f"{r['mean_cosine']:.4f}", f"{r['spearman']:.4f}",
                             f"{r['seconds']:.0f}" if r["seconds"] else ""] for r in results["curve"]]))
    if "quantised" in results:
        print("\ndynamic int8 quantisation (ratio 0.5)")
        print(format_table(["model", "size bytes", "mean cosine"],
                           [[r["model"], f"{r['size_bytes']:,}", f"{r['mean_cosine']:.4f}"] for r in results["quantised"]]))
        print("\nONNX Runtime BERT fusion (optimize_model, model_type=bert)")
        print(format_table(["model", "Attention", "SkipLayerNorm", "BiasGelu", "mean cosine", "512 sentences s"],
                           [[r["model"], r["Attention"], r["SkipLayerNormalization"], r["BiasGelu"], f"{r['cosine']:.4f}",
                             f"{r['eval_inference_s']:.2f}"] for r in results["fusion"]]))
    t = results["timings"]
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if v))


if __name__ == "__main__":
    sys.exit(main())
