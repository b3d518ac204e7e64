"""Peak memory and wall time of `onnx-fwlr compress` on a decoder language model, against the issue's limits.

Runs each configuration as `python -m onnx_fwlr compress MODEL ...` in a child process (its own process tree)
and records: the CPU time of the tree (user + system: on a shared machine the wall time mostly measures the
others' load), the child tree's peak RSS (the child's ru_maxrss from wait4, and the largest
sum of VmRSS over the tree polled twice a second: decomposition workers run beside their parent), the wall
time, and the wall per stage from the report's timings. PASS when the peak RSS is at most 1.5 × the model's
files (model + external data) and the wall within the limit: 10 min below 0.5 B parameters (SmolLM2-135M),
60 min above (the 1.1 B model).

    python tools/bench_llm_memory.py --model /work/cache/smollm2/model.onnx --calib /work/cache/smollm2/calib.npz
    python tools/make_random_llama.py --preset smollm2 -o /tmp/llama/smol.onnx --calib /tmp/llama/calib.npz
    python tools/bench_llm_memory.py --model /tmp/llama/smol.onnx --calib /tmp/llama/calib.npz --json smol.json
    python tools/bench_llm_memory.py --model ... --configs ratio --extra=--stats-memory=256MB

The parent starts nothing large itself (ru_maxrss is carried across fork + exec: a child would report its
parent's peak as its own).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
MEMORY_FACTOR = 1.5


def model_bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in sorted(locations))


def model_parameters(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            count = 1
            for d in tensor.dims:
                count *= d
            total += count
    return total


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc's children lists)."""
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    frontier += [int(c) for c in handle.read().split()]
        except OSError:
            continue
    return found


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreePeak:
    """Largest sum of VmRSS over a process tree, polled twice a second; the tree is killed past `limit_kib` (a
    shared machine must not meet the kernel's out-of-memory killer)."""

    def __init__(self, pid: int, limit_kib: int | None = None):
        self.pid, self.peak, self.done, self.limit, self.killed = pid, 0, threading.Event(), limit_kib, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.done.wait(0.5):
            tree = _tree(self.pid)
            self.peak = max(self.peak, sum(_rss_kib(p) for p in tree))
            if self.limit and self.peak > self.limit and not self.killed:
                self.killed = True
                for pid in reversed(tree):
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def run_config(name: str, model: Path, calib: Path, args: list[str], workdir: Path, timeout: float,
               max_rss_mb: float | None = None) -> dict:
    out, report = workdir / f"{name}.onnx", workdir / f"{name}.json"
    command = [sys.executable, "-m", "onnx_fwlr", "compress", str(model), "-o", str(out), "--calib", str(calib),
               "--force", "--json", str(report), *args]
    if shutil.which("script"):  # a terminal for the child, so its progress bars (stage, group i of N, ETA) are logged
        command = ["script", "-qfec", shlex.join(command), str(workdir / f"{name}.progress")]
    log = open(workdir / f"{name}.log", "w")
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    tree = TreePeak(child.pid, int(max_rss_mb * 1024) if max_rss_mb else None)
    timer = threading.Timer(timeout, child.kill)
    timer.start()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak, not an earlier config's
    timer.cancel()
    child.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    tree_peak = tree.stop()
    log.close()
    row = {"config": name, "args": " ".join(args), "exit": code, "wall_s": wall,
           "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
           "tree_peak_rss_mb": tree_peak / 1024, "stages": {}, "method": "", "passes": None,
           "killed_over_max_rss": tree.killed, "timed_out": wall >= timeout}
    if code == 0 and report.exists():
        data = json.loads(report.read_text())
        row["stages"] = {k: round(v, 1) for k, v in data.get("timings", {}).items()}
        row["method"] = f"{data.get('method')} + {data.get('allocation')}"
        row["passes"] = data.get("calibration", {}).get("passes", 1)
        row["bytes_out"] = sum(p.stat().st_size for p in workdir.glob(f"{name}.onnx*"))
    else:
        row["log_tail"] = (workdir / f"{name}.log").read_text(errors="replace")[-2000:]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--configs", default="ratio,quantize", help="ratio (0.8) and/or quantize (auto, target size)")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--target-size", type=int, help="bytes for --quantize auto (default: 30 %% of the model)")
    parser.add_argument("--extra", action="append", default=[], help="more compress arguments, e.g. --extra=--workers=2")
    parser.add_argument("--workdir", type=Path, help="outputs and logs (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds before a run is killed")
    parser.add_argument("--max-rss-mb", type=float, help="kill a run whose process tree passes this many MiB")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size, params = model_bytes(args.model), model_parameters(args.model)
    wall_limit = 600 if params < 500e6 else 3600
    extra = [part for item in args.extra for part in item.split("=", 1)]
    configs = {"ratio": ["--ratio", str(args.ratio)],
               "quantize": ["--quantize", "auto", "--target-size", str(args.target_size or int(0.3 * size))]}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_llm_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.configs.split(","):
        rows.append(run_config(name, args.model, args.calib, configs[name] + extra, workdir, args.timeout,
                               args.max_rss_mb))
    load = os.getloadavg()
    print(f"model {args.model}: {params / 1e6:.1f} M parameters, {size / 2**20:.0f} MiB of files; "
          f"limits: peak RSS <= {MEMORY_FACTOR} x = {MEMORY_FACTOR * size / 2**20:.0f} MiB, wall <= {wall_limit / 60:.0f} min; "
          f"load average {load[0]:.1f} ({os.cpu_count()} cores)")
    print("| config | method | exit | passes | wall s | CPU s | stages (s) | peak RSS MiB (largest process) | "
          "tree peak MiB | memory | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        memory_ok = row["exit"] == 0 and max(row["peak_rss_mb"], row["tree_peak_rss_mb"]) * 2**20 <= MEMORY_FACTOR * size
        time_ok = row["exit"] == 0 and row["wall_s"] <= wall_limit
        row["memory_pass"], row["time_pass"] = memory_ok, time_ok
        stages = ", ".join(f"{k} {v}" for k, v in row["stages"].items())
        print(f"| {row['config']} {row['args']} | {row['method']} | {row['exit']} | {row['passes']} | "
              f"{row['wall_s']:.0f} | {row['cpu_s']:.0f} | {stages} | {row['peak_rss_mb']:.0f} | {row['tree_peak_rss_mb']:.0f} | "
              f"{'PASS' if memory_ok else 'FAIL'} | {'PASS' if time_ok else 'FAIL'} |")
        if row["exit"] != 0:
            print(row.get("log_tail", ""))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "bytes": size, "parameters": params,
                                         "load": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
