"""Damage of one site factorised alone at small ranks (every other site dense): the measurement behind the
uniform rank floor (methods.allocation.MIN_UNIFORM_RANK, docs/defaults.md).

    python tools/bench_rank_floor.py                       # digits MLP, plus the synthetic transformer
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from onnx_fwlr.api import Budget, build, ensure_decompositions, prepare, validate
from onnx_fwlr.methods.allocation import break_even_rank

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def single_site_table(model, calib, val, metric, name_parts, ranks, methods=("svd", "whiten")):
    for method in methods:
        prepared = prepare(str(model), method=method, calibration=str(calib) if method != "svd" else None,
                           progress=False)
        ensure_decompositions(prepared)
        for index, site in enumerate(prepared.sites):
            if not any(part in site.name for part in name_parts):
                continue
            cells = []
            for rank in [r for r in ranks if r <= break_even_rank(site.K, site.N)]:
                only = [rank if j == index else None for j in range(len(prepared.sites))]
                compressed, _ = build(prepared, only, "uniform", Budget(ratio=1))
                cells.append(f"{rank}: {metric(validate(str(model), compressed, str(val), progress=False))}")
            print(f"{method:6s} {site.name} ({site.K}x{site.N})  " + "  ".join(cells), flush=True)


def transformer(folder: Path) -> Path:
    tool = ROOT / "tools" / "synthetic_transformer.py"
    subprocess.run([sys.executable, str(tool), "--hidden", "64", "--layers", "2", "--ffn", "128", "--vocab", "500",
                    "--max-len", "32", "-o", str(folder / "bert.onnx")], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("synthetic_transformer", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, n, seed in (("bert_calib", 64, 1), ("bert_val", 32, 2)):
        np.savez(folder / f"{name}.npz", **module.make_token_batch(n, 16, 500, seed=seed))
    return folder / "bert.onnx"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,3,4,6,8,9,12,16,24")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    print("digits MLP: test accuracy (original 97.4 %)")
    single_site_table(SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_calib.npz", SAMPLES / "digits_test.npz",
                      lambda v: f"{100 * v.compressed_accuracy:.1f} %", ["fc1", "fc2", "head"], ranks)
    with tempfile.TemporaryDirectory() as folder:
        model = transformer(Path(folder))
        print("synthetic transformer: mean cosine of the first output")
        single_site_table(model, Path(folder) / "bert_calib.npz", Path(folder) / "bert_val.npz",
                          lambda v: f"{v.outputs[0].mean_cosine:.3f}",
                          ["layer.0/attention/self/value", "layer.1/output/dense"], ranks)


if __name__ == "__main__":
    main()
