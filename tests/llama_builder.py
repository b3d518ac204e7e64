"""The tiny LLaMA-shaped decoders the language-model tests share, built by tools/make_random_llama.py (the same
code that writes the 1.1 B benchmark model), loaded from its file: tools/ is not a package."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_random_llama", ROOT / "tools" / "make_random_llama.py")
llama = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llama)

TINY = dict(hidden=32, layers=2, intermediate=64, vocab=96, heads=4, kv_heads=2)


def write_tiny_calibration(folder: Path) -> Path:
    """12 rows of 16 random tokens of TINY's vocabulary."""
    return llama.write_calibration(folder / "calib.npz", TINY["vocab"], rows=12, seq=16)


def build_tiny(path: Path, tie: str) -> Path:
    """A TINY decoder (seed 3) whose head is a copy of its table (tie "copy"), reads it transposed ("transpose")
    or has weights of its own ("none")."""
    return llama.build(path, TINY, tie=tie, seed=3)
