"""Where a compress run's memory goes, stage by stage: `onnx-fwlr compress` run in this process with its stages
wrapped (no hook in the package), resident memory sampled five times a second, and optionally numpy's and
Python's own allocations traced (tracemalloc: numpy reports its buffers to it; ONNX Runtime's do not appear, so
RSS minus traced is mostly ONNX Runtime and the mapped weights).

    python tools/trace_llm_memory.py /work/cache/smollm2/model.onnx --calib calib.npz -- --ratio 0.8
    python tools/trace_llm_memory.py MODEL --calib C --tracemalloc --json trace.json -- --ratio 0.8 --external-data

Everything after `--` goes to `compress` as given (the output goes to a temporary folder unless `-o` is there).
Prints one row per stage (entered in order; a stage inside another is indented): RSS on entry, the peak
while inside, RSS on exit, the traced peak, and seconds; then the whole run's peak (VmHWM).

The sampler misses what happens between its samples, and a C++ call that holds the GIL (protobuf's CopyFrom or
SerializeToString on a large model) stops it altogether; so each sample and each stage's entry and exit also
read the process's high-water mark (VmHWM, what `ru_maxrss` and `/usr/bin/time -v` report): a rise since the
last reading is a peak of every stage open then, even one no sample saw ("hwm" column: VmHWM on exit).
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Tracer:
    """Stages entered and left (a stack), the RSS peak of each, sampled by a thread."""

    def __init__(self, traced: bool, progress: Path | None = None):
        self.rows, self.stack, self.traced, self.progress = [], [], traced, progress
        self.hwm = hwm_mib()  # the high-water mark at the last reading
        self.between = 0.0  # the highest rise of it while no stage was open
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.start = time.perf_counter()
        self.thread.start()

    def _observe(self, rss: float) -> None:
        """Raise the open stages' peaks to this RSS, and to the high-water mark if it rose since the last
        reading (a peak no sample saw happened while they were open). Call with the lock held."""
        hwm = hwm_mib()
        top = max(rss, hwm) if hwm > self.hwm else rss
        if hwm > self.hwm and not self.stack:
            self.between = max(self.between, hwm)
        self.hwm = max(self.hwm, hwm)
        for row in self.stack:
            row["peak_mib"] = max(row["peak_mib"], top)

    def _sample(self):
        last = time.perf_counter()
        while not self.done.wait(0.2):
            rss = rss_mib()
            with self.lock:
                self._observe(rss)
                if self.progress is not None and time.perf_counter() - last > 30:  # how far a run that is stopped got
                    last = time.perf_counter()
                    self.progress.write_text(json.dumps({"seconds": last - self.start, "hwm_mib": hwm_mib(),
                                                         "rss_mib": rss, "rows": self.rows}, indent=1))

    def enter(self, name: str) -> dict:
        rss = rss_mib()
        row = {"stage": name, "depth": len(self.stack), "enter_mib": rss, "peak_mib": rss,
               "t0": time.perf_counter() - self.start}
        if self.traced:
            row["traced_enter_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
            if not self.stack:
                tracemalloc.reset_peak()
        with self.lock:
            self._observe(rss)  # a rise before this stage belongs to the stages already open
            self.rows.append(row)
            self.stack.append(row)
        return row

    def leave(self, row: dict) -> None:
        rss = rss_mib()
        with self.lock:
            self._observe(rss)
            self.stack.remove(row)
            row.update(exit_mib=rss, hwm_mib=self.hwm, seconds=time.perf_counter() - self.start - row["t0"])
        if self.traced:
            current, peak = tracemalloc.get_traced_memory()
            row.update(traced_exit_mib=current / 2**20, traced_peak_mib=peak / 2**20)

    def wrap(self, owner, attribute: str, name: str | None = None) -> None:
        """Replace owner.attribute (a function or method) by one that records a stage around each call."""
        original = getattr(owner, attribute)
        label = name or attribute

        @functools.wraps(original)
        def staged(*args, **kwargs):
            row = self.enter(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.leave(row)

        setattr(owner, attribute, staged)


def install(tracer: Tracer) -> None:
    """The stages of the low-rank path (imported here, so module-level names are patched where they are read)."""
    from onnx_fwlr.autodiff import backward
    from onnx_fwlr.io import model as modelio
    from onnx_fwlr.pipeline import budget, build, compress, decompose, prepare
    from onnx_fwlr.pipeline import run as pipeline
    from onnx_fwlr.stats import fisher

    tracer.wrap(pipeline, "run", "compress run")
    tracer.wrap(compress, "prepare")
    tracer.wrap(prepare, "load_model", "load model")
    tracer.wrap(prepare, "_statistics", "statistics")
    tracer.wrap(fisher, "collect_fisher_stats", "fisher pass")
    tracer.wrap(backward.GradientRunner, "_make_session", "ORT session")
    tracer.wrap(budget, "ensure_decompositions", "decompose all (global allocation)")
    tracer.wrap(decompose, "decompose_one", "one decomposition")
    tracer.wrap(compress, "build", "build")
    tracer.wrap(build, "apply_factors", "apply factors")
    tracer.wrap(modelio, "save_model", "save model")
    install_quantized(tracer)
    install_validation(tracer)


def install_quantized(tracer: Tracer) -> None:
    """The stages of `--quantize`: its own prepare, the tables' pricing pass, each site's options, each fit
    attempt's build (plans, then the graph rewrite with ONNX Runtime's quantizers), the bytes check."""
    from onnx_fwlr.pipeline import quantized
    from onnx_fwlr.quant import ortquant

    tracer.wrap(quantized, "prepare")
    tracer.wrap(quantized, "_measure_quantization", "pricing (folded by the Fisher pass)")
    tracer.wrap(quantized, "_quantization_pass", "quantization's own pass (no Fisher pass here)")
    tracer.wrap(quantized, "_options", "quantize options")
    tracer.wrap(quantized, "_build", "fit attempt (build)")
    tracer.wrap(quantized.plan, "site_plan", "site plan")
    tracer.wrap(quantized, "rewrite", "rewrite graph")
    tracer.wrap(ortquant, "upgrade_for_int4", "opset upgrade")
    tracer.wrap(ortquant, "quantize_dynamic_nodes", "quantize_dynamic")
    tracer.wrap(quantized, "_written_bytes", "bytes check")


def install_validation(tracer: Tracer) -> None:
    """`--val` on a language model: the perplexity comparison and its ONNX Runtime calls."""
    from onnx_fwlr.evaluate import language

    tracer.wrap(language, "validate_language", "validate (perplexity)")
    tracer.wrap(language, "_run_logits", "logits run")


def table(rows: list[dict], collapse: set[str]) -> list[str]:
    """Rows for printing; repeated stages named in `collapse` are summarised (count, largest peak, total s)."""
    lines, seen = [], {}
    for row in rows:
        if row["stage"] in collapse:
            summary = seen.get(row["stage"])
            if summary is None:
                summary = seen[row["stage"]] = dict(row, count=0, seconds=0.0)
                lines.append(summary)
            summary["count"] += 1
            summary["seconds"] += row.get("seconds", 0.0)
            summary["peak_mib"] = max(summary["peak_mib"], row["peak_mib"])
            summary["exit_mib"] = row.get("exit_mib", float("nan"))
            summary["hwm_mib"] = row.get("hwm_mib", float("nan"))
            summary["traced_peak_mib"] = max(summary.get("traced_peak_mib", 0), row.get("traced_peak_mib", 0))
        else:
            lines.append(row)
    out = ["| stage | calls | RSS in MiB | peak MiB | RSS out MiB | hwm MiB | traced peak MiB | s |",
           "|---|---|---|---|---|---|---|---|"]
    for row in lines:
        traced = f"{row['traced_peak_mib']:.0f}" if "traced_peak_mib" in row else "-"
        out.append(f"| {'  ' * row['depth']}{row['stage']} | {row.get('count', 1)} | {row['enter_mib']:.0f} | "
                   f"{row['peak_mib']:.0f} | {row.get('exit_mib', float('nan')):.0f} | "
                   f"{row.get('hwm_mib', float('nan')):.0f} | {traced} | {row.get('seconds', float('nan')):.1f} |")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--tracemalloc", action="store_true", help="also trace numpy's and Python's allocations")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--progress", type=Path, help="rewrite this JSON every 30 s (stages so far, peak so far)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = parser.parse_args(argv[:split]), argv[split + 1:]  # after "--": compress's own arguments
    if args.tracemalloc:
        tracemalloc.start()
    tracer = Tracer(args.tracemalloc, args.progress)
    install(tracer)
    from onnx_fwlr.api import cli_main as cli

    folder = tempfile.mkdtemp(prefix="trace_llm_")
    argv = ["compress", args.model, "--calib", args.calib, "--quiet", "--force", *rest]
    if "-o" not in rest and "--output" not in rest:
        argv += ["-o", os.path.join(folder, "out.onnx")]
    load = os.getloadavg()
    start = time.perf_counter()
    code = cli(argv)
    wall = time.perf_counter() - start
    tracer.done.set()
    lines = table(tracer.rows, {"one decomposition", "fisher pass", "ORT session", "logits run", "rewrite graph",
                                 "opset upgrade", "quantize_dynamic", "bytes check", "site plan"})
    print(f"exit {code}, wall {wall:.0f} s, peak RSS (VmHWM) {hwm_mib():.0f} MiB (outside every stage: "
          f"{tracer.between:.0f}); load before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "exit": code, "wall_s": wall, "hwm_mib": hwm_mib(),
                                         "hwm_outside_stages_mib": tracer.between, "load": [load, os.getloadavg()],
                                         "rows": tracer.rows}, indent=1))


if __name__ == "__main__":
    main()
