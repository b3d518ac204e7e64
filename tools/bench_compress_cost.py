"""Time and peak memory of `onnx-fwlr compress`, stage by stage, on all-MiniLM-L6-v2 (issue 17, item 5).

The command measured (and its --refine 150 and --sequential variants):

    onnx-fwlr compress .cache/minilm/minilm.onnx -o OUT --ratio 0.5 --method kfac --allocation global \
        --calib CALIB512 --fisher-output sentence_embedding --force

Each configuration runs in a fresh child process, through the same library calls the CLI makes, with objects
living as long as there (pipeline.compress: prepare -> choose_ranks -> [correct_sequentially] -> build ->
[refine] -> save), and the stages timed one by one: wall seconds, CPU seconds (all threads of the process) and
the peak RSS *of that stage* (Linux VmHWM, reset between stages through /proc/self/clear_refs; the command's
peak is the largest of them, what `/usr/bin/time -v` reports). The load average before and after is printed
with it: on a shared machine wall time is only meaningful next to the load, and CPU seconds are the better
estimate of an idle machine's wall time. A last stage, not counted in the command's figures, compares the
result with the original on the held-out eval.npz (mean cosine of the embedding). `--cli` also runs the real
command line under wait4 (whole-command wall, CPU and peak RSS) as a check on the in-process figures.

    python tools/bench_compress_cost.py                               # closed form, --refine 150, --sequential
    python tools/bench_compress_cost.py --configs closed --json out.json
    python tools/bench_compress_cost.py --cli                         # also the real CLI, whole-command numbers

CALIB512 is made from .cache/minilm/calib.npz (first 512 rows of every key) when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / ".cache" / "minilm"
CONFIGS = {"closed": [], "refine": ["--refine", "150"], "sequential": ["--sequential"]}
VALIDATE = "validate (eval.npz)"  # the benchmark's fidelity check, not part of the command
COMMON = ["--ratio", "0.5", "--method", "kfac", "--allocation", "global", "--fisher-output", "sentence_embedding"]


def load_average() -> float:
    return os.getloadavg()[0]


def _vm(field: str) -> float:
    """A /proc/self/status memory field in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Stages:
    """Times and peak RSS per stage of one run."""

    def __init__(self):
        self.rows = []

    def run(self, name: str, fn, *args, **kwargs):
        _reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        self.rows.append({"stage": name, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                          "peak_rss_mib": _vm("VmHWM"), "rss_after_mib": _vm("VmRSS")})
        return result


def make_calibration(path: Path, rows: int = 512) -> Path:
    import numpy as np

    if not path.exists():
        data = np.load(MINILM / "calib.npz")
        np.savez(path, **{k: v[:rows] for k, v in data.items()})
    return path


def run_child(config: str, calib: str, eval_data: str, out: str, refine_steps: int, progress: bool) -> dict:
    """One configuration, in this (fresh) process, with the objects living as long as in the CLI (the prepared
    statistics and decompositions go when the model is built); returns the stage rows."""
    from onnx_fwlr.api import Budget, build, choose_ranks, correct_sequentially, prepare, validate
    from onnx_fwlr.io.model import save_model
    from onnx_fwlr.methods.registry import get_method

    stages = Stages()
    model = str(MINILM / "minilm.onnx")
    prepared = stages.run("load + fisher statistics", prepare, model, method="kfac", calibration=calib,
                          fisher_options={"output": "sentence_embedding"}, progress=progress)
    budget = Budget(ratio=0.5)
    ranks = stages.run("decompose + allocate", choose_ranks, prepared, budget, "global")
    bias = get_method("kfac").bias_correction
    corrected = None
    if config == "sequential":
        corrected = stages.run("sequential", correct_sequentially, prepared, ranks, calib, bias, progress=progress)
    compressed, report = stages.run("build", build, prepared, ranks, "global", budget, bias, corrected=corrected,
                                    keep_decompositions=False)
    del prepared, corrected
    if config == "refine":
        from onnx_fwlr.refine.loop import refine

        compressed, _ = stages.run("refine", refine, model, compressed, calib, steps=refine_steps,
                                   output="sentence_embedding", progress=progress)
    stages.run("save", save_model, compressed, out)
    result = stages.run(VALIDATE, validate, model, compressed, eval_data, progress=False)
    cosine = next((o.mean_cosine for o in result.outputs if o.name == "sentence_embedding"), None)
    return {"stages": stages.rows, "mean_cosine": cosine, "sites": len(report.sites)}


def measure(config: str, args) -> dict:
    """Run one configuration in a child process; its rows plus whole-process peak and the load around it."""
    out = Path(args.workdir) / f"bench_{config}.onnx"
    cmd = [sys.executable, __file__, "--child", config, "--calib", args.calib, "--eval", args.eval,
           "--out", str(out), "--refine-steps", str(args.refine_steps)] + (["--progress"] if args.progress else [])
    load_before, start = load_average(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read()
    if status != 0:
        raise RuntimeError(f"{config}: child failed with status {status}")
    row = json.loads(stdout.strip().splitlines()[-1])
    # The command's figures leave the benchmark's own validation out; its peak is the largest stage peak
    # (resetting VmHWM resets ru_maxrss too).
    command = [s for s in row["stages"] if s["stage"] != VALIDATE]
    row.update(config=config, wall_s=sum(s["wall_s"] for s in command), cpu_s=sum(s["cpu_s"] for s in command),
               peak_rss_mib=max(s["peak_rss_mib"] for s in command), load_before=load_before,
               load_after=load_average(), child_cpu_s=usage.ru_utime + usage.ru_stime,
               child_wall_s=time.perf_counter() - start)
    return row


def measure_cli(config: str, args) -> dict:
    """The real command line, as a user runs it (whole-command time and peak RSS only)."""
    out = Path(args.workdir) / f"cli_{config}.onnx"
    cmd = [sys.executable, "-m", "onnx_fwlr", "compress", str(MINILM / "minilm.onnx"), "-o", str(out), "--calib",
           args.calib, "--force", "--quiet", *COMMON, *CONFIGS[config]]
    if config == "refine":
        cmd[cmd.index("150")] = str(args.refine_steps)
    load_before, start = load_average(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"cli {config}: failed with status {status}")
    return {"config": f"cli {config}", "wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "load_before": load_before, "load_after": load_average()}


def print_table(row: dict) -> None:
    print(f"\n== {row['config']}: command wall {row['wall_s']:.1f} s, CPU {row['cpu_s']:.1f} s, peak RSS "
          f"{row['peak_rss_mib']:.0f} MiB, load {row['load_before']:.1f} -> {row['load_after']:.1f}"
          + (f", mean cosine {row['mean_cosine']:.4f}" if row.get("mean_cosine") is not None else ""))
    if "stages" in row:
        print(f"  {'stage':<26} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9} {'after MiB':>9}")
        for s in row["stages"]:
            print(f"  {s['stage']:<26} {s['wall_s']:8.1f} {s['cpu_s']:8.1f} {s['peak_rss_mib']:9.0f} "
                  f"{s['rss_after_mib']:9.0f}")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="closed,refine,sequential", help="comma list of closed,refine,sequential")
    parser.add_argument("--calib", default="/tmp/minilm_calib512.npz")
    parser.add_argument("--eval", default=str(MINILM / "eval.npz"))
    parser.add_argument("--refine-steps", type=int, default=150)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--cli", action="store_true", help="also time the real command line per configuration")
    parser.add_argument("--progress", action="store_true", help="show the pipeline's progress bars (stderr)")
    parser.add_argument("--json", metavar="FILE", help="write all rows as JSON ('-' for stdout)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.calib, args.eval, args.out, args.refine_steps, args.progress)))
        return 0
    make_calibration(Path(args.calib))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, cores {os.cpu_count()}, "
          f"load {os.getloadavg()}")
    rows = []
    for config in configs:
        rows.append(measure(config, args))
        print_table(rows[-1])
        if args.cli:
            rows.append(measure_cli(config, args))
            print_table(rows[-1])
    if args.json:
        text = json.dumps({"rows": rows, "cores": os.cpu_count(), "self_peak_rss_mib":
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
