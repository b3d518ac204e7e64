"""Shipped (already-quantized) models: what compress makes of them at half their bytes, against ONNX Runtime's
own re-quantization of the dequantized model.

    python tools/bench_shipped.py                     # every format of the synthetic MLP and the shared model
    python tools/bench_shipped.py --formats dynamic --json out.json --runs 40

Inputs are tests/shipped_builder.py's models: one float MLP (256-512-256-64, decaying spectra) shipped as
MatMulInteger (quantize_dynamic), QDQ (quantize_static), Cast+Mul int8 and 8-bit MatMulNBits, and a model whose
768x768 weight is read by 12 MatMul nodes (shipped as MatMulInteger). Rows per input: the input itself; ORT's
re-quantization of its dequantized float form (quantize_dynamic int8 per channel, MatMulNBits int4 b32 and
b128: what a user reaches with ONNX Runtime alone); ours, `compress --ratio 0.5` and `compress --quantize auto
--ratio 0.5` (kfac on 256 calibration rows). Fidelity on 256 held-out rows against the float original and
against the shipped input (mean cosine of each row's output); latency as the median ratio to the input of
alternating pairs of runs at 32 rows, one ORT thread (cost.limits.paired_ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from shipped_builder import FORMATS, data, float_mlp, quantized, shared_layers

from onnx_fwlr.api import cli_main as cli
from onnx_fwlr.api import dequantize_input, validate
from onnx_fwlr.cost.limits import paired_ratio
from onnx_fwlr.io.model import file_size
from onnx_fwlr.quant.ortquant import ort_int4_model, ort_int8_model
from onnx_fwlr.tables import format_table

OURS = {"ours --ratio 0.5": ["--ratio", "0.5"], "ours --quantize auto --ratio 0.5": ["--quantize", "auto", "--ratio", "0.5"]}


def inputs(folder: Path, names: list[str]) -> list[tuple[str, Path, Path, int]]:
    """(name, float original, shipped input, width) of each benchmark input, written to `folder`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    found = []
    for fmt in names:
        if fmt == "shared":
            float_path = folder / "shared_float.onnx"
            onnx.save(shared_layers(), float_path)
            quantize_dynamic(float_path, folder / "shared.onnx", per_channel=True, weight_type=QuantType.QInt8)
            found.append(("shared 12x (MatMulInteger)", float_path, folder / "shared.onnx", 768))
            continue
        float_path = folder / f"{fmt}_float.onnx"
        onnx.save(float_mlp(), float_path)
        onnx.save(quantized(float_mlp(), fmt, folder, data(256)), folder / f"{fmt}.onnx")
        found.append((fmt, float_path, folder / f"{fmt}.onnx", 256))
    return found


def cosine(reference, model, val: Path) -> float:
    return validate(str(reference), str(model), str(val), progress=False).outputs[0].mean_cosine


def rows_for(name, float_path, shipped, width, folder: Path, runs: int) -> list[dict]:
    calib, val = folder / f"calib{width}.npz", folder / f"val{width}.npz"
    np.savez(calib, x=data(256, width, seed=0))
    np.savez(val, x=data(256, width, seed=1))
    feed = {"x": data(32, width, seed=2)}
    source = dequantize_input(str(shipped))
    models = {"input (shipped)": shipped}
    for label, make in (("ORT int8 of the dequantized", ort_int8_model),
                        ("ORT int4 b32 of the dequantized", lambda m: ort_int4_model(m, 32)),
                        ("ORT int4 b128 of the dequantized", lambda m: ort_int4_model(m, 128))):
        path = folder / f"{name.split()[0]}_{label.split()[1]}_{label.split()[2]}.onnx"
        onnx.save(make(source.float_model), path)
        models[label] = path
    for label, flags in OURS.items():
        path = folder / f"{name.split()[0]}_{'auto' if 'auto' in label else 'plain'}.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli(["compress", str(shipped), "-o", str(path), "--calib", str(calib), "--quiet", "--force",
                        *flags])
        if code == 0:
            models[label] = path
    rows = []
    for label, path in models.items():
        timing = paired_ratio(shipped, path, feed, runs=runs, threads=1) if path != shipped else {"ratio_p50": 1.0}
        rows.append({"input": name, "model": label, "bytes": file_size(path),
                     "vs input": file_size(path) / file_size(shipped), "cos vs float": cosine(float_path, path, val),
                     "cos vs input": cosine(shipped, path, val), "latency vs input": timing["ratio_p50"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS) + ",shared")
    parser.add_argument("--runs", type=int, default=40, help="alternating pairs per latency ratio")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for entry in inputs(Path(folder), args.formats.split(",")):
            rows += rows_for(*entry, Path(folder), args.runs)
    header = ["input", "model", "bytes", "vs input", "cos vs float", "cos vs input", "latency vs input"]
    print(format_table(header, [[r["input"], r["model"], f"{r['bytes']:,}", f"{r['vs input']:.3f}",
                                 f"{r['cos vs float']:.4f}", f"{r['cos vs input']:.4f}",
                                 f"{r['latency vs input']:.2f}"] for r in rows], align="llrrrrr"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
