"""Dynamic int8 with its largest input channels in float, site by site: fidelity and latency against ORT int8.

    python tools/bench_int8_outliers.py --cache /work/cache               # MiniLM: .../minilm (tools/export_minilm.py)
    python tools/bench_int8_outliers.py --cache /work/cache --pairs 40 --json out.json

Every MatMul weight is stored as ONNX Runtime's `quantize_dynamic` int8 (and the embedding tables as its int8
Gather), as in ONNX Runtime's own int8 model; the sites whose node name contains a pattern of `--patterns` take
their `--channels` largest input channels (measured on the first 256 calibration sentences) out of the int8
input (`int8 dynamic oK`, quant.graph.rewrite: `X · keep` into the int8 MatMul, `Gather(X, channels) @ W[channels]`
in float). Rows: the mean / min cosine of `sentence_embedding` with the original's on the 512 held-out sentences
(batches of 32, trimmed to their longest sentence), and the latency over ONNX Runtime's int8 model at batch 1 and
32 (`--pairs` alternating pairs in one process, cost.limits.paired_ratio, 1 thread). This is the hand-built sweep
behind docs/speed.md's "int8 with outlier channels"; `--quantize int8 --target-latency` picks such sites by
predicted loss per millisecond instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from onnx_fwlr.cost.limits import paired_ratio  # noqa: E402
from onnx_fwlr.io.data import open_data  # noqa: E402
from onnx_fwlr.quant.calibration import collect_quant_stats  # noqa: E402
from onnx_fwlr.quant.embedding import find_tables  # noqa: E402
from onnx_fwlr.quant.graph import SitePlan, rewrite  # noqa: E402
from onnx_fwlr.quant.ortquant import INT8_DYNAMIC, ort_int8_model  # noqa: E402
from onnx_fwlr.sites.find import find_sites  # noqa: E402
from onnx_fwlr.tables import format_table  # noqa: E402

PATTERNS = ("layer.0/output/dense", "output/dense", "intermediate/dense", "dense", "/")


def embeddings(model, held_out) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    found = []
    for start in range(0, len(held_out["input_ids"]), 32):
        feed = {k: v[start:start + 32] for k, v in held_out.items()}
        width = int(feed["attention_mask"].sum(1).max())
        found.append(session.run(["sentence_embedding"], {k: v[:, :width] for k, v in feed.items()})[0])
    return np.concatenate(found)


def cosines(out: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    cos = np.sum(out * reference, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
    return float(cos.mean()), float(cos.min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(ROOT / ".cache"), help="folder given to tools/export_minilm.py")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="node-name patterns of the sites with outliers")
    p.add_argument("--channels", default="1,4", help="input channels taken out of the int8 input")
    p.add_argument("--pairs", type=int, default=40, help="alternating pairs against ORT int8 per batch size (0: none)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    folder = Path(args.cache) / "minilm"
    model = onnx.load(folder / "minilm.onnx")
    held_out = dict(np.load(folder / "eval.npz"))
    reference = embeddings(model, held_out)
    sites = find_sites(model)[0]
    inputs = sorted({s.uses[0].input for s in sites})
    arrays = dict(np.load(folder / "calib.npz"))
    calib = [{k: v[start:start + 32] for k, v in arrays.items()} for start in range(0, 256, 32)]
    stats = collect_quant_stats(model, [], inputs, open_data(calib, model, batch_size=32), loss=None,
                                progress=False)
    tables = {t.name: INT8_DYNAMIC for t in find_tables(model, exclude={s.weight for s in sites})}
    rows, load = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_outliers_") as scratch:
        int8 = ort_int8_model(model)
        int8_path = Path(scratch) / "int8.onnx"
        onnx.save(int8, int8_path)
        feeds = {b: {k: v[:b] for k, v in held_out.items()} for b in (1, 32)}
        rows.append({"model": "ORT int8 dynamic per-channel", "sites": 0, "bytes": int8.ByteSize(),
                     **dict(zip(("cos_mean", "cos_min"), cosines(embeddings(int8, held_out), reference)))})
        for count in (int(c) for c in args.channels.split(",")):
            for pattern in args.patterns.split(","):
                plans, chosen = {}, 0
                for site in sites:
                    if pattern in site.name:
                        channels = np.sort(stats.largest_channels(site.uses[0].input)[:count])
                        plans[site.weight] = SitePlan(INT8_DYNAMIC.with_outliers(count), outliers=channels)
                        chosen += 1
                    else:
                        plans[site.weight] = SitePlan(INT8_DYNAMIC)
                ours = rewrite(model, plans, tables)
                row = {"model": f"o{count} at sites matching '{pattern}'", "sites": chosen, "bytes": ours.ByteSize(),
                       **dict(zip(("cos_mean", "cos_min"), cosines(embeddings(ours, held_out), reference)))}
                if args.pairs:
                    path = Path(scratch) / "ours.onnx"
                    onnx.save(ours, path)
                    for batch, feed in feeds.items():
                        found = paired_ratio(int8_path, path, feed, runs=args.pairs, threads=1)
                        row[f"b{batch}"] = [found["ratio_p50"], found["ratio_p10"], found["ratio_p90"]]
                print(f"  {row['model']}: {row['sites']} sites, cos {row['cos_mean']:.5f}", file=sys.stderr)
                rows.append(row)
    headers = ["model", "sites", "bytes", "cos mean", "cos min"] + ([f"vs ORT int8, b{b} (p10-p90)" for b in (1, 32)]
                                                                   if args.pairs else [])
    lines = [[r["model"], str(r["sites"]), f"{r['bytes']:,}", f"{r['cos_mean']:.5f}", f"{r['cos_min']:.4f}"]
             + ([f"{r[k][0]:.3f} ({r[k][1]:.2f}-{r[k][2]:.2f})" if k in r else "1" for k in ("b1", "b32")]
                if args.pairs else []) for r in rows]
    print(format_table(headers, lines, align="lrrrr" + "r" * (2 if args.pairs else 0)))
    print(f"load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; 1 thread")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
