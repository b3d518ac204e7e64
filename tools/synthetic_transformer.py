"""A BERT-style encoder ONNX graph with random weights, shaped like PyTorch's opset-17 export.

Used by tests and benchmarks as a stand-in for a real sentence-transformer (no download needed).
With low_rank_decay the MatMul weights have an exponentially decaying singular spectrum, so
low-rank compression has something real to find.

    python tools/synthetic_transformer.py --hidden 64 --layers 2 -o /tmp/bert_tiny.onnx
"""

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the builder is shared with the tests

from transformer_builder import build_transformer, make_token_batch  # noqa: E402

__all__ = ["build_transformer", "make_token_batch"]


def main():
    parser = argparse.ArgumentParser(description="Write a synthetic BERT-style encoder ONNX model.")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-low-rank-decay", action="store_true",
                        help="plain Gaussian weights instead of a decaying singular spectrum")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    model = build_transformer(args.hidden, args.layers, args.heads, args.ffn, args.vocab,
                              args.max_len, args.seed, not args.no_low_rank_decay)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(args.output))
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
