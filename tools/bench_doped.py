"""Doped structured matrices vs plain low rank, training-free, at equal parameter counts.

Run from the repository root:
    python tools/bench_doped.py [--ratios 0.5,0.25,0.1] [--dope 0.01] [--steps 400] [--json FILE]

Two models:
  lm      an LSTM language model (Gather embedding -> LSTM -> MatMul vocabulary head), trained here in numpy
          for --steps Adam steps on text sampled from a seeded hidden Markov model (so it is reproducible
          anywhere, no download). Structures are applied to the vocabulary head [256 x 1024]; the LSTM input
          weight, which can only take low-rank factors, gets its own low-rank table.
  digits  sample_models/digits_mlp.onnx (64 -> 256 -> 256 -> 10); structures on fc1 and fc2, the 256x10
          head kept dense.
Every structure gets the same per-site budget, ratio x K x N stored numbers (doping entries cost a value and
two indices), fits under activation statistics from calibration data, and gets the bias correction.
Reported: stored parameters of the compressed sites (compression = dense / stored), serialized model bytes,
fidelity against the original on held-out data, task quality, and ONNX Runtime latency (1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# One BLAS thread: on a shared 2-core machine OpenBLAS's spinning threads made a 256x256 SVD 50x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.io.data import open_data
from onnx_fwlr.methods.structured_fit import fit_site
from onnx_fwlr.rewrite.lowrank import Factors, apply_factors
from onnx_fwlr.sites.find import find_sites, weight_matrix
from onnx_fwlr.sites.recurrent import find_recurrent_sites
from onnx_fwlr.stats.activations import collect_activation_stats

VOCAB, EMBED, HIDDEN, SEQ = 1024, 128, 256, 32
STATES, WORDS_PER_STATE, SUCCESSORS = 48, 40, 4

# name -> (structure, metric, doped)
CONFIGS = {
    "lowrank (asvd)": ("lowrank", "diag", False),
    "lowrank (whiten)": ("lowrank", "gram", False),
    "kron": ("kron", "diag", False),
    "doped kron": ("kron", "diag", True),
    "doped lowrank (asvd)": ("lowrank", "diag", True),
    "doped lowrank (whiten)": ("lowrank", "gram", True),
}


# ------------------------------------------------------------------------------------- corpus and LM


def make_hmm(seed=0):
    """A sparse hidden Markov model over VOCAB words: each state emits ~40 words (Zipf), moves to 4 others."""
    rng = np.random.default_rng(seed)
    trans = np.zeros((STATES, STATES))
    for s in range(STATES):
        trans[s, rng.choice(STATES, SUCCESSORS, replace=False)] = rng.dirichlet(np.ones(SUCCESSORS))
    emit = np.zeros((STATES, VOCAB))
    for s in range(STATES):
        words = rng.choice(VOCAB, WORDS_PER_STATE, replace=False)
        emit[s, words] = 1.0 / np.arange(1, WORDS_PER_STATE + 1)
    return trans, emit / emit.sum(axis=1, keepdims=True)


def sample_tokens(hmm, count, length, rng):
    trans, emit = hmm
    state = rng.integers(STATES, size=count)
    tokens = np.zeros((count, length), dtype=np.int64)
    cum_t, cum_e = np.cumsum(trans, axis=1), np.cumsum(emit, axis=1)
    for t in range(length):
        tokens[:, t] = np.minimum((cum_e[state] < rng.random((count, 1))).sum(axis=1), VOCAB - 1)
        state = np.minimum((cum_t[state] < rng.random((count, 1))).sum(axis=1), STATES - 1)
    return tokens


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def lstm_forward(p, tokens):
    """Gate columns in ONNX order i, o, f, c. Returns logits [B, T, V] and the cache for the backward pass."""
    B, T = tokens.shape
    x = p["emb"][tokens]  # [B, T, E]
    zx = x @ p["Wx"] + p["b"]
    h, c = np.zeros((B, HIDDEN)), np.zeros((B, HIDDEN))
    cache, hs = [], []
    for t in range(T):
        z = zx[:, t] + h @ p["Wh"]
        i, o, f = sigmoid(z[:, :HIDDEN]), sigmoid(z[:, HIDDEN:2 * HIDDEN]), sigmoid(z[:, 2 * HIDDEN:3 * HIDDEN])
        g = np.tanh(z[:, 3 * HIDDEN:])
        c_new = f * c + i * g
        tc = np.tanh(c_new)
        cache.append((h, c, i, o, f, g, tc))
        h, c = o * tc, c_new
        hs.append(h)
    H = np.stack(hs, axis=1)
    return H @ p["Wo"] + p["bo"], (x, H, cache)


def lstm_loss_grads(p, tokens, targets):
    logits, (x, H, cache) = lstm_forward(p, tokens)
    B, T = tokens.shape
    logits = logits.reshape(B * T, VOCAB)
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    flat = targets.reshape(-1)
    loss = -np.mean(np.log(prob[np.arange(B * T), flat] + 1e-12))
    dlogits = prob
    dlogits[np.arange(B * T), flat] -= 1.0
    dlogits /= B * T
    g = {"Wo": H.reshape(B * T, HIDDEN).T @ dlogits, "bo": dlogits.sum(axis=0)}
    dH = (dlogits @ p["Wo"].T).reshape(B, T, HIDDEN)
    dZ = np.zeros((B, T, 4 * HIDDEN))
    g["Wh"] = np.zeros_like(p["Wh"])
    dh_next, dc_next = np.zeros((B, HIDDEN)), np.zeros((B, HIDDEN))
    for t in reversed(range(T)):
        h_prev, c_prev, i, o, f, gg, tc = cache[t]
        dh = dH[:, t] + dh_next
        do = dh * tc
        dc = dh * o * (1 - tc**2) + dc_next
        dz = np.concatenate([dc * gg * i * (1 - i), do * o * (1 - o), dc * c_prev * f * (1 - f), dc * i * (1 - gg**2)],
                            axis=1)
        dZ[:, t] = dz
        g["Wh"] += h_prev.T @ dz
        dh_next, dc_next = dz @ p["Wh"].T, dc * f
    g["Wx"] = x.reshape(B * T, EMBED).T @ dZ.reshape(B * T, -1)
    g["b"] = dZ.sum(axis=(0, 1))
    g["emb"] = np.zeros_like(p["emb"])
    np.add.at(g["emb"], tokens.reshape(-1), (dZ @ p["Wx"].T).reshape(B * T, EMBED))
    return loss, g


def train_lm(hmm, steps, seed=1, batch=32, lr=3e-3, log=print):
    rng = np.random.default_rng(seed)
    p = {
        "emb": rng.normal(0, 0.1, (VOCAB, EMBED)),
        "Wx": rng.normal(0, 1 / np.sqrt(EMBED), (EMBED, 4 * HIDDEN)),
        "Wh": rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, 4 * HIDDEN)),
        "b": np.zeros(4 * HIDDEN),
        "Wo": rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, VOCAB)),
        "bo": np.zeros(VOCAB),
    }
    p["b"][2 * HIDDEN:3 * HIDDEN] = 1.0  # forget-gate bias
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        seqs = sample_tokens(hmm, batch, SEQ + 1, rng)
        loss, g = lstm_loss_grads(p, seqs[:, :-1], seqs[:, 1:])
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        scale = min(1.0, 5.0 / (norm + 1e-12))
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k] * scale
            v[k] = 0.999 * v[k] + 0.001 * (g[k] * scale) ** 2
            p[k] -= lr * (m[k] / (1 - 0.9**step)) / (np.sqrt(v[k] / (1 - 0.999**step)) + 1e-8)
        if step % 100 == 0 or step == steps:
            log(f"  step {step}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)")
    return p


def lm_to_onnx(p) -> onnx.ModelProto:
    """tokens [batch, seq] -> Gather -> [seq, batch, E] -> LSTM -> [batch, seq, H] -> MatMul head -> logits."""
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f32(p["emb"]), "embedding"),
        numpy_helper.from_array(f32(p["Wx"].T[None]), "lstm.W"),
        numpy_helper.from_array(f32(p["Wh"].T[None]), "lstm.R"),
        numpy_helper.from_array(f32(np.concatenate([p["b"], np.zeros(4 * HIDDEN)])[None]), "lstm.B"),
        numpy_helper.from_array(f32(p["Wo"]), "head.weight"),
        numpy_helper.from_array(f32(p["bo"]), "head.bias"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], name="embed"),
        helper.make_node("Transpose", ["embedded"], ["seq_first"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["seq_first", "lstm.W", "lstm.R", "lstm.B"], ["lstm_y"], name="lstm",
                         hidden_size=HIDDEN),
        helper.make_node("Squeeze", ["lstm_y", "axis1"], ["lstm_h"]),
        helper.make_node("Transpose", ["lstm_h"], ["batch_first"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["batch_first", "head.weight"], ["head_mm"], name="head"),
        helper.make_node("Add", ["head_mm", "head.bias"], ["logits"], name="head_bias"),
    ]
    graph = helper.make_graph(
        nodes, "lstm_lm", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------------------------- evaluation


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def latency_ms(sess, feed, runs=30, warmup=5) -> float:
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict:
    ref2, out2 = ref.reshape(-1, ref.shape[-1]).astype(np.float64), out.reshape(-1, out.shape[-1]).astype(np.float64)
    cos = np.sum(ref2 * out2, axis=1) / (np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1) + 1e-30)
    return {"rel_l2_error": float(np.linalg.norm(ref2 - out2) / np.linalg.norm(ref2)),
            "mean_cosine": float(np.mean(cos)),
            "top1_agreement": float(np.mean(ref2.argmax(axis=1) == out2.argmax(axis=1)))}


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(z)), targets.reshape(-1)]))


def site_metric(stats, site, metric):
    gram = stats.input_gram(site)
    if metric == "gram":
        return {"gram": gram}
    return {"row_weights": np.sqrt(np.maximum(np.diag(gram), 0.0))}


def compress_with(model, sites, stats, weights, config, ratio, dope, bias_correction):
    """A copy of the model with every site replaced by `config` at ratio · K·N stored numbers."""
    structure, metric, doped = CONFIGS[config]
    replacements, stored, dense, notes = {}, 0, 0, []
    for site in sites:
        W = weights[site.weight]
        fit = fit_site(W, structure, ratio * site.K * site.N, dope=dope if doped else 0.0,
                       **site_metric(stats, site, metric))
        dense += site.K * site.N
        if fit is None:
            stored += site.K * site.N
            notes.append(f"{site.name}: dense")
            continue
        if bias_correction:
            fit.replacement.shift = stats.mean_input(site) @ (W - fit.replacement.dense())
        replacements[site.weight] = fit.replacement
        stored += fit.params
        notes.append(f"{site.name}: {fit.description}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    apply_factors(out, sites, replacements)
    onnx.checker.check_model(out)
    return out, stored, dense, notes


def recurrent_low_rank(model, site, stats, ratio, bias_correction):
    """The LSTM input weight at whitened low rank (the only structure the op can take)."""
    W = weight_matrix(model, site)
    fit = fit_site(W, "lowrank", ratio * site.K * site.N, gram=stats.input_gram(site))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if fit is None:
        return out, site.K * site.N, "dense"
    lr = fit.replacement.structure
    shift = stats.mean_input(site) @ (W - lr.A @ lr.B) if bias_correction else None
    apply_factors(out, [site], {site.weight: Factors(lr.A, lr.B, shift)})
    return out, fit.params, fit.description


def table(rows, columns) -> str:
    headers = [c[0] for c in columns]
    cells = [[fmt(r.get(key)) for _, key, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda items: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(items, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def num(digits):
    return lambda v: "" if v is None else f"{v:.{digits}f}"


def pct(v):
    return "" if v is None else f"{100 * v:.1f} %"


# ------------------------------------------------------------------------------------- benchmarks


def bench_lm(args, log):
    hmm = make_hmm(seed=0)
    log(f"training the LSTM LM ({args.steps} steps, numpy) ...")
    model = lm_to_onnx(train_lm(hmm, args.steps, log=log))
    rng = np.random.default_rng(7)
    calib = sample_tokens(hmm, 256, SEQ, rng)
    test = sample_tokens(hmm, 256, SEQ + 1, rng)
    feed = {"tokens": test[:, :-1]}
    head_sites, _ = find_sites(model)
    lstm_sites, _ = find_recurrent_sites(model)
    stats = collect_activation_stats(model, head_sites + lstm_sites, open_data([{"tokens": calib}], model),
                                     progress=False)
    reference = session(model).run(None, feed)[0]
    lat_feed = {"tokens": test[:32, :-1]}
    base = {"model": "lm", "config": "original", "ratio": 1.0, "compression": 1.0,
            "bytes": model.ByteSize(), "cross_entropy": cross_entropy(reference, test[:, 1:]),
            "latency_ms": latency_ms(session(model), lat_feed), **fidelity(reference, reference)}
    rows = [base]
    weights = {s.weight: weight_matrix(model, s) for s in head_sites}
    for ratio in args.ratios:
        for config in CONFIGS:
            out, stored, dense, notes = compress_with(model, head_sites, stats, weights, config, ratio, args.dope,
                                                      not args.no_bias_correction)
            logits = session(out).run(None, feed)[0]
            rows.append({"model": "lm", "config": config, "ratio": ratio, "stored_params": stored,
                         "compression": dense / stored, "bytes": out.ByteSize(),
                         "cross_entropy": cross_entropy(logits, test[:, 1:]),
                         "latency_ms": latency_ms(session(out), lat_feed), "sites": notes, **fidelity(reference, logits)})
            log(f"  lm head {config:24s} ratio {ratio:.2f}: rel err {rows[-1]['rel_l2_error']:.4f}")
    lstm_rows = []
    for ratio in args.ratios:
        out, stored, note = recurrent_low_rank(model, lstm_sites[0], stats, ratio, not args.no_bias_correction)
        logits = session(out).run(None, feed)[0]
        lstm_rows.append({"model": "lm", "config": "LSTM W low rank (whiten)", "ratio": ratio, "stored_params": stored,
                          "compression": lstm_sites[0].K * lstm_sites[0].N / stored, "bytes": out.ByteSize(),
                          "cross_entropy": cross_entropy(logits, test[:, 1:]), "sites": [note],
                          "latency_ms": latency_ms(session(out), lat_feed), **fidelity(reference, logits)})
    return rows, lstm_rows


def bench_digits(args, log):
    root = Path(__file__).resolve().parents[1] / "sample_models"
    model = onnx.load(str(root / "digits_mlp.onnx"))
    calib, test = np.load(root / "digits_calib.npz"), np.load(root / "digits_test.npz")
    sites, _ = find_sites(model, exclude="head")
    stats = collect_activation_stats(model, sites, open_data([{"input": calib["input"]}], model), progress=False)
    feed = {"input": test["input"]}
    reference = session(model).run(None, feed)[0]
    base = {"model": "digits", "config": "original", "ratio": 1.0, "compression": 1.0, "bytes": model.ByteSize(),
            "accuracy": float(np.mean(reference.argmax(1) == test["labels"])),
            "latency_ms": latency_ms(session(model), feed), **fidelity(reference, reference)}
    rows = [base]
    weights = {s.weight: weight_matrix(model, s) for s in sites}
    for ratio in args.ratios:
        for config in CONFIGS:
            out, stored, dense, notes = compress_with(model, sites, stats, weights, config, ratio, args.dope,
                                                      not args.no_bias_correction)
            logits = session(out).run(None, feed)[0]
            rows.append({"model": "digits", "config": config, "ratio": ratio, "stored_params": stored,
                         "compression": dense / stored, "bytes": out.ByteSize(),
                         "accuracy": float(np.mean(logits.argmax(1) == test["labels"])),
                         "latency_ms": latency_ms(session(out), feed), "sites": notes, **fidelity(reference, logits)})
            log(f"  digits {config:24s} ratio {ratio:.2f}: accuracy {rows[-1]['accuracy']:.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.5,0.25,0.1", help="stored numbers per site / dense (comma-separated)")
    parser.add_argument("--dope", type=float, default=0.01, help="fraction of each weight's entries kept as doping")
    parser.add_argument("--steps", type=int, default=400, help="LSTM LM training steps")
    parser.add_argument("--models", default="lm,digits")
    parser.add_argument("--no-bias-correction", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    result = {"settings": {"ratios": args.ratios, "dope": args.dope, "steps": args.steps,
                           "bias_correction": not args.no_bias_correction, "onnxruntime": ort.__version__}}
    common = [("config", "config", str), ("ratio", "ratio", num(2)), ("stored", "stored_params", lambda v: "" if v is None else f"{v:,}"),
              ("compr.", "compression", num(2)), ("rel L2", "rel_l2_error", num(4)), ("cosine", "mean_cosine", num(4)),
              ("top-1 agree", "top1_agreement", pct)]
    if "lm" in args.models:
        rows, lstm_rows = bench_lm(args, log)
        result["lm_head"], result["lm_lstm_input"] = rows, lstm_rows
        columns = common + [("test CE", "cross_entropy", num(3)), ("latency ms", "latency_ms", num(2))]
        print(f"\nLSTM LM, vocabulary head [{HIDDEN} x {VOCAB}] (dope {args.dope:.2%}); batch 32 x {SEQ} tokens")
        print(table(rows, columns))
        print(f"\nLSTM LM, LSTM input weight [{EMBED} x {4 * HIDDEN}] at whitened low rank (head dense)")
        print(table(lstm_rows, columns))
    if "digits" in args.models:
        rows = bench_digits(args, log)
        result["digits"] = rows
        columns = common + [("accuracy", "accuracy", pct), ("latency ms", "latency_ms", num(3))]
        print(f"\ndigits MLP, fc1 [64 x 256] and fc2 [256 x 256] (head dense; dope {args.dope:.2%}); batch 500")
        print(table(rows, columns))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
