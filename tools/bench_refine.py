"""Speed and memory of `refine` on a transformer-shaped model: steps per second and peak RSS per batch size.

Each batch size runs in a fresh process, so its peak RSS (resource.getrusage) is its own.

    python tools/bench_refine.py                                  # hidden 64, 2 layers, batch sizes 8 and 32
    python tools/bench_refine.py --hidden 128 --ffn 512 --seq 64 --batch-sizes 8,16 --json /tmp/refine.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def worker(args) -> dict:
    """One measurement in this process: compress with svd, then refine for a fixed number of steps."""
    import onnx
    from synthetic_transformer import build_transformer, make_token_batch

    from onnx_fwlr import compress
    from onnx_fwlr.refine.loop import refine

    original = build_transformer(args.hidden, args.layers, args.heads, args.ffn, args.vocab, max_len=args.seq)
    compressed, _ = compress(original, ratio=args.ratio, method="svd", progress=False)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "calib.npz"
        np.savez(data, **make_token_batch(args.samples, args.seq, args.vocab, seed=0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _, report = refine(original, compressed, str(data), steps=args.steps, lr=1e-5, batch_size=args.worker,
                           eval_every=args.steps, patience=args.steps, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"batch_size": args.worker, "steps": report.steps, "steps_per_s": report.steps / report.step_seconds,
            "ms_per_step": 1e3 * report.step_seconds / report.steps, "total_s": report.seconds,
            "trainable_params": report.trainable_params, "model_params": sum(
                int(np.prod(t.dims)) for t in onnx.ModelProto.FromString(compressed.SerializeToString()).graph.initializer),
            "peak_rss_mib": peak / 1024, "rss_before_refine_mib": before / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=32, help="tokens per sample")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--ratio", type=float, default=0.5, help="svd parameter ratio of the compressed model")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--blas-threads", type=int,
                        help="OPENBLAS_NUM_THREADS/OMP_NUM_THREADS for the workers (default: the environment's)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    passed = _without_json(sys.argv[1:])
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        env = dict(os.environ)
        if args.blas_threads:
            env.update(OPENBLAS_NUM_THREADS=str(args.blas_threads), OMP_NUM_THREADS=str(args.blas_threads))
        result = subprocess.run([sys.executable, __file__, *passed, "--worker", str(batch_size)],
                                capture_output=True, text=True, env=env)
        if result.returncode:
            sys.exit(f"batch size {batch_size} failed:\n{result.stderr}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"synthetic transformer hidden={args.hidden} layers={args.layers} ffn={args.ffn} seq={args.seq}, "
          f"svd ratio {args.ratio}, {args.steps} steps, BLAS threads {args.blas_threads or 'default'}")
    print(f"{'batch':>6} {'steps/s':>9} {'ms/step':>9} {'trainable':>10} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['steps_per_s']:>9.2f} {r['ms_per_step']:>9.1f} {r['trainable_params']:>10,} "
              f"{r['peak_rss_mib']:>13.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


def _without_json(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--json":
            skip = True
            continue
        if a.startswith("--json="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
