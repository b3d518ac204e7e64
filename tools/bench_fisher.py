"""Cost of Fisher statistics relative to plain inference, on a synthetic transformer.

Builds a BERT-shaped ONNX model with random weights, then times
  (a) a plain ONNX Runtime forward pass, and
  (b) forward with exposed intermediates + numpy backward from Gaussian seeds + per-sample Fisher
      accumulation for every MatMul site,
and prints the ratio (b)/(a) and the peak resident memory.

    python tools/bench_fisher.py [--hidden 256 --layers 4 --seq 64 --batch 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from onnx_fwlr.backward import GradientRunner
from onnx_fwlr.fisher import accumulate_fisher, gaussian_seeds, new_accumulator


def build_transformer(hidden=256, layers=4, heads=4, ffn=1024, vocab=1000, seq=64, seed=0):
    """BERT-style encoder as PyTorch exports it; returns (model, output name, [(site input, site output, K, N)])."""
    rng = np.random.default_rng(seed)
    inits, nodes, sites = [], [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def layer_norm(x, name):
        return node("LayerNormalization", [x, const(name + ".g", np.ones(hidden)), const(name + ".b", np.zeros(hidden))],
                    name, axis=-1, epsilon=1e-12)

    def linear(x, name, k, n):
        mm = node("MatMul", [x, const(name + ".W", rng.normal(0, k ** -0.5, (k, n)))], name + ".mm")
        sites.append((x, mm, k, n))
        return node("Add", [mm, const(name + ".bias", np.zeros(n))], name)

    dh = hidden // heads
    x = node("Add", [node("Gather", [const("word_emb", rng.normal(0, 1, (vocab, hidden))), "input_ids"], "emb"),
                     const("pos_emb", rng.normal(0, 0.1, (seq, hidden)))], "emb_pos")
    x = layer_norm(x, "ln0")
    mask = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    bias = node("Mul", [node("Sub", [const("one", 1.0), mask], "inv_mask"), const("neg", -1e4)], "mask_bias2d")
    bias = node("Unsqueeze", [bias, const("mask_axes", [1, 2], np.int64)], "mask_bias")
    heads_shape = const("heads_shape", [0, 0, heads, dh], np.int64)
    for li in range(layers):
        p = f"l{li}"
        q, k, v = (node("Transpose", [node("Reshape", [linear(x, f"{p}.{n}", hidden, hidden), heads_shape],
                                           f"{p}.{n}.r")], f"{p}.{n}.t", perm=perm)
                   for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])))
        scores = node("Div", [node("MatMul", [q, k], p + ".qk"), const(p + ".sqrt_dh", np.sqrt(dh))], p + ".scaled")
        probs = node("Softmax", [node("Add", [scores, bias], p + ".masked")], p + ".probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], p + ".ctx_h")], p + ".ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, const(p + ".flat", [0, 0, hidden], np.int64)], p + ".ctx")
        x = layer_norm(node("Add", [x, linear(ctx, p + ".o", hidden, hidden)], p + ".res1"), p + ".ln1")
        h = linear(x, p + ".ffn1", hidden, ffn)
        cdf = node("Add", [node("Erf", [node("Div", [h, const(p + ".sqrt2", np.sqrt(2.0))], p + ".hs")], p + ".erf"),
                           const(p + ".one", 1.0)], p + ".erf1")
        gelu = node("Mul", [node("Mul", [h, cdf], p + ".hcdf"), const(p + ".half", 0.5)], p + ".gelu")
        x = layer_norm(node("Add", [x, linear(gelu, p + ".ffn2", ffn, hidden)], p + ".res2"), p + ".ln2")
    graph = helper.make_graph(
        nodes, "transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", seq])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", seq, hidden])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model, x, sites


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=None, help="default 4 x hidden")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=7, help="timed repetitions (medians are reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for ONNX Runtime and BLAS alike (default: their own defaults)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        return run(args)


def session_options(threads, spinning):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def run(args):
    ffn = args.ffn or 4 * args.hidden

    model, output, sites = build_transformer(args.hidden, args.layers, args.heads, ffn, seq=args.seq)
    rng = np.random.default_rng(0)
    mask = np.ones((args.batch, args.seq), dtype=np.int64)
    mask[: args.batch // 2, -args.seq // 4:] = 0  # half the samples padded
    feed = {"input_ids": rng.integers(0, 1000, (args.batch, args.seq)), "attention_mask": mask}

    session = ort.InferenceSession(model.SerializeToString(), session_options(args.threads, spinning=True),
                                   providers=["CPUExecutionProvider"])
    runner = GradientRunner(model, output, [y for _, y, _, _ in sites], extra_outputs=[x for x, _, _, _ in sites],
                            session_options=session_options(args.threads, spinning=False))
    fisher = {y: new_accumulator(k, n, with_gram=False) for _, y, k, n in sites}
    with_gram = {y: new_accumulator(k, n, with_gram=True) for _, y, k, n in sites}
    times = {key: [] for key in ("plain", "forward", "backward", "fisher", "fisher_and_gram")}

    def clock(key, fn):
        start = time.perf_counter()
        result = fn()
        times[key].append(time.perf_counter() - start)
        return result

    # Interleaved, so that load from other processes hits every stage alike; the first round warms up.
    for _ in range(args.iters + 1):
        clock("plain", lambda: session.run(None, feed))
        values = clock("forward", lambda: runner.forward(feed))
        seed = gaussian_seeds(values[output].shape, 1, rng, weight=mask)[0]
        grads = clock("backward", lambda: runner.backward(values, seed))
        clock("fisher", lambda: [accumulate_fisher(fisher[y], values[x], grads[y]) for x, y, _, _ in sites])
        clock("fisher_and_gram", lambda: [accumulate_fisher(with_gram[y], values[x], grads[y]) for x, y, _, _ in sites])
        del values, grads
    med = {key: float(np.median(t[1:])) for key, t in times.items()}
    step = med["forward"] + med["backward"] + med["fisher"]
    step_gram = med["forward"] + med["backward"] + med["fisher_and_gram"]
    result = {
        "config": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "ffn": ffn, "seq": args.seq,
                   "batch": args.batch, "iters": args.iters, "sites": len(sites), "threads": args.threads},
        "median_s": med,
        "fisher_step_s": step,
        "fisher_step_with_gram_s": step_gram,
        "ratio": step / med["plain"],
        "ratio_with_gram": step_gram / med["plain"],
        "peak_rss_mib": peak_rss_mib(),
        "exposed_tensors": len(runner.fetch_names),
    }
    print(f"model: hidden {args.hidden}, ffn {ffn}, layers {args.layers}, seq {args.seq}, batch {args.batch}, "
          f"{len(sites)} MatMul sites, threads {args.threads or 'default'}; medians of {args.iters} runs")
    rows = [("plain ORT forward", med["plain"]), ("forward, intermediates exposed", med["forward"]),
            ("numpy backward (Gaussian seed)", med["backward"]), ("Fisher row/col accumulation", med["fisher"]),
            ("  same + grad_gram (kfac)", med["fisher_and_gram"]),
            ("Fisher step", step), ("Fisher step + grad_gram", step_gram)]
    print(f"{'stage':34s} {'seconds':>9s} {'x plain':>8s}")
    for name, seconds in rows:
        print(f"{name:34s} {seconds:9.4f} {seconds / med['plain']:7.2f}x")
    print(f"ratio Fisher step / plain forward: {result['ratio']:.2f}x (target <= 5x); "
          f"with grad_gram {result['ratio_with_gram']:.2f}x; peak RSS {result['peak_rss_mib']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
