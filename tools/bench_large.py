"""Benchmark of compressing a large transformer-shaped model: time and peak memory per configuration.

Builds (once, into --workdir) a BERT-style encoder with tools/synthetic_transformer.py, hidden 2048 and
8 layers by default (about 0.4 B parameters in its MatMul weights), saved with external data. Then, for
`svd` and `whiten`, exact vs randomised SVD, 1 vs 2 workers, it runs `onnx_fwlr.compress` in a fresh
process each and reports calibration, decomposition and total time and the process's peak RSS.

    python tools/bench_large.py --json bench_large.json
    python tools/bench_large.py --hidden 1024 --layers 2     # a quicker, smaller run
    python tools/bench_large.py --methods whiten --stats-memory 1024   # Grams measured in groups of ≤ 1 GiB
"""

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build(workdir: Path, hidden: int, layers: int, seq: int, samples: int) -> tuple[Path, Path, int]:
    """The model (external data) and a tiny calibration .npz; reused when already in workdir."""
    from synthetic_transformer import build_transformer, make_token_batch

    from onnx_fwlr.io.model import save_model

    tag = f"h{hidden}_l{layers}"
    model_path, calib_path = workdir / f"bert_{tag}.onnx", workdir / f"calib_{tag}_{samples}x{seq}.npz"
    if not model_path.exists():
        model = build_transformer(hidden=hidden, layers=layers, heads=max(1, hidden // 64), ffn=4 * hidden,
                                  vocab=1000, max_len=max(seq, 16))
        save_model(model, model_path, external_data=True)
        del model
    if not calib_path.exists():
        np.savez(calib_path, **make_token_batch(samples, seq, 1000, seed=1))
    matmul_params = layers * (4 * hidden * hidden + 2 * hidden * 4 * hidden)
    return model_path, calib_path, matmul_params


def own_peak_rss_mb() -> float:
    """This process's peak RSS. Linux carries ru_maxrss across fork+exec, so a child started by a parent that
    had just built a 1.6 GB model reported the parent's peak (6.3 GB); VmHWM belongs to this process only."""
    return _vmhwm_mb(Path("/proc/self/status")) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ChildPeaks:
    """The largest VmHWM of this process's children (the decomposition workers), polled twice a second.

    RUSAGE_CHILDREN's ru_maxrss cannot be used: a worker spawned after this process's peak inherits that
    peak in ru_maxrss (whiten's workers reported the parent's 9.6 GB). VmHWM is reset by exec."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.5):
            for pid in self._children():
                self.peak_mb = max(self.peak_mb, _vmhwm_mb(Path(f"/proc/{pid}/status")))

    @staticmethod
    def _children() -> list[str]:
        try:
            return [pid for task in Path("/proc/self/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        except OSError:
            return []

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def _vmhwm_mb(status: Path) -> float:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def child(config: dict) -> dict:
    """One compress run in this process; prints its measurements as JSON."""
    from onnx_fwlr import compress

    children = ChildPeaks()
    start = time.perf_counter()
    _, report = compress(config["model"], ratio=config["ratio"], method=config["method"],
                         calibration=config["calib"] if config["method"] != "svd" else None,
                         batch_size=config["batch_size"], svd=config["svd"], workers=config["workers"],
                         stats_memory=config.get("stats_memory"), progress=False)
    total = time.perf_counter() - start
    return {
        "calibrate_s": report.timings.get("calibrate", 0.0),
        "decompose_s": report.timings.get("decompose", 0.0),
        "total_s": total,
        "peak_rss_mb": own_peak_rss_mb(),
        "worker_peak_rss_mb": children.stop(),
        "mean_rel_error": float(np.mean([s.relative_error for s in report.sites if s.relative_error is not None])),
        "calibration_passes": report.calibration.get("passes", 1) if report.calibration else 0,
    }


def run_config(config: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run {config} failed:\n{done.stderr[-3000:]}")
    return {**config, **json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    headers = ["method", "svd", "workers", "passes", "calibrate s", "decompose s", "total s", "peak RSS MB",
               "worker RSS MB", "mean rel. err"]
    lines = [[r["method"], r["svd"], str(r["workers"]), str(r.get("calibration_passes", "")),
              f"{r['calibrate_s']:.1f}", f"{r['decompose_s']:.1f}",
              f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['worker_peak_rss_mb']:.0f}",
              f"{r['mean_rel_error']:.4f}"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32, help="calibration sequence length (default 32)")
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences (default 4: keep it tiny)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--methods", default="svd,whiten")
    parser.add_argument("--svd", default="exact,randomized", help="comma-separated SVD choices to compare")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    parser.add_argument("--stats-memory", type=float, metavar="MB",
                        help="compress(stats_memory=...): Grams over this many MB are measured in several passes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnx_fwlr_bench_large"))
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, calib, params = build(args.workdir, args.hidden, args.layers, args.seq, args.samples)
    print(f"model {model} ({params / 1e9:.3f} B MatMul parameters), built/loaded in "
          f"{time.perf_counter() - start:.0f} s; calibration {args.samples} x {args.seq} tokens", file=sys.stderr)
    rows = []
    for method in args.methods.split(","):
        for svd in args.svd.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                config = {"model": str(model), "calib": str(calib), "method": method, "svd": svd, "workers": workers,
                          "ratio": args.ratio, "batch_size": args.samples,
                          "stats_memory": int(args.stats_memory * 2**20) if args.stats_memory else None}
                rows.append(run_config(config))
                print(f"done {method} {svd} workers={workers}: {rows[-1]['total_s']:.1f} s", file=sys.stderr)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"hidden": args.hidden, "layers": args.layers,
                                               "matmul_params": params, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
