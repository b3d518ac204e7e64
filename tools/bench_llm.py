"""A decoder language model against what a user would run instead: ONNX Runtime's own quantizers and ours.

    python tools/export_smollm2.py --cache /work/cache        # once: /work/cache/smollm2
    python tools/bench_llm.py --dir /work/cache/smollm2 --json /tmp/bench_llm.json

One row per way of making the model smaller; each is made in its own child process (wall seconds and peak RSS,
VmHWM, of that process), then judged against the original on the held-out rows (eval.npz, every real token
with a real next token): bytes on disk (model + external data), perplexity, mean KL(original || compressed)
per token, next-token top-1 agreement. `--decode` adds greedy decode speed through the KV cache at batch 1
(tokens/s; the with-past model quantized the same way, or for ours written by `compress --also`).

Rows (`--rows` picks some, by key):
    original            the fp32 export
    ort-int4            MatMulNBitsQuantizer int4, block 32, RTN (its default algorithm, asymmetric),
                        accuracy_level 4; the embedding table stays fp32
    ort-kquant, ort-hqq its k-quant / HQQ algorithms (reported as not run when this install lacks what they need)
    ort-int8-weight     MatMulNBitsQuantizer bits=8, block 32, accuracy_level 4 (weight-only 8-bit)
    ort-int8-dynamic    quantize_dynamic, per channel, QInt8 (activations quantized per tensor at run time)
    whiten-R, kfac-R    `onnx-fwlr compress --ratio R --method whiten|kfac --calib calib.npz` (R in --ratios)
    auto-int4, auto-half  `onnx-fwlr compress --quantize auto --target-size B` at ORT int4's bytes / half of them
    KEY (--ours)        `onnx-fwlr compress` with the flags given (`--ours KEY=FLAGS`, repeatable)

A child whose resident memory passes --max-memory is stopped (the row says so), so the shared machine's
out-of-memory killer never picks another process. Goals (issue 25) are printed as PASS / FAIL / not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

RATIOS = (0.9, 0.8, 0.7)
PAIRS = 3  # decode timings alternate row / original this many times; the median ratio is reported
ORT_ROWS = ("ort-int4", "ort-kquant", "ort-hqq", "ort-int8-weight", "ort-int8-dynamic")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/work/cache/smollm2"),
                        help="folder written by tools/export_smollm2.py (model.onnx, model_with_past.onnx, calib.npz, "
                             "eval.npz)")
    parser.add_argument("--prefix", default="model",
                        help="file names in --dir: PREFIX.onnx and PREFIX_with_past.onnx (default model; the shipped "
                             "sample_models/decoder: decoder)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_llm"), help="folder for the models made here")
    parser.add_argument("--rows", help="comma-separated row keys (default: all)")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="low-rank ratios (default 0.9,0.8,0.7)")
    parser.add_argument("--max-memory", type=float, default=9.0, metavar="GB",
                        help="stop a child whose resident memory passes this (default 9 GB)")
    parser.add_argument("--decode", action="store_true", help="also time greedy decoding through the KV cache")
    parser.add_argument("--decode-steps", type=int, default=32, help="tokens generated per decode timing (default 32)")
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads for the decode timing (default 1: steady on a busy machine)")
    parser.add_argument("--decode-pairs", type=int, default=PAIRS,
                        help="--decode-only: back-to-back pairs with the original per row (default 3)")
    parser.add_argument("--decode-only", action="store_true",
                        help="only time decoding of the original and of the rows' models already in --work")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation rows per ONNX Runtime run (default 8)")
    parser.add_argument("--reuse", action="store_true", help="reuse models already in --work (no rebuild)")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=FLAGS",
                        help="another row of ours: `onnx-fwlr compress` with these flags (repeatable), e.g. "
                             "'int4acc4=--quantize int4 --accuracy-level 4 --rank 8'")
    parser.add_argument("--stats-memory", metavar="SIZE",
                        help="passed to our `--quantize auto` rows (`onnx-fwlr compress --stats-memory`): gradient "
                             "statistics one group of sites per pass, for bounded memory")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------- children: make one model, report time and memory

def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def save_external(model, path: Path) -> None:
    import onnx

    data = Path(str(path) + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)


def ort_nbits(source: Path, out: Path, bits: int, algorithm: str) -> None:
    """MatMulNBitsQuantizer on the whole model, as a user runs it (RTN default, k-quant or HQQ)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    config = None
    if algorithm == "kquant":
        config = mnq.KQuantWeightOnlyQuantConfig()
    elif algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=32, bits=bits)
    import onnx

    # the model with its weights loaded: from a path, some algorithms keep untouched tensors pointing at the
    # source's external data file, which the saved copy then lacks
    quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=32, accuracy_level=4,
                                         algo_config=config)
    quantizer.process()
    save_external(quantizer.model.model, out)


def ort_dynamic(source: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    Path(str(out) + ".data").unlink(missing_ok=True)
    quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8,
                     use_external_data_format=True)


def child(spec: dict) -> None:
    """Make one model (and its with-past form when asked), then print time and peak memory as JSON."""
    start = time.perf_counter()
    kind, source, out = spec["kind"], Path(spec["source"]), Path(spec["out"])
    pairs = [(source, out)] + ([(Path(spec["past_source"]), Path(spec["past_out"]))] if spec.get("past_out") else [])
    if kind == "cli":
        from onnx_fwlr.api import cli_main

        code = cli_main(spec["argv"])
        if code not in (0, 1):
            sys.exit(code)
        seconds, peak = time.perf_counter() - start, vm_hwm_mib()
    else:  # the no-cache model's time and memory; the with-past model (for --decode) is made after them
        for index, (src, dst) in enumerate(pairs):
            if kind == "ort-dynamic":
                ort_dynamic(src, dst)
            else:
                ort_nbits(src, dst, spec["bits"], spec["algorithm"])
            if index == 0:
                seconds, peak = time.perf_counter() - start, vm_hwm_mib()
    print("CHILD " + json.dumps({"seconds": seconds, "peak_rss_mib": peak}))


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(spec: dict, max_gb: float) -> dict:
    """The child's JSON, or {'error': why} (its last error line; or the memory limit it passed)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        # files, not pipes: a child writing more than a pipe holds would block while this loop only polls
        process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=out_file,
                                   stderr=err_file, text=True)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, rss_mib(process.pid))
            if peak > max_gb * 1024:
                process.kill()
                process.wait()
                return {"error": f"stopped at {peak / 1024:.1f} GB resident (over --max-memory {max_gb:g} GB)"}
            time.sleep(0.5)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    # a progress bar without a newline may share the line: the JSON is whatever follows "CHILD "
    line = next((ln[ln.index("CHILD "):] for ln in out.splitlines() if "CHILD {" in ln), None)
    if process.returncode != 0 or line is None:
        lines = [ln for ln in (err + out).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "no output")
        return {"error": reason.strip()[:300]}
    return json.loads(line[len("CHILD "):])


# ---------------------------------------------------------------- the rows

def row_specs(args, int4_bytes: int | None) -> list[dict]:
    """What each row runs; auto rows need ORT int4's bytes (measured first)."""
    d, w = args.dir, args.work
    model, past, calib = d / f"{args.prefix}.onnx", d / f"{args.prefix}_with_past.onnx", d / "calib.npz"
    specs = []

    def ort(key, kind, bits=4, algorithm="rtn", label=""):
        spec = {"key": key, "label": label, "kind": kind, "bits": bits, "algorithm": algorithm,
                "source": str(model), "out": str(w / f"{key}.onnx")}
        if args.decode:
            spec |= {"past_source": str(past), "past_out": str(w / f"{key}_past.onnx")}
        specs.append(spec)

    ort("ort-int4", "ort-nbits", 4, "rtn", "ORT int4 b32 RTN, accuracy_level 4")
    ort("ort-kquant", "ort-nbits", 4, "kquant", "ORT int4 k-quant")
    ort("ort-hqq", "ort-nbits", 4, "hqq", "ORT int4 b32 HQQ")
    ort("ort-int8-weight", "ort-nbits", 8, "rtn", "ORT int8 weight-only (MatMulNBits bits=8, b32, acc 4)")
    ort("ort-int8-dynamic", "ort-dynamic", label="ORT quantize_dynamic int8 per channel")

    def ours(key, label, flags):
        out = w / f"{key}.onnx"
        argv = ["compress", str(model), "-o", str(out), "--calib", str(calib), "--external-data", "--force",
                "--quiet", "--json", str(w / f"{key}.json"), *flags]
        if args.decode:  # the with-past export with the same factors, or the same quantized weights (issue 26)
            argv += ["--also", f"{past}={w / f'{key}_past.onnx'}"]
        specs.append({"key": key, "label": label, "kind": "cli", "argv": argv, "source": str(model),
                      "out": str(out), "past_out": None})

    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in ("kfac", "whiten"):
            ours(f"{method}-{ratio:g}", f"ours {method} low rank {ratio:g}",
                 ["--ratio", str(ratio), "--method", method])
    for item in args.ours:
        key, _, flags = item.partition("=")
        ours(key, f"ours {flags}", flags.split())
    if int4_bytes:
        memory = ["--stats-memory", args.stats_memory] if args.stats_memory else []
        ours("auto-int4", f"ours --quantize auto at ORT int4's bytes ({int4_bytes:,})",
             ["--quantize", "auto", "--target-size", str(int4_bytes), *memory])
        ours("auto-half", f"ours --quantize auto at half ORT int4's bytes ({int4_bytes // 2:,})",
             ["--quantize", "auto", "--target-size", str(int4_bytes // 2), *memory])
    return specs


def original_logits(args):
    """The original's logits on eval.npz, computed once and kept in --work as a memory-mapped .npy (float32): every
    row is then judged by running only its own model."""
    import numpy as np

    from onnx_fwlr.io import runtime

    path = args.work / f"{args.prefix}_original_logits.npy"
    with np.load(args.dir / "eval.npz") as rows:
        feed = {k: rows[k] for k in rows.files}
    if path.is_file():
        cached = np.load(path, mmap_mode="r")
        if cached.shape[:2] == feed["input_ids"].shape:
            return cached, feed
    session = runtime.make_session(str(args.dir / f"{args.prefix}.onnx"), runtime.session_options(), runtime.CPU,
                                   role="original model")
    first = session.run(["logits"], {k: v[:1] for k, v in feed.items()})[0]
    scratch = path.with_suffix(".tmp.npy")
    cached = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32,
                                       shape=feed["input_ids"].shape + first.shape[-1:])
    for start in range(0, cached.shape[0], args.batch_size):
        part = {k: v[start:start + args.batch_size] for k, v in feed.items()}
        cached[start:start + args.batch_size] = session.run(["logits"], part)[0]
    cached.flush()
    del cached
    scratch.rename(path)
    return np.load(path, mmap_mode="r"), feed


def evaluate(args, path: Path) -> dict:
    """Perplexity, KL and top-1 agreement of the model at ``path`` against the original's cached logits (the same
    sums as evaluate.language.compare_language_models)."""
    import numpy as np

    from onnx_fwlr.autodiff.losses import next_token_targets
    from onnx_fwlr.evaluate.language import _Sums
    from onnx_fwlr.io import runtime
    from onnx_fwlr.io.model import file_size

    reference, feed = original_logits(args)
    is_original = Path(path).resolve() == (args.dir / f"{args.prefix}.onnx").resolve()
    session = None if is_original else runtime.make_session(str(path), runtime.session_options(), runtime.CPU,
                                                            role="compressed model")
    sums = _Sums()
    for start in range(0, reference.shape[0], args.batch_size):
        part = {k: v[start:start + args.batch_size] for k, v in feed.items()}
        ref = np.asarray(reference[start:start + args.batch_size])
        out = ref if session is None else session.run(["logits"], part)[0]
        targets, keep = next_token_targets(part["input_ids"], part.get("attention_mask"))
        sums.add(ref, out, targets, keep)
    metrics = sums.result()
    return {"bytes": file_size(path), "perplexity": metrics.compressed_perplexity,
            "original_perplexity": metrics.original_perplexity, "perplexity_ratio": metrics.perplexity_ratio,
            "kl": metrics.kl_divergence, "top1_agreement": metrics.top1_agreement, "tokens": metrics.tokens}


def decode(args, past: Path, no_cache: Path | None) -> float | None:
    import numpy as np

    from onnx_fwlr.evaluate.language import decode_speed

    if not past.is_file():
        return None
    with np.load(args.dir / "eval.npz") as rows:
        prompt = rows["input_ids"][:1, :16]
    return decode_speed(str(past), prompt, args.decode_steps, no_cache=None if no_cache is None else str(no_cache),
                        threads=args.decode_threads)["tokens_per_second"]


def measure(args, spec: dict) -> dict:
    row = {"key": spec["key"], "label": spec["label"]}
    out = Path(spec["out"])
    if not (args.reuse and out.is_file()):
        made = run_child(spec, args.max_memory)
        if "error" in made:
            print(f"  {spec['key']}: not run: {made['error']}", flush=True)
            return row | made
        row |= {"seconds": made["seconds"], "peak_rss_mib": made["peak_rss_mib"]}
    report = Path(str(out).replace(".onnx", ".json"))
    if spec["kind"] == "cli" and report.is_file():  # what the CLI did (kfac may fall back to whiten)
        summary = json.loads(report.read_text())
        row |= {"method": summary.get("method"), "allocation": summary.get("allocation"),
                "warnings": summary.get("warnings", [])[:3]}
    row |= evaluate(args, out)
    if args.decode:
        past = Path(spec.get("past_out") or str(out).replace(".onnx", "_past.onnx"))
        row["decode_tokens_per_second"] = decode(args, past, out)
    print(f"  {spec['key']}: {format_row(row)}", flush=True)
    return row


def format_row(row: dict) -> str:
    if "error" in row:
        return f"not run ({row['error']})"
    parts = [f"{row['bytes'] / 1e6:.1f} MB", f"ppl {row['perplexity']:.2f} ({row['perplexity_ratio']:.3f}x)",
             f"KL {row['kl']:.4f}", f"top-1 {100 * row['top1_agreement']:.1f} %"]
    if row.get("seconds") is not None:
        parts += [f"{row['seconds']:.0f} s", f"{row['peak_rss_mib'] / 1024:.2f} GB peak"]
    if row.get("decode_tokens_per_second"):
        parts.append(f"{row['decode_tokens_per_second']:.1f} tok/s")
    return ", ".join(parts)


def table(rows: list[dict]) -> str:
    header = ["row", "MB", "perplexity", "ratio", "KL", "top-1 agree", "wall s", "peak RSS GB", "decode tok/s"]
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["label"], "-", "-", "-", "-", "-", "-", "-", f"not run: {row['error'][:60]}"])
            continue
        lines.append([row["label"], f"{row['bytes'] / 1e6:.1f}", f"{row['perplexity']:.2f}",
                      f"{row['perplexity_ratio']:.3f}", f"{row['kl']:.4f}", f"{100 * row['top1_agreement']:.1f} %",
                      "-" if row.get("seconds") is None else f"{row['seconds']:.0f}",
                      "-" if row.get("peak_rss_mib") is None else f"{row['peak_rss_mib'] / 1024:.2f}",
                      f"{row['decode_tokens_per_second']:.1f}" if row.get("decode_tokens_per_second") else "-"])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def decode_goal(rows: dict) -> str:
    """Issue 26's decoder goal: a row of ours decoding at batch 1 at least as fast as ORT int4 accuracy_level 4,
    with a perplexity ratio no higher (--decode; one timing per row: confirm with --decode-only's pairs)."""
    int4 = rows.get("ort-int4")
    if int4 is None or "error" in int4 or not int4.get("decode_tokens_per_second"):
        return "not measured: ours decoding >= ORT int4 accuracy_level 4's tokens/s at <= its perplexity (--decode)"
    ours = [r for key, r in rows.items() if key != "original" and key not in ORT_ROWS and "error" not in r
            and r.get("decode_tokens_per_second")]
    good = [r for r in ours if r["perplexity_ratio"] <= int4["perplexity_ratio"]
            and r["decode_tokens_per_second"] >= int4["decode_tokens_per_second"]]
    best = max(good, key=lambda r: r["decode_tokens_per_second"]) if good else None
    text = (f"ours decoding >= ORT int4 accuracy_level 4's {int4['decode_tokens_per_second']:.1f} tok/s at <= its "
            f"perplexity ratio {int4['perplexity_ratio']:.3f}")
    return f"{'PASS' if best else 'FAIL'}: {text}" + (
        f" ({best['key']}: {best['decode_tokens_per_second']:.1f} tok/s, ratio {best['perplexity_ratio']:.3f})"
        if best else "")


def goals(rows: dict) -> list[str]:
    """Issue 25's goals on the measured rows: PASS, FAIL, or not measured (with the row that is missing)."""
    def ratio(key):
        row = rows.get(key)
        return None if row is None or "error" in row else row["perplexity_ratio"]

    int4, auto, half, kfac = ratio("ort-int4"), ratio("auto-int4"), ratio("auto-half"), ratio("kfac-0.8")
    checks = [
        ("--quantize auto at <= ORT int4's bytes within 1.05x the original's perplexity",
         None if auto is None or int4 is None else auto, lambda: auto <= 1.05 and rows["auto-int4"]["bytes"] <= rows["ort-int4"]["bytes"]),
        ("--quantize auto at half ORT int4's bytes no worse than ORT int4", None if half is None or int4 is None
         else half, lambda: half <= int4),
        ("low rank kfac at 0.8 within 1.4x the original's perplexity", kfac, lambda: kfac <= 1.4),
    ]
    return [f"{'not measured' if value is None else 'PASS' if test() else 'FAIL'}: {text}"
            + ("" if value is None else f" (measured {value:.3f}x)") for text, value, test in checks]


def saved_int4_bytes(work: Path) -> int | None:
    """ORT int4's bytes from its model in --work (the auto rows' budgets), None when it was not made there."""
    from onnx_fwlr.io.model import file_size

    return file_size(work / "ort-int4.onnx") if (work / "ort-int4.onnx").is_file() else None


def decode_rows(args, wanted) -> dict[str, tuple[Path, Path | None]]:
    """key -> (with-past model, no-cache model or None) for the original and every row whose with-past model is in
    --work (KEY_past.onnx; the auto rows too when ORT int4's model is there to size them). The prompt runs through
    KEY.onnx when that is there, else through the with-past model with an empty cache."""
    rows = {"original": (args.dir / f"{args.prefix}_with_past.onnx", args.dir / f"{args.prefix}.onnx")}
    for spec in row_specs(args, saved_int4_bytes(args.work)):
        past, no_cache = args.work / f"{spec['key']}_past.onnx", Path(spec["out"])
        if past.is_file() and (wanted is None or spec["key"] in wanted):
            rows[spec["key"]] = (past, no_cache if no_cache.is_file() else None)
    return rows


def decode_table(args, wanted) -> None:
    """tok/s through the cache at batch 1 for decode_rows, each timed alternately with the original (the
    machine's load drifts): the median ratio of the pairs."""
    rows = decode_rows(args, wanted)
    original = rows["original"]
    print(f"decode, batch 1, 16-token prompt, {args.decode_steps} tokens, {args.decode_threads} thread(s); load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    import statistics

    for key, (past, no_cache) in rows.items():
        pairs = [(decode(args, past, no_cache), decode(args, *original)) for _ in range(args.decode_pairs)]
        speed = statistics.median(p[0] for p in pairs)
        ratio = statistics.median(p[0] / p[1] for p in pairs)
        results[key] = {"tokens_per_second": speed, "vs_original": ratio, "pairs": pairs}
        print(f"  {key}: {speed:.1f} tok/s, {ratio:.2f}x the original (median of {len(pairs)} back-to-back pairs; "
              f"load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": results}, indent=1) + "\n")


def main():
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    args.dir, args.work = args.dir.resolve(), args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    wanted = None if not args.rows else {r.strip() for r in args.rows.split(",")}
    if args.decode_only:
        decode_table(args, wanted)
        return
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)", flush=True)
    results = {}
    if wanted is None or "original" in wanted:
        original = {"key": "original", "label": "original (fp32)"} | evaluate(args, args.dir / f"{args.prefix}.onnx")
        if args.decode:
            original["decode_tokens_per_second"] = decode(args, args.dir / f"{args.prefix}_with_past.onnx",
                                                          args.dir / f"{args.prefix}.onnx")
        results["original"] = original
        print(f"  original: {format_row(original)}", flush=True)
    int4_bytes = None
    for spec in row_specs(args, None):
        if spec["key"] in ORT_ROWS and (wanted is None or spec["key"] in wanted):
            results[spec["key"]] = measure(args, spec)
    if "ort-int4" in results and "error" not in results["ort-int4"]:
        int4_bytes = results["ort-int4"]["bytes"]
    else:
        int4_bytes = saved_int4_bytes(args.work)
    for spec in row_specs(args, int4_bytes):
        if spec["key"] not in ORT_ROWS and (wanted is None or spec["key"] in wanted):
            results[spec["key"]] = measure(args, spec)
            if args.json:  # after every row: a long run stopped early keeps what it measured
                Path(args.json).write_text(json.dumps({"rows": list(results.values())}, indent=1) + "\n")
    print()
    print(table(list(results.values())))
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min)")
    verdicts = goals(results) + ([decode_goal(results)] if args.decode else [])
    print("\n".join(verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": list(results.values()), "goals": verdicts}, indent=1) + "\n")


if __name__ == "__main__":
    main()
