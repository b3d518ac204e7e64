"""Wall time of calibration + decomposition: the local pool against Ray tasks, and Ray's start-up.

    python tools/bench_distributed.py [--models digits minilm] [--samples 512] [--json FILE]
    python tools/bench_distributed.py --models decoder --samples 64 --per-group 1MB          # per-group units
    python tools/bench_distributed.py --models llama1b --samples 8 --per-group 830MB \\
        --include 'layers\\.0\\.' --max-tree-gb 12 --json llama1b.json                        # the 1.1 B model

Every configuration runs in a fresh child process (Ray's start-up and memory are then its own): `compress`
(whiten, ratio 0.5, exact SVDs) with the local pool at 1 and 2 workers, local calibration in 2 shards, and a
fresh local Ray cluster of 1 CPU (1 shard) and 2 CPUs (2 shards). Columns: Ray's start-up (ray.init of a fresh
local cluster), the calibration and decomposition stages (the report's timings), the whole compress() call,
the CPU seconds and peak memory of the child's process tree (the child, and on Ray the cluster's processes it
started) twice: "tree RSS", resident pages summed over the processes (a memory-mapped model and Ray's object
store count once per process that maps them), and "anon+shm", each process's anonymous pages plus the
largest shared-memory share once (what the tree takes from memory, page cache aside; `--max-tree-gb` stops
on it), and the output's sha256 (equal for equal shard counts). MiniLM is tools/export_minilm.py's export in /work/cache/minilm, its calibration
set cut to --samples sentences. State the machine's load (printed) next to the numbers.

`--per-group SIZE` measures the per-group unit instead (kfac, ratio 0.8, `stats_memory` SIZE, so the
statistics come in groups): locally one Fisher pass set aside on disk and folded group by group, with the
decompositions in 1 or 2 local processes; on Ray (1 and 2 CPUs) one task records the pass in a temporary file
and each group task folds its group's sums from it and decomposes the group (`--ray-shared-dir`: the folder
of that file; default the temporary folder). The "passes" column counts Fisher passes over the data. The decoder is the shipped sample decoder, smollm2 /work/cache/smollm2 (tools/export_smollm2.py),
llama1b the random 1.1 B LLaMA shape in /work/cache/llama1b (tools/make_random_llama.py --preset 1b).
`--include REGEX` decomposes only the sites it names (the passes still run through the whole model);
`--configs` picks configurations by key. A child whose process tree grows past `--max-tree-gb` or runs past
`--timeout` is stopped and its row says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
MODELS = {
    "digits": (SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_calib.npz"),
    "minilm": (Path("/work/cache/minilm/minilm.onnx"), Path("/work/cache/minilm/calib.npz")),
    "decoder": (SAMPLES / "decoder" / "decoder.onnx", SAMPLES / "decoder" / "calib.npz"),
    "smollm2": (Path("/work/cache/smollm2/model.onnx"), Path("/work/cache/smollm2/calib.npz")),
    "llama1b": (Path("/work/cache/llama1b/llama_1b.onnx"), Path("/work/cache/llama1b/calib8.npz")),
}
CONFIGS = {  # key: (label, executor, local workers or Ray CPUs, calibration shards)
    "local": ("local pool, 1 worker", "local", 1, 1),
    "local2": ("local pool, 2 workers", "local", 2, 1),
    "shards2": ("local, 2 shards", "local", 1, 2),
    "ray1": ("ray, 1 CPU, 1 shard", "ray", 1, 1),
    "ray2": ("ray, 2 CPUs, 2 shards", "ray", 2, 2),
}
GROUP_CONFIGS = {  # --per-group: (label, executor, local workers or Ray CPUs, shards); 0 workers: no stats_memory
    "memory": ("local, one pass in memory", "local", 0, 1),  # every Gram at once: the reference bytes
    "local": ("local, groups from one pass", "local", 1, 1),
    "local2": ("same, 2 decomposing workers", "local", 2, 1),
    "ray1": ("ray, 1 CPU, group tasks", "ray", 1, 1),
    "ray2": ("ray, 2 CPUs, group tasks", "ray", 2, 1),
}


def child(spec: dict) -> dict:
    """One configuration, measured in this process."""
    from onnx_fwlr.api import Executor, compress

    result = {"ray_start_s": None}
    if spec["executor"] == "ray":
        import ray

        start = time.perf_counter()
        ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False,
                 object_store_memory=spec["object_store"], logging_level="error")
        result["ray_start_s"] = time.perf_counter() - start
    executor = Executor(spec["executor"], None, spec["shards"], spec.get("shared_dir"))
    workers = spec["cpus"] if spec["executor"] == "local" else 1
    start = time.perf_counter()
    if spec.get("stats_memory") is not None:  # per-group units (kfac: gradient statistics in groups)
        limit = (spec["stats_memory"] or None) if spec["cpus"] else 1 << 40  # 0: the default (--per-group default)
        model, report = compress(spec["model"], ratio=0.8, method="kfac", calibration=spec["calib"],
                                 include=spec["include"], stats_memory=limit, workers=max(workers, 1),
                                 executor=executor, allocation=spec.get("allocation"), progress=False)
        result["groups"] = report.calibration.get("groups")
        result["passes"] = report.calibration.get("passes")
        result["set_aside_bytes"] = report.calibration.get("set_aside_bytes")
    else:
        model, report = compress(spec["model"], ratio=0.5, method="whiten", calibration=spec["calib"], svd="exact",
                                 include=spec["include"], workers=workers, executor=executor, progress=False)
    result["compress_s"] = time.perf_counter() - start
    result["calibrate_s"] = report.timings.get("calibrate")
    result["decompose_s"] = report.timings.get("decompose")
    result["sites"] = report.factorised
    result["sha256"] = model_digest(model)
    return result


def model_digest(model) -> str:
    """sha256 of the graph's nodes, tensors, inputs and outputs, one message at a time (a 1.1 B model is over
    protobuf's 2 GB); tensors left in the original's external file count by their reference to it."""
    digest = hashlib.sha256()
    for part in (*model.graph.node, *model.graph.initializer, *model.graph.input, *model.graph.output):
        digest.update(part.SerializeToString())
    return digest.hexdigest()[:12]


def tree_usage(root: int, cpu: dict) -> tuple[int, int]:
    """(resident bytes of `root` and every process below it, summed from /proc; the same without file pages and
    with shared memory counted once: each process's anonymous pages, plus the largest shared-memory share, Ray's
    object store, which every process that reads from it maps). The first counts a memory-mapped model and the
    object store once per process that maps them; the second is what the tree takes from the machine's memory,
    the page cache aside. `cpu` gets each process's CPU seconds so far (user + system), so that summed at the end
    it holds the tree's CPU time, whatever the machine's load."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(frontier)
    total = anonymous = shared = 0
    for pid in tree:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":" in line)
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            kib = {key: int(status.get(key, "0 kB").split()[0]) * 1024 for key in ("VmRSS", "RssAnon", "RssShmem")}
        except (OSError, ValueError, IndexError):
            continue
        total += kib["VmRSS"]
        anonymous += kib["RssAnon"]
        shared = max(shared, kib["RssShmem"])
    return total, anonymous + shared


def run_child(spec: dict, timeout: float, max_tree_bytes: float) -> tuple[dict | None, str]:
    """The child's result (None when it failed or was stopped, with why) and its peak tree RSS in the result."""
    process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    peak, own, stopped, cpu = [0], [0], [], {}

    def watch():
        start = time.monotonic()
        while process.poll() is None:
            total, anonymous = tree_usage(process.pid, cpu)
            peak[0], own[0] = max(peak[0], total), max(own[0], anonymous)
            if own[0] > max_tree_bytes or time.monotonic() - start > timeout:
                stopped.append(f"stopped: tree memory {own[0] / 2**30:.1f} GiB" if own[0] > max_tree_bytes
                               else f"stopped after {timeout:.0f} s")
                os.killpg(process.pid, signal.SIGKILL)  # the child's session: it and the Ray processes it started
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    before = set(Path(tempfile.gettempdir()).glob("onnx-fwlr-pass-*"))
    watcher.start()
    out, err = process.communicate()
    watcher.join()
    for left in set(Path(tempfile.gettempdir()).glob("onnx-fwlr-pass-*")) - before:
        left.unlink(missing_ok=True)  # a child stopped outright leaves its recorded pass (docs/distributed.md)
    if stopped or process.returncode:
        return None, (stopped[0] if stopped else f"failed:\n{err[-2000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]), peak_tree_mib=peak[0] / 2**20, peak_own_mib=own[0] / 2**20,
                tree_cpu_s=sum(cpu.values())), ""


def calibration_subset(path: Path, samples: int, folder: str) -> str:
    data = np.load(path)
    out = Path(folder) / f"{path.stem}_{samples}.npz"
    np.savez(out, **{k: v[:samples] for k, v in data.items()})
    return str(out)


def group_memory(text: str | None) -> int | None:
    """--per-group's bytes: None without it, 0 for "default" (compress's own default)."""
    from onnx_fwlr.api import parse_size

    if text is None:
        return None
    return 0 if text == "default" else parse_size(text)


def main() -> None:
    from onnx_fwlr.api import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "minilm"], choices=sorted(MODELS))
    parser.add_argument("--samples", type=int, default=512, help="calibration samples (default 512)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--per-group", metavar="SIZE",
                        help="per-group units at this stats_memory (e.g. 1MB, 200MB, or default: compress's own)")
    parser.add_argument("--include", metavar="REGEX", help="decompose only the sites whose weight name matches")
    parser.add_argument("--configs", nargs="+", metavar="KEY",
                        help=f"configurations to run (default all): {', '.join(CONFIGS)}; with --per-group "
                             f"{', '.join(GROUP_CONFIGS)}")
    parser.add_argument("--object-store", default="256MB", help="each Ray cluster's object store (default 256MB)")
    parser.add_argument("--allocation", choices=("global", "uniform"),
                        help="with --per-group: the rank allocation (default kfac's own, global); uniform knows "
                             "the ranks before the decompositions, so large models' group tasks hand theirs back "
                             "through a file instead of spilling them")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration (default 1800)")
    parser.add_argument("--max-tree-gb", type=float, default=12.0,
                        help="stop a configuration whose process tree's memory (anonymous pages, plus shared memory "
                             "once) passes this size (default 12)")
    parser.add_argument("--ray-shared-dir", metavar="DIR", help="where Ray's group tasks find the recorded pass")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    table = GROUP_CONFIGS if args.per_group else CONFIGS
    keys = args.configs or list(table)
    unknown = [key for key in keys if key not in table]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'model':8} {'configuration':28} {'ray start':>9} {'calibrate':>9} {'decompose':>9} {'compress':>9} "
          f"{'CPU':>7} {'groups':>6} {'passes':>6} {'tree RSS':>9} {'anon+shm':>9}  output")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model, calib = MODELS[name]
            if not model.exists():
                print(f"{name}: {model} is missing; skipped")
                continue
            calib = calibration_subset(calib, args.samples, folder)
            for key in keys:
                label, executor, cpus, shards = table[key]
                spec = {"model": str(model), "calib": calib, "executor": executor, "cpus": cpus, "shards": shards,
                        "include": args.include, "object_store": parse_size(args.object_store),
                        "stats_memory": group_memory(args.per_group), "allocation": args.allocation,
                        "shared_dir": args.ray_shared_dir if executor == "ray" else None}
                load = os.getloadavg()[0]
                row, why = run_child(spec, args.timeout, args.max_tree_gb * 2**30)
                if row is None:
                    print(f"{name:8} {label:28} {why}", flush=True)
                    rows.append({"model": name, "configuration": label, "key": key, "failed": why, "load": load})
                    continue
                row.update(model=name, configuration=label, key=key, samples=args.samples, include=args.include,
                           stats_memory=args.per_group, allocation=args.allocation or "default", load=load,
                           load_after=os.getloadavg()[0])
                rows.append(row)
                ray_start = "-" if row["ray_start_s"] is None else f"{row['ray_start_s']:.1f} s"
                print(f"{name:8} {label:28} {ray_start:>9} {row['calibrate_s']:>7.2f} s {row['decompose_s']:>7.2f} s "
                      f"{row['compress_s']:>7.2f} s {row['tree_cpu_s']:>5.0f} s {row.get('groups') or '-':>6} "
                      f"{row.get('passes') or '-':>6} "
                      f"{row['peak_tree_mib']:>5.0f} MiB {row['peak_own_mib']:>5.0f} MiB  "
                      f"{row['sha256']} (load {load:.1f} -> {row['load_after']:.1f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
