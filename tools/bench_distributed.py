"""Wall time of calibration + decomposition: the local pool against Ray tasks, and Ray's start-up.

    python tools/bench_distributed.py [--models digits minilm] [--samples 512] [--json FILE]
    python tools/bench_distributed.py --models decoder smollm2 --samples 8 --per-group 1MB   # per-group units

Every configuration runs in a fresh child process (Ray's start-up and memory are then its own): `compress`
(whiten, ratio 0.5, exact SVDs) with the local pool at 1 and 2 workers, local calibration in 2 shards, and a
fresh local Ray cluster of 1 CPU (1 shard) and 2 CPUs (2 shards). Columns: Ray's start-up (ray.init), the
calibration and decomposition stages (the report's timings), the whole compress() call, and the output's
sha256 (equal for equal shard counts). MiniLM is tools/export_minilm.py's export in /work/cache/minilm, its
calibration set cut to --samples sentences. State the machine's load (printed) next to the numbers.

`--per-group SIZE` measures the per-group unit instead (kfac, ratio 0.8, `stats_memory` SIZE, so the statistics
come in groups): locally one pass set aside on disk and folded group by group; on Ray each group's pass and
its decompositions are one task (1 and 2 CPUs). The decoder is the shipped sample decoder, smollm2
/work/cache/smollm2 (tools/export_smollm2.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {
    "digits": (ROOT / "sample_models" / "digits_mlp.onnx", ROOT / "sample_models" / "digits_calib.npz"),
    "minilm": (Path("/work/cache/minilm/minilm.onnx"), Path("/work/cache/minilm/calib.npz")),
    "decoder": (ROOT / "sample_models" / "decoder" / "decoder.onnx", ROOT / "sample_models" / "decoder" / "calib.npz"),
    "smollm2": (Path("/work/cache/smollm2/model.onnx"), Path("/work/cache/smollm2/calib.npz")),
}
CONFIGS = [  # (label, executor, workers or Ray CPUs, calibration shards)
    ("local pool, 1 worker", "local", 1, 1),
    ("local pool, 2 workers", "local", 2, 1),
    ("local, 2 shards", "local", 1, 2),
    ("ray, 1 CPU, 1 shard", "ray", 1, 1),
    ("ray, 2 CPUs, 2 shards", "ray", 2, 2),
]
GROUP_CONFIGS = [  # --per-group: (label, executor, Ray CPUs, shards)
    ("local, one pass in memory", "local", 0, 1),  # 0: no stats_memory (every Gram at once), the reference
    ("local, groups from one pass", "local", 1, 1),
    ("ray, 1 CPU, group tasks", "ray", 1, 1),
    ("ray, 2 CPUs, group tasks", "ray", 2, 1),
]


def child(spec: dict) -> dict:
    """One configuration, measured in this process."""
    from onnx_fwlr.pipeline.compress import compress
    from onnx_fwlr.pipeline.distributed import Executor

    result = {"ray_start_s": None}
    if spec["executor"] == "ray":
        import ray

        start = time.perf_counter()
        ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 << 20, logging_level="error")
        result["ray_start_s"] = time.perf_counter() - start
    executor = Executor(spec["executor"], None, spec["shards"])
    start = time.perf_counter()
    if spec.get("stats_memory"):  # per-group units (kfac: gradient statistics in groups)
        limit = spec["stats_memory"] if spec["cpus"] else 1 << 40
        model, report = compress(spec["model"], ratio=0.8, method="kfac", calibration=spec["calib"],
                                 stats_memory=limit, executor=executor, progress=False)
        result["groups"] = report.calibration.get("groups")
    else:
        model, report = compress(spec["model"], ratio=0.5, method="whiten", calibration=spec["calib"], svd="exact",
                                 workers=spec["cpus"] if spec["executor"] == "local" else 1, executor=executor,
                                 progress=False)
    result["compress_s"] = time.perf_counter() - start
    result["calibrate_s"] = report.timings.get("calibrate")
    result["decompose_s"] = report.timings.get("decompose")
    result["sites"] = report.factorised
    result["sha256"] = hashlib.sha256(model.SerializeToString()).hexdigest()[:12]
    return result


def parse_size(text: str) -> int:
    from onnx_fwlr.cli.options import parse_size as cli_size

    return cli_size(text)


def calibration_subset(path: Path, samples: int, folder: str) -> str:
    data = np.load(path)
    out = Path(folder) / f"{path.stem}_{samples}.npz"
    np.savez(out, **{k: v[:samples] for k, v in data.items()})
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "minilm"], choices=sorted(MODELS))
    parser.add_argument("--samples", type=int, default=512, help="calibration samples (default 512)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--per-group", metavar="SIZE", help="per-group units at this stats_memory (e.g. 1MB, 200MB)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'model':8} {'configuration':28} {'ray start':>9} {'calibrate':>9} {'decompose':>9} {'compress':>9}  "
          "output")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model, calib = MODELS[name]
            if not model.exists():
                print(f"{name}: {model} is missing; skipped")
                continue
            calib = calibration_subset(calib, args.samples, folder)
            for label, executor, cpus, shards in (GROUP_CONFIGS if args.per_group else CONFIGS):
                spec = {"model": str(model), "calib": calib, "executor": executor, "cpus": cpus, "shards": shards,
                        "stats_memory": parse_size(args.per_group) if args.per_group else None}
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
                if done.returncode:
                    raise SystemExit(f"{name} / {label} failed:\n{done.stderr[-2000:]}")
                row = dict(json.loads(done.stdout.strip().splitlines()[-1]), model=name, configuration=label,
                           load=os.getloadavg()[0])
                rows.append(row)
                ray_start = "-" if row["ray_start_s"] is None else f"{row['ray_start_s']:.1f} s"
                print(f"{name:8} {label:28} {ray_start:>9} {row['calibrate_s']:>7.2f} s {row['decompose_s']:>7.2f} s "
                      f"{row['compress_s']:>7.2f} s  {row['sha256']} (load {row['load']:.1f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
