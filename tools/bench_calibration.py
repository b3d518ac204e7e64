"""Calibration benchmarks: peak memory against the number of batches, and time against plain ORT inference.

    python tools/bench_calibration.py memory   [--batches 16 64] [--json FILE]
    python tools/bench_calibration.py overhead [--models mlp transformer] [--json FILE]

`memory` runs every calibration in a fresh child process that reports its own peak RSS (ru_maxrss), so the
runs cannot share a high-water mark. `overhead` times `onnx_fwlr.api.calibrate` batch by batch (through a
CalibrationDataReader that stamps when each batch is taken) against `session.run` of the original model on
the same batches, with the same session options; warm-up batches are left out of both, and each side's time
is the sum over batches of the fastest of several repeats (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent

from synthetic_transformer import build_transformer, make_token_batch

from onnx_fwlr import api
from onnx_fwlr.stats.activations import make_session

MIB = 1024.0  # ru_maxrss is in KiB on Linux


# --- models and data ---------------------------------------------------------------------------------

def build_mlp(width: int = 1024, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x [batch, width] -> (MatMul -> ReLU) x layers: every site has K = width."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"relu{i}"))
        x = f"a{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def mlp_batch(rng: np.random.Generator, batch: int, width: int = 1024) -> dict:
    return {"x": rng.standard_normal((batch, width)).astype(np.float32)}


def mlp_batches(count: int, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield mlp_batch(rng, batch)


def transformer_case(hidden: int, layers: int, batch: int, seq: int, count: int, seed: int = 0):
    """(model, feeds) from tools/synthetic_transformer.py: BERT-like, FFN 4 x hidden, padded batches."""
    vocab = 1000
    model = build_transformer(hidden=hidden, layers=layers, heads=max(1, hidden // 64), ffn=4 * hidden,
                              vocab=vocab, max_len=seq, seed=seed)
    feeds = [make_token_batch(batch, seq, vocab, seed=seed + 1 + i) for i in range(count)]
    return model, feeds


def write_npz_folder(folder: Path, count: int, batch: int) -> Path:
    """One .npz file per batch, so the data is read one batch at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(mlp_batches(count, batch)):
        np.savez(folder / f"batch_{i:04d}.npz", **feed)
    return folder


class RandomReader:
    """A CalibrationDataReader that makes each batch when asked, so no batch outlives its turn."""

    def __init__(self, count: int, batch: int):
        self._batches = mlp_batches(count, batch)

    def get_next(self):
        return next(self._batches, None)


# --- 1. memory -----------------------------------------------------------------------------------------

def memory_child(model_path: str, source: str, location: str, count: int, batch: int) -> dict:
    """Runs inside a fresh process: calibrate once, report this process's peak RSS."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if source == "folder":
        data = location
    elif source == "reader":
        data = RandomReader(count, batch)
    else:  # "generator": a plain iterable of feed dicts
        data = mlp_batches(count, batch)
    start = time.perf_counter()
    stats = api.calibrate(model_path, data, batch_size=batch, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"source": source, "batches": stats.meta["batches"], "samples": stats.meta["samples"],
            "peak_rss_mib": peak / MIB, "rss_before_calibrate_mib": before / MIB, "seconds": seconds}


def run_memory_child(model_path: Path, source: str, location: Path, count: int, batch: int) -> dict:
    command = [sys.executable, __file__, "memory-child", str(model_path), source, str(location), str(count), str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(counts: list[int], batch: int, sources: list[str]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_calib_") as tmp:
        tmp = Path(tmp)
        model_path = tmp / "mlp.onnx"
        onnx.save(build_mlp(), str(model_path))
        for source in sources:
            runs = {}
            for count in counts:
                folder = tmp / f"data_{count}"
                if source == "folder" and not folder.exists():
                    write_npz_folder(folder, count, batch)
                runs[count] = run_memory_child(model_path, source, folder, count, batch)
                assert runs[count]["batches"] == count, runs[count]
            low, high = runs[min(counts)], runs[max(counts)]
            rows.append({"source": source, "runs": runs,
                         "ratio": high["peak_rss_mib"] / low["peak_rss_mib"],
                         "delta_mib": high["peak_rss_mib"] - low["peak_rss_mib"]})
    data_mib = {c: c * batch * 1024 * 4 / 2**20 for c in counts}
    print(f"\nPeak RSS of calibration, MLP 4 x MatMul 1024->1024 (K=1024), batch {batch}, one fresh process per run")
    print("(float32 data in total: " + ", ".join(f"{c} batches = {m:.0f} MiB" for c, m in data_mib.items()) + ")")
    header = f"{'data source':<12}" + "".join(f"{f'{c} batches':>14}" for c in counts) + f"{'ratio':>8}{'delta':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = "".join(f"{row['runs'][c]['peak_rss_mib']:>10.1f} MiB" for c in counts)
        print(f"{row['source']:<12}{cells}{row['ratio']:>8.3f}{row['delta_mib']:>6.1f} MiB")
    if "generator" in sources:
        print("(generator: data.open_data keeps a plain iterable's batches in a list so it can be read again,\n"
              " so that peak grows with the data; folder and reader stream one batch at a time)")
    return {"batch_size": batch, "counts": counts, "rows": rows}


# --- 2. overhead ---------------------------------------------------------------------------------------

class TimedReader:
    """Hands prepared batches to calibrate and stamps each hand-over: the gap between handing batch i out and
    being asked for batch i+1 is what calibrate spent on batch i (checking it, running ORT, folding the sums)."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)
        self.given_at: list[float] = []
        self.asked_at: list[float] = []

    def get_next(self):
        self.asked_at.append(time.perf_counter())
        feed = next(self._feeds, None)
        if feed is not None:
            self.given_at.append(time.perf_counter())
        return feed

    def per_batch(self) -> list[float]:
        return [asked - given for given, asked in zip(self.given_at, self.asked_at[1:])]


def time_plain(model: onnx.ModelProto, feeds: list[dict]) -> list[float]:
    """Seconds per batch of session.run on the original model, every output fetched."""
    session = make_session(model)  # the session options calibrate uses for its own session
    times = []
    for feed in feeds:
        start = time.perf_counter()
        outputs = session.run(None, feed)
        times.append(time.perf_counter() - start)
        assert outputs
    return times


def time_calibrate(model: onnx.ModelProto, feeds: list[dict]) -> tuple[list[float], float]:
    """Seconds per batch inside api.calibrate, and its end-to-end seconds (graph building and session included)."""
    reader = TimedReader(feeds)
    start = time.perf_counter()
    stats = api.calibrate(model, reader, progress=False)
    total = time.perf_counter() - start
    assert stats.meta["batches"] == len(feeds)
    return reader.per_batch(), total


def best_total(runs: list[list[float]], warmup: int) -> float:
    """Sum over the measured batches of each batch's fastest time across the repeats: on a shared machine
    the other loads only ever add time, so the minimum is the least disturbed estimate."""
    return float(np.sum(np.min([run[warmup:] for run in runs], axis=0)))


def overhead_case(name: str, model: onnx.ModelProto, feeds: list[dict], warmup: int, repeats: int) -> dict:
    plain, calib, end_to_end = [], [], []
    for _ in range(repeats):  # whole runs alternate; never two sessions interleaved batch by batch, since
        plain.append(time_plain(model, feeds))  # an idle session's spinning threads would slow the other
        per_batch, total = time_calibrate(model, feeds)
        calib.append(per_batch)
        end_to_end.append(total)
    measured = len(feeds) - warmup
    best_plain, best_calib = best_total(plain, warmup), best_total(calib, warmup)
    run_ratios = [sum(c[warmup:]) / sum(p[warmup:]) for c, p in zip(calib, plain)]
    return {"model": name, "measured_batches": measured, "warmup_batches": warmup, "repeats": repeats,
            "plain_s_per_batch": plain, "calibrate_s_per_batch": calib, "calibrate_end_to_end_s": end_to_end,
            "plain_ms_per_batch": 1e3 * best_plain / measured, "calibrate_ms_per_batch": 1e3 * best_calib / measured,
            "ratio": best_calib / best_plain, "run_ratios": run_ratios}


def bench_overhead(models: list[str], args) -> dict:
    import onnxruntime as ort

    rows = []
    for name in models:
        model, feeds, label = make_case(name, args)
        row = overhead_case(name, model, feeds, args.warmup, args.repeats)
        row["description"] = label
        rows.append(row)
    print(f"\nCalibration time vs plain ONNX Runtime inference (CPU, onnxruntime {ort.__version__}, default threads;"
          f" {args.warmup} warm-up batches excluded;\n per batch the fastest of {args.repeats} runs;"
          f" 'runs': the ratio of each run's own totals, min-max)")
    header = f"{'model':<13}{'batches':>8}{'plain ms/b':>12}{'calib ms/b':>12}{'ratio':>8}{'runs':>14}  description"
    print(header)
    print("-" * (len(header) + 40))
    for row in rows:
        print(f"{row['model']:<13}{row['measured_batches']:>8}{row['plain_ms_per_batch']:>12.2f}"
              f"{row['calibrate_ms_per_batch']:>12.2f}{row['ratio']:>7.2f}x"
              f"  [{min(row['run_ratios']):.2f}-{max(row['run_ratios']):.2f}]  {row['description']}")
    return {"rows": rows, "target_ratio": 1.5}


def make_case(name: str, args) -> tuple[onnx.ModelProto, list[dict], str]:
    count = args.warmup + args.measured
    if name == "mlp":
        return build_mlp(), list(mlp_batches(count, args.mlp_batch)), f"4 x MatMul 1024->1024 + ReLU, batch {args.mlp_batch}"
    if name == "transformer":
        h, n, b, s = args.hidden, args.layers, args.tf_batch, args.seq
        model, feeds = transformer_case(h, n, b, s, count)
        real = float(np.mean([f["attention_mask"].mean() for f in feeds]))
        return (
            model,
            feeds,
            f"BERT-like, hidden {h}, FFN {4 * h}, {n} layers, batch {b}, seq {s}, {100 * real:.0f}% real tokens",
        )
    raise SystemExit(f"unknown model '{name}'; choose mlp or transformer")


# --- command line --------------------------------------------------------------------------------------


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "memory-child":
        model_path, source, location, count, batch = argv[1:6]
        print(json.dumps(memory_child(model_path, source, location, int(count), int(batch))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["memory", "overhead", "all"])
    parser.add_argument("--json", help="write the measurements to this JSON file")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="memory: batch counts to compare")
    parser.add_argument(
        "--sources",
        nargs="+",
        default=["folder", "reader", "generator"],
        choices=["folder", "reader", "generator"],
        help="memory: how the data reaches calibrate",
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    parser.add_argument("--warmup", type=int, default=3, help="warm-up batches excluded from every timing")
    parser.add_argument("--measured", type=int, default=20, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side; per batch the fastest counts")
    parser.add_argument("--mlp-batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tf-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    results = {}
    if args.bench in ("memory", "all"):
        results["memory"] = bench_memory(sorted(args.batches), args.mlp_batch, args.sources)
    if args.bench in ("overhead", "all"):
        results["overhead"] = bench_overhead(args.models, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
