"""Profile an ONNX model in ONNX Runtime: latency, peak memory, size, parameters, MatMul FLOPs, time per op.

The measurements run in a fresh child Python process, so the peak resident memory belongs
to this model alone and no earlier session in the caller's process skews the latency. Metric names follow
ONNX Runtime's transformers benchmark (`average_latency_ms`, `latency_90_percentile`, `QPS`, ...).
"""

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_fwlr.cost.flops import matmul_flops, measure_node_flops  # noqa: F401 (matmul_flops: public here too)
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io import data, runtime
from onnx_fwlr.io.model import file_size
from onnx_fwlr.sites.find import model_parameters
from onnx_fwlr.tables import format_table

PROFILED_RUNS = 10  # enough for a stable per-op split; the profile JSON grows with runs x nodes
TOP_NODES = 10


# ---------------------------------------------------------------------------------------------------------
# Inputs


def parse_shape_args(items):
    """Parse `--shape name:d0,d1,...` strings into {name: [d0, d1, ...]}."""
    shapes = {}
    for item in items or []:
        name, sep, dims_text = item.rpartition(":")
        if not sep or not name or not dims_text.strip():
            raise FwlrError(f"Shape '{item}' is malformed; write it as name:d0,d1,... (for example input_ids:1,128).")
        try:
            dims = [int(d) for d in dims_text.split(",")]
        except ValueError:
            raise FwlrError(
                f"Shape '{item}' has a dimension that is not an integer; write it as name:d0,d1,... with whole numbers."
            ) from None
        if any(d < 0 for d in dims):
            raise FwlrError(f"Shape '{item}' has a negative dimension; every dimension must be 0 or more.")
        if name in shapes:
            raise FwlrError(f"Input '{name}' is given more than one `shapes`; give each input once.")
        shapes[name] = dims
    return shapes


def synthetic_feed(model, shapes=None, seed=0):
    """Random inputs matching the model's declared inputs, for timing (not for judging accuracy).

    `shapes` ({input name: full shape}) fixes symbolic dimensions; those it leaves open are 1, as in
    onnxruntime_perf_test (symbolic_defaults says which). See data.synthetic_feed for the values.
    """
    filled, _ = symbolic_defaults(model, shapes)
    return data.synthetic_feed(data.model_inputs(model), filled, batch_size=None, seed=seed)


def symbolic_defaults(model, shapes=None):
    """({input name: full shape}, ["input[axis] 'dim'", ...]): `shapes` plus every input it does not name whose
    declared shape has symbolic dimensions, with those dimensions set to 1; the list names the defaulted axes."""
    filled, defaulted = dict(shapes or {}), []
    for spec in data.model_inputs(model):
        if spec.name in filled or all(isinstance(d, int) and d > 0 for d in spec.shape):
            continue
        dims = []
        for axis, dim in enumerate(spec.shape):
            fixed = isinstance(dim, int) and dim > 0
            dims.append(dim if fixed else 1)
            if not fixed:
                defaulted.append(f"{spec.name}[{axis}] '{dim or '?'}'")
        filled[spec.name] = dims
    return filled, defaulted


def _check_feed(model, feed):
    """Fail early, in plain words, when the feed does not match the model's inputs."""
    names = [spec.name for spec in data.model_inputs(model)]
    missing = [n for n in names if n not in feed]
    extra = sorted(set(feed) - set(names))
    if missing:
        raise FwlrError(f"The inputs lack {', '.join(missing)}; the model needs {', '.join(names)}.")
    if extra:
        raise FwlrError(f"The inputs include {', '.join(extra)}, which the model does not have; "
                        f"it needs {', '.join(names)}.")


# ---------------------------------------------------------------------------------------------------------
# Measurement in a child process


def _peak_rss_mb():
    """This process's peak resident memory in MiB so far, or None where the OS does not report it (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # macOS: bytes, Linux: KiB


def _open_session(model_path, options, providers):
    """An InferenceSession that really uses every requested provider, or a FwlrError saying what is available."""
    session = runtime.make_session(model_path, options, providers)
    missing = [p for p in providers if p not in session.get_providers()]
    if missing:
        raise FwlrError(
            f"ONNX Runtime could not use {', '.join(missing)} "
            f"(the session fell back to {', '.join(session.get_providers())}); "
            f"check the GPU drivers and the onnxruntime-gpu install."
        )
    return session


def _latency_stats(seconds, batch_size):
    """Latency summary in milliseconds, named as in ONNX Runtime's transformers benchmark."""
    ms = np.asarray(seconds) * 1000.0
    average = float(ms.mean())
    return {
        "average_latency_ms": average,
        "latency_variance": float(ms.var()),
        "latency_10_percentile": float(np.percentile(ms, 10)),
        "latency_50_percentile": float(np.percentile(ms, 50)),
        "latency_90_percentile": float(np.percentile(ms, 90)),
        "latency_95_percentile": float(np.percentile(ms, 95)),
        "latency_99_percentile": float(np.percentile(ms, 99)),
        "QPS": batch_size * 1000.0 / average,
    }


def parse_ort_profile(events, skip_runs=0):
    """Per-op-type and per-node kernel time (ms per run) from an ONNX Runtime profiling JSON event list.

    Node events inside the first `skip_runs` model runs (warm-up) are left out.
    """
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"])
    start = runs[skip_runs]["ts"] if len(runs) > skip_runs else 0
    counted_runs = max(len(runs) - skip_runs, 1)
    by_op, by_node, node_times = {}, {}, {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < start:
            continue
        op = event.get("args", {}).get("op_name", "?")
        node = event["name"][: -len("_kernel_time")] or f"<unnamed {op}>"
        duration_ms = event["dur"] / 1000.0 / counted_runs
        by_op[op] = by_op.get(op, 0.0) + duration_ms
        key = (node, op)
        by_node[key] = by_node.get(key, 0.0) + duration_ms
        node_times[node] = node_times.get(node, 0.0) + duration_ms
    total = sum(by_op.values())
    share = (lambda t: t / total) if total > 0 else (lambda t: 0.0)
    ranked = sorted(by_op.items(), key=lambda kv: (-kv[1], kv[0]))
    op_types = [{"op_type": op, "time_ms": t, "share": share(t)} for op, t in ranked]
    nodes = [
        {"node": node, "op_type": op, "time_ms": t, "share": share(t)}
        for (node, op), t in sorted(by_node.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_NODES]
    ]
    return {"op_types": op_types, "top_nodes": nodes, "kernel_time_ms": total, "profiled_runs": counted_runs,
            "node_times": dict(sorted(node_times.items()))}


def _op_profile(model_path, feed, threads, providers):
    """Per-op time from a separate profiled session, so profiling overhead stays out of the latency numbers."""
    with tempfile.TemporaryDirectory(prefix="fwlr_profile_") as folder:
        options = runtime.session_options(threads=threads, quiet=False, profile_prefix=os.path.join(folder, "ort"))
        session = _open_session(model_path, options, providers)
        for _ in range(1 + PROFILED_RUNS):  # first run is warm-up, skipped when parsing
            session.run(None, feed)
        profile_path = session.end_profiling()
        with open(profile_path) as handle:
            events = json.load(handle)
        os.remove(profile_path)
    return parse_ort_profile(events, skip_runs=1)


def _measure(model_path, feed, runs, warmup, threads, providers, op_profile, batch_size):
    """Everything profile_model reports; runs in the child. Latency first, so the RSS peak is the plain session's."""
    baseline = _peak_rss_mb()
    session = _open_session(model_path, runtime.session_options(threads=threads, quiet=False), providers)
    for _ in range(warmup):
        session.run(None, feed)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - start)
    peak = _peak_rss_mb()
    used_providers = session.get_providers()
    del session

    model = onnx.load(model_path, load_external_data=False)
    node_flops, nested = measure_node_flops(model_path, model, feed, providers)
    result = {
        "model": str(model_path),
        "runs": runs,
        "warmup": warmup,
        "batch_size": batch_size,
        **_latency_stats(seconds, batch_size),
        "threads": threads,
        "providers": used_providers,
        "peak_rss_mb": peak,
        "rss_growth_mb": None if peak is None else peak - baseline,
        "file_size_bytes": file_size(model_path),
        "parameters": model_parameters(model),
        "matmul_flops": sum(node_flops.values()),
        "matmul_nodes": len(node_flops),
        "matmul_nodes_in_subgraphs": nested,
        "node_flops": node_flops,
    }
    if op_profile:
        result["op_profile"] = _op_profile(model_path, feed, threads, providers)
    return result


def _child_entry(request_folder):
    """Child-process entry: read request.json + feed.npz from the folder, write result.json there.

    The request's "entry" ("module:function", default this module's _measure) is what runs.
    """
    folder = Path(request_folder)
    request = json.loads((folder / "request.json").read_text())
    with np.load(folder / "feed.npz") as arrays:
        feed = {name: arrays[f"arr_{i}"] for i, name in enumerate(request.pop("input_names"))}
    module_name, _, function_name = request.pop("entry", f"{__name__}:_measure").partition(":")
    try:
        measure = getattr(importlib.import_module(module_name), function_name)
        outcome = {"result": measure(feed=feed, **request)}
    except FwlrError as error:
        outcome = {"error": str(error)}
    except Exception as error:  # ONNX Runtime failures (bad feed, unsupported op, ...) reach the user as one line
        detail = " ".join(str(error).split())  # ORT messages span lines; the CLI shows one
        outcome = {"error": f"ONNX Runtime failed while profiling {request['model_path']}: "
                            f"{type(error).__name__}: {detail}"}
    (folder / "result.json").write_text(json.dumps(outcome))


def _check_providers(providers):
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise FwlrError(
            f"Execution provider {', '.join(missing)} is not available in this onnxruntime build; "
            f"available: {', '.join(available)}."
        )


def profile_model(model_path, feed, runs=100, warmup=10, threads=None, providers=("CPUExecutionProvider",),
                  op_profile=True, batch_size=None):
    """Measure one model in a fresh child Python process and return a flat (JSON-ready) dict of metrics.

    Keys: average_latency_ms, latency_{50,90,95,99}_percentile, latency_variance, QPS (batch_size / mean latency),
    threads (None = ONNX Runtime's default), providers (those the session really used), peak_rss_mb (the child's
    peak), rss_growth_mb (peak minus the child's footprint before the session was created), file_size_bytes
    (model + external data), parameters, matmul_flops (2*M*K*N over main-graph MatMul/Gemm at this feed's shapes),
    and op_profile (per-op-type and top-node kernel time) when requested.
    batch_size defaults to the leading dimension of the first input.
    """
    model_path = str(model_path)
    if not Path(model_path).is_file():
        raise FwlrError(f"Model file {model_path} does not exist; check the path.")
    if runs < 1 or warmup < 0:
        raise FwlrError("Profiling needs runs >= 1 and warmup >= 0.")
    providers = tuple(providers)
    _check_providers(providers)
    _check_feed(onnx.load(model_path, load_external_data=False), feed)
    if batch_size is None:
        first = next(iter(feed.values()), None)
        batch_size = int(first.shape[0]) if first is not None and first.ndim > 0 else 1

    request = {
        "model_path": str(Path(model_path).resolve()), "runs": runs, "warmup": warmup, "threads": threads,
        "providers": list(providers), "op_profile": op_profile, "batch_size": batch_size, "input_names": list(feed),
    }
    return run_in_child(request, feed)


def run_in_child(request, feed):
    """Run the request's entry (default _measure) in a fresh Python interpreter and return its result.

    A plain subprocess rather than multiprocessing: 'spawn' re-imports the caller's __main__, which breaks
    scripts without an `if __name__ == "__main__"` guard and runs their code inside the measured process.
    """
    with tempfile.TemporaryDirectory(prefix="fwlr_profile_") as folder:
        (Path(folder) / "request.json").write_text(json.dumps(request))
        np.savez(Path(folder) / "feed.npz", *[np.asarray(value) for value in feed.values()])
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        code = "import sys; from onnx_fwlr.cost.profiling import _child_entry; _child_entry(sys.argv[1])"
        completed = subprocess.run([sys.executable, "-c", code, folder], env=env, capture_output=True, text=True)
        result_path = Path(folder) / "result.json"
        if completed.returncode != 0 or not result_path.is_file():
            last_lines = " | ".join(completed.stderr.strip().splitlines()[-3:])
            raise FwlrError(
                f"The profiling process for {request['model_path']} died (exit code {completed.returncode}; "
                f"{last_lines or 'no error output'}); if it ran out of memory, try a smaller `shapes`."
            )
        outcome = json.loads(result_path.read_text())
    if "error" in outcome:
        raise FwlrError(outcome["error"])
    return outcome["result"]


# ---------------------------------------------------------------------------------------------------------
# Test data for onnxruntime_perf_test / onnx_test_runner


def save_test_data(original_model_path, feed, out_dir):
    """Write ONNX Runtime's test-data layout: out_dir/test_data_set_0/{input_i,output_i}.pb.

    Inputs are written in the model's input order, outputs are the ORIGINAL model's results on them. Place the
    compressed model beside it as out_dir/model.onnx, then `onnx_test_runner out_dir` checks it against the
    original's outputs and `onnxruntime_perf_test out_dir/model.onnx` times it on the same inputs.
    Returns the test_data_set_0 folder.
    """
    model = onnx.load(str(original_model_path), load_external_data=False)
    _check_feed(model, feed)
    session = runtime.make_session(original_model_path, runtime.session_options(quiet=False))
    outputs = session.run(None, feed)
    folder = Path(out_dir) / "test_data_set_0"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("input_*.pb")) + list(folder.glob("output_*.pb")):
        stale.unlink()  # leftovers from a model with more inputs/outputs would confuse the test runner
    for i, inp in enumerate(data.model_inputs(model)):
        tensor = numpy_helper.from_array(np.asarray(feed[inp.name]), inp.name)
        (folder / f"input_{i}.pb").write_bytes(tensor.SerializeToString())
    for i, (meta, value) in enumerate(zip(session.get_outputs(), outputs)):
        tensor = numpy_helper.from_array(np.asarray(value), meta.name)
        (folder / f"output_{i}.pb").write_bytes(tensor.SerializeToString())
    return folder


# ---------------------------------------------------------------------------------------------------------
# Text reports


def _table(headers, rows):
    """A plain-text table: first column left-aligned, the others right-aligned."""
    return format_table(headers, rows, align="l" + "r" * (len(headers) - 1))


def _human(value, unit=""):
    """1234567 -> '1.23M' (SI prefixes), for counts and FLOPs."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{prefix}{unit}"
    return f"{value:g}{unit}"


def _bytes(value):
    for factor, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= factor:
            return f"{value / factor:.2f} {unit}"
    return f"{value} B"


# (label, key, formatter) for the headline metrics
METRICS = [  # the median first: under load the mean follows a few slow runs
    ("latency p50", "latency_50_percentile", lambda v: f"{v:.3f} ms"),
    ("latency p90", "latency_90_percentile", lambda v: f"{v:.3f} ms"),
    ("latency p99", "latency_99_percentile", lambda v: f"{v:.3f} ms"),
    ("latency mean", "average_latency_ms", lambda v: f"{v:.3f} ms"),
    ("QPS", "QPS", lambda v: f"{v:.1f}"),
    ("peak RSS", "peak_rss_mb", lambda v: "n/a" if v is None else f"{v:.1f} MiB"),
    ("RSS growth", "rss_growth_mb", lambda v: "n/a" if v is None else f"{v:.1f} MiB"),
    ("file size", "file_size_bytes", _bytes),
    ("parameters", "parameters", _human),
    ("matrix FLOPs", "matmul_flops", _human),
]

TOP_OP_TYPES = 10


def _settings_line(result):
    threads = result["threads"] if result["threads"] is not None else "ORT default"
    return (f"batch {result['batch_size']}, {result['runs']} runs after {result['warmup']} warm-up, "
            f"threads {threads}, providers {', '.join(result['providers'])}")


def _op_rows(op_profile, limit=TOP_OP_TYPES):
    return [[row["op_type"], f"{row['time_ms']:.3f}", f"{100 * row['share']:.1f}%"]
            for row in op_profile["op_types"][:limit]]


def format_profile(result):
    """A plain-text report of one profile_model result."""
    parts = [f"Profile of {result['model']}", _settings_line(result), ""]
    rows = [[label, fmt(result[key])] for label, key, fmt in METRICS]
    parts.append(_table(["metric", "value"], rows))
    if result.get("matmul_nodes_in_subgraphs"):
        parts.append(f"({result['matmul_nodes_in_subgraphs']} MatMul/Gemm inside subgraphs not counted in FLOPs)")
    if "op_profile" in result:
        profile = result["op_profile"]
        parts += ["", f"Time per op type (kernel time per run, {profile['profiled_runs']} profiled runs)"]
        parts.append(_table(["op type", "ms", "share"], _op_rows(profile)))
        parts += ["", "Slowest nodes"]
        node_rows = [[r["node"], r["op_type"], f"{r['time_ms']:.3f}", f"{100 * r['share']:.1f}%"]
                     for r in profile["top_nodes"]]
        parts.append(_table(["node", "op type", "ms", "share"], node_rows))
    return "\n".join(parts)


def _ratio(a, b):
    return b / a if a and b is not None else None


def compare_profiles(a, b):
    """{metric key: {"a", "b", "ratio": b / a}} for the headline metrics, plus "op_types" (ms and share per op type)."""
    comparison = {key: {"a": a[key], "b": b[key], "ratio": _ratio(a[key], b[key])} for _, key, _ in METRICS}
    if "op_profile" in a and "op_profile" in b:
        a_ops = {row["op_type"]: row for row in a["op_profile"]["op_types"]}
        b_ops = {row["op_type"]: row for row in b["op_profile"]["op_types"]}
        empty = {"time_ms": 0.0, "share": 0.0}
        order = sorted(set(a_ops) | set(b_ops), key=lambda op: (-a_ops.get(op, empty)["time_ms"], op))
        comparison["op_types"] = {}
        for op in order:
            row_a, row_b = a_ops.get(op, empty), b_ops.get(op, empty)
            comparison["op_types"][op] = {
                "a": row_a["time_ms"], "b": row_b["time_ms"], "ratio": _ratio(row_a["time_ms"], row_b["time_ms"]),
                "a_share": row_a["share"], "b_share": row_b["share"],
            }
    return comparison


def _ratio_text(ratio):
    if ratio is None:
        return "n/a"
    return f"{ratio:.3f}x" if ratio >= 0.001 else f"{ratio:.1e}x"


def format_comparison(a, b, names=("original", "compressed"), paired=None):
    """Side-by-side plain-text report of two profile_model results, with ratios second / first.

    The headline latency ratio is the median of `paired` (limits.paired_ratio) when given, else the ratio of
    the two medians; never the mean.
    """
    comparison = compare_profiles(a, b)
    parts = [f"{names[0]}: {a['model']}", f"{names[1]}: {b['model']}", _settings_line(a)]
    if _settings_line(b) != _settings_line(a):
        parts.append(f"{names[1]} settings differ: {_settings_line(b)}")
    parts.append("")
    rows = [[label, fmt(a[key]), fmt(b[key]), _ratio_text(comparison[key]["ratio"])] for label, key, fmt in METRICS]
    parts.append(_table(["metric", names[0], names[1], "ratio"], rows))
    flop_ratio = comparison["matmul_flops"]["ratio"]
    if paired is not None:
        latency = (f"latency ratio {_ratio_text(paired['ratio_p50'])} (median of {paired['pairs']} alternating pairs, "
                   f"p10-p90 {paired['ratio_p10']:.3f}-{paired['ratio_p90']:.3f})")
    else:
        latency = f"latency ratio {_ratio_text(comparison['latency_50_percentile']['ratio'])} (ratio of the medians)"
    parts += [
        "",
        (f"{latency} vs matrix FLOP ratio {_ratio_text(flop_ratio)}; the FLOP ratio is no limit by itself: the "
         f"time outside the factorised sites does not shrink (see the achievable ratio)."),
    ]
    if "op_types" in comparison:
        parts += ["", "Time per op type (ms per run)"]
        op_rows = [
            [op, f"{v['a']:.3f}", f"{100 * v['a_share']:.1f}%", f"{v['b']:.3f}", f"{100 * v['b_share']:.1f}%",
             _ratio_text(v["ratio"])]
            for op, v in list(comparison["op_types"].items())[:TOP_OP_TYPES]
        ]
        headers = ["op type", f"{names[0]} ms", "share", f"{names[1]} ms", "share", "ratio"]
        parts.append(_table(headers, op_rows))
    return "\n".join(parts)
