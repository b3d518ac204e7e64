"""Benchmark on a small LLaMA-architecture decoder: perplexity, KL and top-1 agreement after compression.

    python tools/export_decoder.py           # once: model (with KV cache), calibration and held-out text
    python tools/bench_decoder.py --json .cache/decoder/bench.json

At 0.9 / 0.8 / 0.6 of the linear-layer parameters (all 29 MatMul weights, lm_head included), for svd,
whiten (SVD-LLM's whitening), kfac with global allocation under the language-model loss (`--loss lm`),
then + --sequential and + --refine: perplexity ratio (compressed / original), mean next-token KL
divergence and top-1 agreement on the held-out rows, compress time and the compress process's peak RSS.
Each compression runs in a child process (its own VmHWM); the Fisher statistics are computed once and
shared (their time is reported apart). Last, the kfac model's factors are applied to the with-past and
merged models (pipeline.transplant) and greedy decoding with the KV cache is checked against the no-cache path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # BLAS threads next to ORT's slow this 2-core machine down

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from onnx_fwlr.evaluate.language import greedy_check, validate_language

RATIOS = (0.9, 0.8, 0.6)
CONFIGS = {
    "svd": dict(method="svd", allocation="uniform"),
    "whiten": dict(method="whiten", allocation="uniform"),
    "kfac+global": dict(method="kfac", allocation="global"),
    "+sequential": dict(method="kfac", allocation="global", sequential=True),
    "+refine": dict(method="kfac", allocation="global", refine=True),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".cache" / "decoder",
                        help="folder written by tools/export_decoder.py (default .cache/decoder)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated ratios")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations")
    parser.add_argument("--calib-rows", type=int, default=128, help="calibration rows used (default 128)")
    parser.add_argument("--refine-steps", type=int, default=30, help="Adam steps of +refine (default 30)")
    parser.add_argument("--refine-lr", type=float, default=1e-4, help="peak learning rate of +refine (default 1e-4)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def slug(config: str) -> str:
    return config.replace("+", "_").strip("_")


def vm_hwm_mib() -> float:
    """Peak resident memory of this process (VmHWM, reset by exec: the child's own)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> None:
    """Compress once and print the time and peak RSS as JSON (run in a fresh process)."""
    from onnx_fwlr import compress, save_model

    start = time.perf_counter()
    options = dict(ratio=spec["ratio"], method=spec["method"], allocation=spec["allocation"], stats=spec.get("stats"),
                   fisher_options={"loss": "lm"}, progress=False, batch_size=16)
    if spec.get("sequential") or spec.get("refine"):
        options["calibration"] = spec["calib"]
    if spec.get("sequential"):
        options["sequential"] = True
    if spec.get("refine"):
        options.update(refine_steps=spec["refine_steps"], refine_lr=spec["refine_lr"])
    model, report = compress(spec["model"], **options)
    save_model(model, spec["out"])
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": vm_hwm_mib(),
                      "factorised": report.factorised}))


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def calibrate_once(model: Path, calib: Path, out: Path) -> float:
    from onnx_fwlr import calibrate

    start = time.perf_counter()
    stats = calibrate(str(model), str(calib), fisher=True, loss="lm", batch_size=16,
                      progress=False)
    stats.save(str(out))
    return time.perf_counter() - start


def cache_check(folder: Path, original: Path, compressed: Path, prompt: np.ndarray) -> dict:
    """The compressed model's factors in the with-past and merged models; cached greedy decoding against full."""
    from onnx_fwlr.api import apply_same_factors

    with_past, replaced = apply_same_factors(folder / "decoder_with_past.onnx", original, compressed)
    merged, _ = apply_same_factors(folder / "decoder_merged.onnx", original, compressed)
    import onnx

    no_cache = onnx.load(str(compressed))
    two = greedy_check(with_past, prompt, steps=16, no_cache=no_cache)
    one = greedy_check(merged, prompt, steps=16)
    return {"weights_shared": len(replaced), "with_past_matches": two.matches, "merged_matches": one.matches,
            "max_logit_diff": max(two.max_logit_diff, one.max_logit_diff),
            "merged_vs_two_models_same_tokens": bool(np.array_equal(one.cached, two.cached))}


def table(rows: list[dict]) -> str:
    header = f"{'config':<13}{'ratio':>6}{'ppl ratio':>11}{'KL nats':>11}{'top-1':>8}{'time s':>8}{'peak MiB':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['config']:<13}{r['ratio']:>6.2f}{r['perplexity_ratio']:>11.4f}{r['kl_divergence']:>11.2e}"
                     f"{100 * r['top1_agreement']:>7.1f}%{r['seconds']:>8.1f}{r['peak_rss_mib']:>10.0f}")
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    folder = args.dir.resolve()
    model, evaluation = folder / "decoder.onnx", folder / "eval.npz"
    if not model.exists():
        sys.exit(f"ERROR: {model} not found; run python tools/export_decoder.py first.")
    work = Path(tempfile.mkdtemp(prefix="bench_decoder_"))
    calib = work / "calib.npz"
    with np.load(folder / "calib.npz") as data:
        np.savez(calib, **{k: data[k][:args.calib_rows] for k in data.files})
    stats = work / "stats.npz"
    calib_seconds = calibrate_once(model, calib, stats)
    print(f"Fisher statistics (--loss lm, {args.calib_rows} rows): {calib_seconds:.1f} s")
    rows = []
    for name in args.configs.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            out = work / f"{slug(name)}_{ratio}.onnx"
            spec = dict(CONFIGS[name], ratio=ratio, model=str(model), out=str(out), calib=str(calib),
                        refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                        stats=str(stats) if CONFIGS[name]["method"] != "svd" else None)
            measured = run_child(spec)
            metrics = validate_language(model, out, evaluation, batch_size=16, progress=False)
            rows.append(dict(config=name, ratio=ratio, **measured, **metrics.to_dict()))
            print(f"  {name} {ratio}: ppl ratio {metrics.perplexity_ratio:.4f}, KL {metrics.kl_divergence:.2e}, "
                  f"top-1 {100 * metrics.top1_agreement:.1f} %, {measured['seconds']:.1f} s", flush=True)
    print(f"\noriginal perplexity on {rows[0]['tokens']} held-out positions: {rows[0]['original_perplexity']:.3f}")
    print(table(rows))
    with np.load(evaluation) as data:
        prompt = data["input_ids"][:4, :8]
    kfac = next((work / f"{slug(r['config'])}_{r['ratio']}.onnx" for r in rows if r["config"] == "kfac+global"), None)
    check = cache_check(folder, model, kfac, prompt) if kfac is not None else None
    if check:
        print(f"KV cache with the kfac+global factors ({check['weights_shared']} weights shared): with-past "
              f"{'matches' if check['with_past_matches'] else 'DIFFERS'}, merged "
              f"{'matches' if check['merged_matches'] else 'DIFFERS'} (max logit diff {check['max_logit_diff']:.2e})")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration_seconds": calib_seconds, "calib_rows": args.calib_rows,
                                               "rows": rows, "cache_check": check}, indent=1) + "\n")


if __name__ == "__main__":
    main()
