"""An LSTM language model at 10x and 20x compression of its LSTM weights: perplexity, bytes and latency of trained
doped Kronecker vs trained low rank vs the dense model vs ONNX Runtime's int8 dynamic quantization (issue 29, item 3;
issue 19's benchmark before it).

Run from the repository root (18 minutes for both ratios on a shared 2-core machine at load 4-5):
    python tools/bench_lstm_lm.py [--ratios 0.1,0.05] [--steps 300] [--pairs 60] [--json FILE]

The model: a word-level LSTM LM on the Python standard library's docstrings (tools/minilm_sentences.py finds
them; no download): vocabulary 2,000 (the most frequent words, plus <unk> and <eos>), embedding 128, one LSTM
layer of hidden size 256, a vocabulary head. Trained here in CPU torch (the venv of tools/export_minilm.py,
torch==2.13.0) for at most --train-seconds, with dropout and early stopping on a validation split.

The ONNX graph is written by this script with the LSTM unrolled over the 32 time steps (MatMul, Split,
Sigmoid/Tanh, Mul, Add per step; inputs tokens, h0, c0; outputs logits, h, c), not as an ONNX LSTM op: the op
only takes dense weights, while unrolled every LSTM weight is a MatMul site that any structure can replace and
refine can train. "The LSTM weights" compressed here are the input weight W_ih [128 x 1024] and the recurrent
weight W_hh [256 x 1024] (one site used at 32 steps); the embedding and the head stay dense. The decoder (one
token per run, state carried) is the same graph cut after its first step (step_model), so a compressed model
decodes with exactly its trained values. The same LM with the ONNX LSTM op (lstm_op_model) is the input a user
would give ONNX Runtime's quantize_dynamic, which turns the op into DynamicQuantizeLSTM.

Rows (compressed ones at every --ratios value, stored numbers / dense over the LSTM weights; no bias correction:
compress writes one copy of its vector per use, 32 identical 4 KB copies for W_hh, which would double the bytes):
  dense, unrolled / dense, LSTM op      the original, both graphs
  ORT int8 dynamic, LSTM op / unrolled  quantize_dynamic, per channel (onnx_fwlr.quant.ortquant.ort_int8_model)
  low rank, post-training / trained     compress --method whiten --rank-multiple 1, then refine (KL on the logits)
  doped kron, post-training / trained   compress --method kron --dope D (default shapes: error and measured time
                                        at 1 thread, at the calibration batch's rows), then refine
  kron, post-training / trained         the same without doping
  doped kron balanced, ... / trained    --kron-shape balanced (the 4 most balanced splits by error, not timed)
Test metrics on held-out docstrings: cross-entropy and perplexity against the next word, top-1 agreement with
the original model's prediction. Bytes: the model file and the LSTM weights' tensors (factors, doping values and
int32 indices, int8 values with scales and zero points). Latency at 1 ONNX Runtime thread in this one process:
decode at batch 1 and 32 (ms per token step, 32 steps per timed run) and whole 32-token sequences at batch 32,
each the median over alternating pairs against the dense unrolled model (and that ratio's median); load printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

VOCAB, EMBED, HIDDEN, SEQ = 2000, 128, 256, 32
UNK, EOS = 0, 1
WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


# ------------------------------------------------------------------------------------- corpus


def corpus(seed=0):
    """Token streams (train, val, test) of the stdlib docstrings, split by docstring (90/5/5), and the vocabulary."""
    from minilm_sentences import docstrings_of_file, stdlib_source_files

    docs = [d for f in stdlib_source_files() for d in docstrings_of_file(f)]
    order = np.random.default_rng(seed).permutation(len(docs))
    words = [WORD.findall(docs[i].lower()) for i in order]
    counts = collections.Counter(w for doc in words[: int(0.9 * len(words))] for w in doc)
    vocab = ["<unk>", "<eos>"] + sorted(w for w, _ in counts.most_common(VOCAB - 2))
    index = {w: i for i, w in enumerate(vocab)}
    streams = []
    for part in (words[: int(0.9 * len(words))], words[int(0.9 * len(words)): int(0.95 * len(words))],
                 words[int(0.95 * len(words)):]):
        streams.append(np.array([index.get(w, UNK) for doc in part for w in doc + ["<eos>"]], dtype=np.int64))
    return streams, vocab


def windows(stream, count, rng, length=SEQ + 1):
    """`count` random windows of `length` tokens."""
    starts = rng.integers(0, len(stream) - length, size=count)
    return np.stack([stream[s: s + length] for s in starts])


def tiles(stream, length=SEQ + 1):
    """Non-overlapping windows covering the stream (the test set)."""
    n = (len(stream) - 1) // SEQ
    return np.stack([stream[i * SEQ: i * SEQ + length] for i in range(n) if i * SEQ + length <= len(stream)])


# ------------------------------------------------------------------------------------- training (torch venv)


def train_in_torch(data_path: Path, out_path: Path, seconds: float, seed: int) -> None:
    """Runs inside the torch venv: trains the LM and saves its weights (numpy) and curve."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a shared 2-core machine: two threads fought for one core
    data = np.load(data_path)
    train, val = torch.from_numpy(data["train"]), torch.from_numpy(data["val"])

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, EMBED)
            self.lstm = torch.nn.LSTM(EMBED, HIDDEN, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, VOCAB)
            self.drop = torch.nn.Dropout(0.25)

        def forward(self, tokens):
            h, _ = self.lstm(self.drop(self.emb(tokens)))
            return self.head(self.drop(h))

    model = LM()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    val_batch = torch.from_numpy(windows(val.numpy(), 512, np.random.default_rng(seed + 1)))

    def val_loss():
        model.eval()
        with torch.no_grad():
            logits = model(val_batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), val_batch[:, 1:].reshape(-1))
        model.train()
        return float(loss)

    best, best_state, start, step, curve = float("inf"), None, time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds:
        batch = torch.from_numpy(windows(train.numpy(), 32, rng))
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 100 == 0:
            current = val_loss()
            curve.append((step, float(loss.detach()), current))
            print(f"  step {step}: train {float(loss):.3f} val {current:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            if current < best:
                best, best_state = current, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        check_logits = model(val_batch[:8, :-1]).numpy()  # the ONNX export is checked against these
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.savez(out_path, emb=state["emb.weight"], w_ih=state["lstm.weight_ih_l0"], w_hh=state["lstm.weight_hh_l0"],
             b=state["lstm.bias_ih_l0"] + state["lstm.bias_hh_l0"], head_w=state["head.weight"],
             head_b=state["head.bias"], val_ce=best, steps=step, curve=np.array(curve),
             check_tokens=val_batch[:8, :-1].numpy(), check_logits=check_logits)


def trained_weights(work: Path, streams, args) -> dict:
    """The LM's weights: cached in `work`, else trained in the torch venv (tools/export_minilm.py makes it)."""
    out = work / f"lm_weights_s{args.train_seconds:g}_seed{args.seed}.npz"
    if not out.exists():
        data = work / "corpus.npz"
        np.savez(data, train=streams[0], val=streams[1])
        python = args.torch_python or _torch_venv(work)
        print(f"training the LSTM LM in torch ({python}) for at most {args.train_seconds:g} s ...", file=sys.stderr)
        subprocess.run([str(python), __file__, "--train-in-torch", str(data), str(out), "--train-seconds",
                        str(args.train_seconds), "--seed", str(args.seed)], check=True)
    return dict(np.load(out))


def _torch_venv(work: Path) -> Path:
    from export_minilm import ensure_venv, venv_python

    venv = REPO / ".cache" / "minilm-venv"
    ensure_venv(venv)
    return venv_python(venv)


# ------------------------------------------------------------------------------------- ONNX (unrolled LSTM)


def lm_onnx(w: dict):
    """tokens [batch, 32], h0 [batch, H], c0 [batch, H] -> logits [batch, 32, VOCAB], h, c: the LSTM unrolled over
    the 32 steps (torch gate order i, f, g, o), every step multiplying the previous hidden state by W_hh (h0 at the
    first), so the same graph cut to its first step is the decoder (step_model). Weights: embedding, lstm.W_ih
    [E, 4H], lstm.W_hh [H, 4H], lstm.b, head.weight, head.bias."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(w["emb"]), "embedding"),
             numpy_helper.from_array(f32(w["w_ih"].T), "lstm.W_ih"),
             numpy_helper.from_array(f32(w["w_hh"].T), "lstm.W_hh"),
             numpy_helper.from_array(f32(w["b"]), "lstm.b"),
             numpy_helper.from_array(f32(w["head_w"].T), "head.weight"),
             numpy_helper.from_array(f32(w["head_b"]), "head.bias"),
             numpy_helper.from_array(np.full(4, HIDDEN, np.int64), "gate_sizes"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    inits += [numpy_helper.from_array(np.array(t, np.int64), f"t{t}") for t in range(SEQ)]
    node = helper.make_node
    nodes = [node("Gather", ["embedding", "tokens"], ["x"], name="embed"),
             node("MatMul", ["x", "lstm.W_ih"], ["zx_raw"], name="lstm/input"),
             node("Add", ["zx_raw", "lstm.b"], ["zx"], name="lstm/input_bias")]
    outputs = []
    for t in range(SEQ):
        p, h, c = f"lstm/step{t}", f"lstm/step{t - 1}/h" if t else "h0", f"lstm/step{t - 1}/c" if t else "c0"
        nodes += [node("Gather", ["zx", f"t{t}"], [f"{p}/zx"], name=f"{p}/zx", axis=1),
                  node("MatMul", [h, "lstm.W_hh"], [f"{p}/zh"], name=f"{p}/recurrent"),
                  node("Add", [f"{p}/zx", f"{p}/zh"], [f"{p}/z"], name=f"{p}/z"),
                  node("Split", [f"{p}/z", "gate_sizes"], [f"{p}/{g}" for g in "ifgo"], name=f"{p}/gates", axis=1),
                  node("Sigmoid", [f"{p}/i"], [f"{p}/si"]), node("Sigmoid", [f"{p}/f"], [f"{p}/sf"]),
                  node("Tanh", [f"{p}/g"], [f"{p}/tg"]), node("Sigmoid", [f"{p}/o"], [f"{p}/so"]),
                  node("Mul", [f"{p}/si", f"{p}/tg"], [f"{p}/ig"]), node("Mul", [f"{p}/sf", c], [f"{p}/fc"]),
                  node("Add", [f"{p}/fc", f"{p}/ig"], [f"{p}/c"]),
                  node("Tanh", [f"{p}/c"], [f"{p}/tc"]), node("Mul", [f"{p}/so", f"{p}/tc"], [f"{p}/h"]),
                  node("Unsqueeze", [f"{p}/h", "axis1"], [f"{p}/h3"])]
        outputs.append(f"{p}/h3")
    last = f"lstm/step{SEQ - 1}"
    nodes += [node("Concat", outputs, ["hidden"], name="hidden", axis=1),
              node("MatMul", ["hidden", "head.weight"], ["head_mm"], name="head"),
              node("Add", ["head_mm", "head.bias"], ["logits"], name="head_bias"),
              node("Identity", [f"{last}/h"], ["h"], name="h_out"),
              node("Identity", [f"{last}/c"], ["c"], name="c_out")]
    state = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", HIDDEN]) for n in ("h0", "c0")]
    graph = helper.make_graph(
        nodes, "lstm_lm_unrolled", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", SEQ])] + state,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SEQ, VOCAB])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", HIDDEN]) for n in ("h", "c")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def step_model(model):
    """The one-step decoder of an unrolled model (lm_onnx's, dense or compressed): tokens [batch, 1], h0, c0 ->
    logits [batch, 1, VOCAB], h, c. The graph is cut after its first step, so a compressed model's sites keep
    exactly the nodes and (trained) values they have in the 32-step graph."""
    import onnx

    step = onnx.ModelProto()
    step.CopyFrom(model)
    graph = step.graph
    rewire = {"hidden": ["lstm/step0/h3"], "h": ["lstm/step0/h"], "c": ["lstm/step0/c"]}
    for n in graph.node:
        if n.output[0] in rewire:
            del n.input[:]
            n.input.extend(rewire[n.output[0]])
    needed = {o.name for o in graph.output}
    kept = []
    for n in reversed(graph.node):  # the graph is topologically sorted: walk it backwards from the outputs
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    del graph.value_info[:]
    onnx.checker.check_model(step, full_check=True)
    return step


def lstm_op_model(w: dict):
    """The same LM with the ONNX LSTM op (what torch.onnx.export writes, and what ONNX Runtime's quantize_dynamic
    turns into DynamicQuantizeLSTM): tokens [batch, seq], h0, c0 -> logits [batch, seq, VOCAB], h, c; any seq."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    order = np.concatenate([np.arange(HIDDEN) + g * HIDDEN for g in (0, 3, 1, 2)])  # torch i,f,g,o -> ONNX i,o,f,c
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(w["emb"]), "embedding"),
             numpy_helper.from_array(f32(w["w_ih"][order][None]), "lstm.W_ih"),
             numpy_helper.from_array(f32(w["w_hh"][order][None]), "lstm.W_hh"),
             numpy_helper.from_array(f32(np.concatenate([w["b"][order], np.zeros(4 * HIDDEN)])[None]), "lstm.b"),
             numpy_helper.from_array(f32(w["head_w"].T), "head.weight"),
             numpy_helper.from_array(f32(w["head_b"]), "head.bias"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    node = helper.make_node
    nodes = [node("Gather", ["embedding", "tokens"], ["x"], name="embed"),
             node("Transpose", ["x"], ["x_tbe"], perm=[1, 0, 2]),
             node("Unsqueeze", ["h0", "axis0"], ["h0_3"]), node("Unsqueeze", ["c0", "axis0"], ["c0_3"]),
             node("LSTM", ["x_tbe", "lstm.W_ih", "lstm.W_hh", "lstm.b", "", "h0_3", "c0_3"], ["y", "y_h", "y_c"],
                  name="lstm", hidden_size=HIDDEN),
             node("Squeeze", ["y", "axis1"], ["y_tbh"]), node("Transpose", ["y_tbh"], ["hidden"], perm=[1, 0, 2]),
             node("MatMul", ["hidden", "head.weight"], ["head_mm"], name="head"),
             node("Add", ["head_mm", "head.bias"], ["logits"], name="head_bias"),
             node("Squeeze", ["y_h", "axis0"], ["h"]), node("Squeeze", ["y_c", "axis0"], ["c"])]
    state = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", HIDDEN]) for n in ("h0", "c0")]
    graph = helper.make_graph(
        nodes, "lstm_lm_op", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])] + state,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", HIDDEN]) for n in ("h", "c")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------------------------- evaluation


def zero_state(batch: int) -> dict:
    return {"h0": np.zeros((batch, HIDDEN), np.float32), "c0": np.zeros((batch, HIDDEN), np.float32)}


def logits_of(model, tokens, batch=64):
    """The logits of whole sequences (zero initial state)."""
    from onnx_fwlr.io import runtime

    session = runtime.make_session(model, runtime.session_options(threads=2))
    parts = [session.run(["logits"], {"tokens": tokens[i: i + batch], **zero_state(len(tokens[i: i + batch]))})[0]
             for i in range(0, len(tokens), batch)]
    return np.concatenate(parts)


def decode(session, tokens) -> np.ndarray:
    """Feed `tokens` [batch, n] one step at a time, carrying (h, c); the logits of every step [batch, n, VOCAB]."""
    state, steps = zero_state(len(tokens)), []
    for t in range(tokens.shape[1]):
        logits, h, c = session.run(["logits", "h", "c"], {"tokens": tokens[:, t: t + 1], **state})
        state = {"h0": h, "c0": c}
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def metrics(logits, targets, reference=None) -> dict:
    z = logits.reshape(-1, VOCAB).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = float(-np.mean(logp[np.arange(len(z)), targets.reshape(-1)]))
    out = {"cross_entropy": ce, "perplexity": float(np.exp(ce)),
           "accuracy": float(np.mean(z.argmax(1) == targets.reshape(-1)))}
    if reference is not None:
        out["top1_agreement"] = float(np.mean(z.argmax(1) == reference.reshape(-1, VOCAB).argmax(1)))
    return out


def lstm_params(report) -> tuple[int, int]:
    """(dense, stored) numbers of the LSTM sites in a compress report (kept-dense sites count as dense)."""
    sites = [s for s in report.sites if s.weight.startswith("lstm.")]
    return sum(s.params_before for s in sites), sum(s.params_after for s in sites)


def byte_counts(model) -> dict:
    """The model file's bytes and the bytes of its LSTM weights (every initializer derived from lstm.W_ih /
    lstm.W_hh: factors, doping values and indices, quantized values, scales and zero points)."""
    from onnx import numpy_helper

    lstm = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name.startswith("lstm.W"))
    return {"file_bytes": model.ByteSize(), "lstm_bytes": int(lstm)}


# ------------------------------------------------------------------------------------- latency


LATENCY_SETTINGS = {  # name -> (batch, tokens per timed run, decode one step at a time?)
    "decode_b1": (1, SEQ, True),
    "decode_b32": (32, SEQ, True),
    "sequence_b32": (32, SEQ, False),
}


def timed_run(setting: str, session, tokens) -> float:
    """Seconds per token step of one timed run: a decode of `tokens` (state carried) or one whole-sequence run."""
    start = time.perf_counter()
    if LATENCY_SETTINGS[setting][2]:
        decode(session, tokens)
    else:
        session.run(["logits"], {"tokens": tokens, **zero_state(len(tokens))})
    return (time.perf_counter() - start) / (tokens.shape[1] if LATENCY_SETTINGS[setting][2] else 1)


def latencies(models: dict, reference: str, test, pairs: int, log, settings) -> dict:
    """Per model and setting (of LATENCY_SETTINGS), in one process at 1 ONNX Runtime thread: the median milliseconds, and the median
    (p10, p90) of its time over the reference's in `pairs` alternating pairs (reference first in even pairs),
    the pairs of all models interleaved round by round so that every model sees the same load."""
    from onnx_fwlr.io import runtime

    options = runtime.session_options(threads=1)
    sessions = {name: runtime.make_session(m, options) for name, m in models.items()}
    found = {name: {} for name in models}
    for setting in settings:
        batch, length, _ = LATENCY_SETTINGS[setting]
        tokens = np.ascontiguousarray(test[:batch, :length])
        for name, session in sessions.items():  # warm-up
            timed_run(setting, session, tokens)
        times = {name: [] for name in models}
        ratios = {name: [] for name in models if name != reference}
        for pair in range(pairs):
            for name in ratios:
                order = (reference, name) if pair % 2 == 0 else (name, reference)
                seconds = dict(zip(order, (timed_run(setting, sessions[n], tokens) for n in order)))
                times[name].append(seconds[name])
                times[reference].append(seconds[reference])
                ratios[name].append(seconds[name] / seconds[reference])
        for name in models:
            entry = {"ms": 1000.0 * float(np.median(times[name]))}
            if name in ratios:
                p10, p50, p90 = np.percentile(ratios[name], [10, 50, 90])
                entry.update(ratio=float(p50), ratio_p10=float(p10), ratio_p90=float(p90))
            else:
                entry.update(ratio=1.0)
            found[name][setting] = entry
        log(f"  timed {setting} ({pairs} pairs per model): " + ", ".join(
            f"{name} {found[name][setting]['ratio']:.2f}x" for name in models))
    return found


# ------------------------------------------------------------------------------------- the benchmark


def configurations(args):
    """(label, compress options, refine options or None) for every compressed row of the table. Kronecker shapes are
    the default ones (error and time measured together, timed at 1 thread at the calibration batch's rows) unless
    the label says "balanced" (`--kron-shape balanced`: the 4 most balanced splits by error, not timed)."""
    doping = {"dope_share": args.dope_share} if args.dope_share is not None else {"dope": args.dope}
    lowrank = {"method": "whiten", "rank_multiple": 1}  # the exact budget: ranks rounded to 16 made 0.05 into 10x
    kron = {"method": "kron", "latency_threads": 1}
    doped = {**kron, **doping}
    balanced = {**doped, "kron_shape": "balanced"}
    rows = [("low rank, post-training", lowrank, None),
            ("low rank, trained", lowrank, {"dope_dropout": 0.0}),
            ("doped kron, post-training", doped, None)]
    for p in args.dropouts:
        rows.append((f"doped kron, trained{f', dropout {p:g}' if len(args.dropouts) > 1 or p else ''}", doped,
                     {"dope_dropout": p}))
    if args.reselect:
        rows.append((f"doped kron, trained, dropout {args.dropouts[-1]:g}, reselect 1", doped,
                     {"dope_dropout": args.dropouts[-1], "reselect": 1}))
    rows += [("kron, post-training", kron, None),
             ("kron, trained", kron, {"dope_dropout": 0.0}),
             ("doped kron balanced, post-training", balanced, None),
             ("doped kron balanced, trained", balanced, {"dope_dropout": 0.0})]
    return rows


def run_config(model, calib_path, label, options, refine_options, ratio, test, reference, args, log, cache):
    from onnx_fwlr import compress
    from onnx_fwlr.refine.loop import refine

    start = time.perf_counter()
    key = (ratio, tuple(sorted(options.items())))
    if key not in cache:  # trained configurations start from the same post-training model
        cache[key] = compress(model, ratio=ratio, include=r"^lstm\.", calibration=str(calib_path), batch_size=32,
                              bias_correction=False, progress=False, **options)
    compressed, report = cache[key]
    row = {"config": label, "ratio": ratio, "sites": [f"{s.name}: {s.note}" for s in report.sites]}
    dense, stored = lstm_params(report)
    row.update(dense_params=dense, stored_params=stored, compression=dense / stored)
    if refine_options is not None and stored == dense:
        row["refine"] = {"skipped": "every site stayed dense: nothing to train"}
    elif refine_options is not None:
        compressed, refined = refine(model, compressed, str(calib_path), steps=args.steps, lr=args.lr,
                                     batch_size=args.batch_size, eval_every=args.eval_every, patience=args.patience,
                                     output="logits", progress=False, **refine_options)
        row["refine"] = {"steps": refined.steps, "best_step": refined.best_step, "before": refined.before,
                         "after": refined.after, "step_seconds": refined.step_seconds, "dropped": refined.dropped,
                         "phases": refined.phases}
    row.update(metrics(logits_of(compressed, test[:, :-1]), test[:, 1:], reference))
    row["seconds"] = time.perf_counter() - start
    log(f"  {label:45s} ratio {ratio:.2f} ({row['compression']:.1f}x): CE {row['cross_entropy']:.3f}, "
        f"top-1 agree {100 * row['top1_agreement']:.1f} % ({row['seconds']:.0f} s)")
    for site in row["sites"]:
        log(f"      {site}")
    return row, compressed


def ort_int8_rows(model, op_model, test, reference, log) -> list:
    """ONNX Runtime's quantize_dynamic (int8 per channel, the project's baseline settings) of the LSTM-op model and
    of the unrolled one: (row, model) pairs, each row naming the op types the quantized graph computes with."""
    import collections
    import logging

    from onnx import TensorProto

    from onnx_fwlr.quant.ortquant import ort_int8_model

    found = []
    logging.disable(logging.WARNING)  # ORT's quantizer logs every node
    try:
        for label, source in (("ORT int8 dynamic, LSTM op", op_model), ("ORT int8 dynamic, unrolled", model)):
            start = time.perf_counter()
            quantized = ort_int8_model(source)
            ops = collections.Counter(n.op_type for n in quantized.graph.node)
            before = collections.Counter(n.op_type for n in source.graph.node)
            row = {"config": label, "ratio": 1.0, "ops": dict(sorted(ops.items())),
                   "new_ops": {op: c for op, c in sorted(ops.items()) if op not in before},
                   "float_ops_left": {op: ops[op] for op in ("LSTM", "MatMul") if ops.get(op)},
                   "int8_weights": sorted(t.name for t in quantized.graph.initializer
                                          if t.data_type in (TensorProto.INT8, TensorProto.UINT8)
                                          and not t.name.endswith("zero_point")),
                   **metrics(logits_of(quantized, test[:, :-1]), test[:, 1:], reference)}
            row["seconds"] = time.perf_counter() - start
            log(f"  {label}: CE {row['cross_entropy']:.3f}; ops added {row['new_ops']}; float LSTM/MatMul left "
                f"{row['float_ops_left'] or 'none'}; int8 weights {', '.join(row['int8_weights'])}")
            found.append((row, quantized))
    finally:
        logging.disable(logging.NOTSET)
    return found


def decode_check(model, test) -> float:
    """Max abs difference between the logits decoded one step at a time (step_model, state carried) and those
    of the whole-sequence graph, on 2 test sequences: the decoder computes what the measured model does."""
    from onnx_fwlr.io import runtime

    tokens = test[:2, :-1]
    stepped = decode(runtime.make_session(step_model(model), runtime.session_options(threads=1)), tokens)
    return float(np.max(np.abs(stepped - logits_of(model, tokens))))


def table(rows) -> str:
    settings = [s for s in LATENCY_SETTINGS if any(s in r.get("latency", {}) for r in rows)]
    header = (f"{'config':<36} {'ratio':>5} {'compr.':>6} {'LSTM bytes':>10} {'file bytes':>10} {'test CE':>7} "
              f"{'ppl':>6} {'top-1 agr':>9} {'steps':>5}")
    header += "".join(f" {s + ' ms':>15} {'x dense':>7}" for s in settings)
    lines = [header, "-" * len(header)]
    for r in rows:
        steps = r.get("refine", {}).get("best_step", "")
        line = (f"{r['config']:<36} {r['ratio']:>5.2f} {r.get('compression', 1.0):>6.1f} {r['lstm_bytes']:>10,} "
                f"{r['file_bytes']:>10,} {r['cross_entropy']:>7.3f} {r['perplexity']:>6.1f} "
                f"{100 * r['top1_agreement']:>7.1f} % {steps:>5}")
        for s in settings:
            t = r.get("latency", {}).get(s)
            line += f" {t['ms']:>15.3f} {t['ratio']:>6.2f}x" if t else f" {'':>15} {'':>7}"
        lines.append(line)
    return "\n".join(lines)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.05", help="stored numbers / dense of the LSTM weights")
    parser.add_argument("--steps", type=int, default=300, help="refine steps per trained configuration")
    parser.add_argument("--lr", type=float, default=2e-3, help="refine peak learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="refine batch (sequences of 32 tokens)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--dope", type=float, default=0.001, help="doping entries per site, a share of K*N")
    parser.add_argument("--dope-share", type=float, help="instead of --dope: the share of each site's stored numbers "
                        "spent on doping (0.3 in the earlier table)")
    parser.add_argument("--dropouts", default="0", help="co-matrix dropout probabilities to train with")
    parser.add_argument("--reselect", action="store_true", help="also train with one support re-selection")
    parser.add_argument("--calib", type=int, default=1024, help="calibration/training sequences (from train text)")
    parser.add_argument("--test", type=int, default=1024, help="test sequences at most (held-out docstrings)")
    parser.add_argument("--pairs", type=int, default=60, help="alternating pairs per model and latency setting "
                        "(0: no latency)")
    parser.add_argument("--train-seconds", type=float, default=300.0, help="torch training time budget")
    parser.add_argument("--torch-python", help="python of a venv with CPU torch (default: tools/export_minilm.py's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(REPO / ".cache" / "lstm_lm"), help="folder for the model and data")
    parser.add_argument("--only", help="run only configurations whose label contains this text")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--train-in-torch", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_in_torch:
        train_in_torch(Path(args.train_in_torch[0]), Path(args.train_in_torch[1]), args.train_seconds, args.seed)
        return 0
    import onnx

    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.dropouts = [float(p) for p in args.dropouts.split(",")]
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    loads = [uptime()]
    log(loads[0])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    streams, _ = corpus(args.seed)
    weights = trained_weights(work, streams, args)
    model, op_model = lm_onnx(weights), lstm_op_model(weights)
    onnx.save(model, work / "lstm_lm.onnx")
    export_error = float(np.max(np.abs(logits_of(model, weights["check_tokens"]) - weights["check_logits"])))
    op_error = float(np.max(np.abs(logits_of(op_model, weights["check_tokens"]) - weights["check_logits"])))
    if max(export_error, op_error) > 1e-3:
        raise SystemExit(f"the ONNX LMs disagree with torch (max abs logit difference: unrolled {export_error:.2e}, "
                         f"LSTM op {op_error:.2e})")
    rng = np.random.default_rng(args.seed + 2)
    calib = windows(streams[0], args.calib, rng)[:, :-1]
    calib_path = work / "calib.npz"
    np.savez(calib_path, tokens=calib, **zero_state(len(calib)))
    test = tiles(streams[2])[: args.test]
    reference = logits_of(model, test[:, :-1])
    base = {"config": "dense, unrolled", "ratio": 1.0, "compression": 1.0,
            **metrics(reference, test[:, 1:], reference), **byte_counts(model)}
    log(f"original: test CE {base['cross_entropy']:.3f} (torch val CE {float(weights['val_ce']):.3f}), "
        f"{len(test)} test sequences, {int(weights['steps'])} torch steps; export max abs error {export_error:.1e} "
        f"(LSTM op {op_error:.1e})")
    base.update(torch_steps=int(weights["steps"]), export_error=export_error, decode_error=decode_check(model, test))
    op_row = {"config": "dense, LSTM op", "ratio": 1.0, "compression": 1.0, "export_error": op_error,
              **metrics(logits_of(op_model, test[:, :-1]), test[:, 1:], reference), **byte_counts(op_model)}
    rows, models, cache = [base, op_row], {"dense, unrolled": step_model(model), "dense, LSTM op": op_model}, {}
    sequence_models = {"dense, unrolled": model, "dense, LSTM op": op_model}
    for row, quantized in ort_int8_rows(model, op_model, test, reference, log):
        row.update(byte_counts(quantized))
        rows.append(row)
        unrolled = "unrolled" in row["config"]
        models[row["config"]] = step_model(quantized) if unrolled else quantized
        sequence_models[row["config"]] = quantized
    for ratio in args.ratios:
        for label, options, refine_options in configurations(args):
            if args.only and args.only not in label:
                continue
            row, compressed = run_config(model, calib_path, label, options, refine_options, ratio, test, reference,
                                         args, log, cache)
            row.update(byte_counts(compressed), decode_error=decode_check(compressed, test))
            if row["decode_error"] > 1e-3:
                log(f"  warning: its decoder differs from the whole-sequence graph by {row['decode_error']:.1e}")
            name = f"{label} @ {ratio:g}"
            rows.append(row)
            models[name], sequence_models[name] = step_model(compressed), compressed
    for row in rows:  # compression of the LSTM weights in bytes, for every row alike
        row["compression"] = base["lstm_bytes"] / row["lstm_bytes"]
    loads.append(uptime())
    if args.pairs:
        log(f"timing at 1 thread ({loads[-1]})")
        names = [r["config"] if r["ratio"] == 1.0 else f"{r['config']} @ {r['ratio']:g}" for r in rows]
        steps = latencies(models, "dense, unrolled", test[:, :-1], args.pairs, log, ["decode_b1", "decode_b32"])
        whole = latencies(sequence_models, "dense, unrolled", test[:, :-1], args.pairs, log, ["sequence_b32"])
        for row, name in zip(rows, names):
            row["latency"] = {**steps[name], **whole[name]}
        loads.append(uptime())
    print(f"\nLSTM LM (vocabulary {VOCAB}, embedding {EMBED}, hidden {HIDDEN}, {SEQ}-token sequences); W_ih and W_hh "
          f"compressed; {len(test)} x {SEQ} test tokens; latency: 1 ONNX Runtime thread, medians of {args.pairs} "
          f"alternating pairs against the dense unrolled model in one process")
    print("load: " + " | ".join(loads))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                             if k != "train_in_torch"}, "load": loads, "rows": rows},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
