"""What dynamic int8 does to a model on this CPU: ONNX Runtime's `quantize_dynamic` per channel with full 8-bit
weights and with 7-bit ones (reduce_range), judged against the fp32 original on held-out data, next to the
probe's verdict on this CPU's u8s8 kernels (onnx_fwlr.quant.int8_kernels) and its flags.

    python tools/bench_int8_cpu.py                                   # the digits sample (classifier: cosine, accuracy)
    python tools/bench_int8_cpu.py --lm /work/cache/smollm2          # a language model folder: model.onnx, eval.npz
    python tools/bench_int8_cpu.py --lm DIR --json out.json

On a CPU whose kernels saturate (AVX2 without VNNI) the 8-bit row is what a user of `quantize_dynamic`'s
defaults gets there; the 7-bit row is what onnx_fwlr writes there. On a VNNI/AMX CPU both are exact integer
arithmetic and differ only by the weights' step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from onnx_fwlr.tables import format_table


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "vnni" in f or f in ("avx2", "avx512f", "amx_int8"))


def quantized(model_path: Path, folder: Path, reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder / f"int8_{'7bit' if reduce_range else '8bit'}.onnx"
    external = Path(str(model_path) + ".data").exists()
    quantize_dynamic(str(model_path), str(out), per_channel=True, weight_type=QuantType.QInt8,
                     reduce_range=reduce_range, use_external_data_format=external)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", type=Path, help="folder with model.onnx and eval.npz (input_ids, attention_mask)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from onnx_fwlr.io.runtime import silence_onnxruntime
    from onnx_fwlr.quant.int8_kernels import probe_saturation

    silence_onnxruntime()
    start = time.perf_counter()
    saturates = probe_saturation()
    probe_ms = 1000 * (time.perf_counter() - start)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.lm:
            from onnx_fwlr.evaluate.language import validate_language

            model, data = args.lm / "model.onnx", args.lm / "eval.npz"
            for reduce_range in (False, True):
                path = quantized(model, Path(tmp), reduce_range)
                m = validate_language(str(model), str(path), str(data), batch_size=args.batch_size, progress=False)
                rows.append({"weights": "7-bit (reduce_range)" if reduce_range else "8-bit",
                             "perplexity_original": m.original_perplexity, "perplexity": m.compressed_perplexity,
                             "kl": m.kl_divergence, "top1_agreement": m.top1_agreement})
            headers = ["int8 weights", "ppl original", "ppl int8", "KL", "top-1 agree"]
            table = [[r["weights"], f"{r['perplexity_original']:.3f}", f"{r['perplexity']:.4g}", f"{r['kl']:.4f}",
                      f"{r['top1_agreement']:.4f}"] for r in rows]
        else:
            from onnx_fwlr.api import validate

            model, data = ROOT / "sample_models" / "digits_mlp.onnx", ROOT / "sample_models" / "digits_test.npz"
            for reduce_range in (False, True):
                path = quantized(model, Path(tmp), reduce_range)
                check = validate(str(model), str(path), str(data), progress=False)
                out = check.outputs[0]
                rows.append({"weights": "7-bit (reduce_range)" if reduce_range else "8-bit",
                             "mean_cosine": out.mean_cosine, "min_cosine": out.min_cosine,
                             "accuracy": check.compressed_accuracy, "original_accuracy": check.original_accuracy})
            headers = ["int8 weights", "mean cos", "min cos", "accuracy", "original"]
            table = [[r["weights"], f"{r['mean_cosine']:.6f}", f"{r['min_cosine']:.6f}", f"{r['accuracy']:.4f}",
                      f"{r['original_accuracy']:.4f}"] for r in rows]
    print(f"CPU flags: {' '.join(cpu_flags()) or 'n/a'}; probe ({probe_ms:.0f} ms): u8s8 kernels "
          f"{'SATURATE' if saturates else 'exact'} on 8-bit weights")
    print(format_table(headers, table, align="l" + "r" * (len(headers) - 1)))
    if args.json:
        args.json.write_text(json.dumps({"cpu_flags": cpu_flags(), "saturates": saturates, "rows": rows},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
