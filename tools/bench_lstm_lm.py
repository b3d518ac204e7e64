"""An LSTM language model at 10x and 20x compression of its recurrent weights: trained doped Kronecker vs trained
low rank vs post-training low rank (issue 19's benchmark).

Run from the repository root (about 40 minutes on a shared 2-core machine):
    python tools/bench_lstm_lm.py [--ratios 0.1,0.05] [--steps 300] [--json FILE]

The model: a word-level LSTM LM on the Python standard library's docstrings (tools/minilm_sentences.py finds
them; no download): vocabulary 2,000 (the most frequent words, plus <unk> and <eos>), embedding 128, one LSTM
layer of hidden size 256, a vocabulary head. Trained here in CPU torch (the venv of tools/export_minilm.py,
torch==2.13.0) for at most --train-seconds, with dropout and early stopping on a validation split.

The ONNX graph is written by this script with the LSTM unrolled over the 32 time steps (MatMul, Split,
Sigmoid/Tanh, Mul, Add per step), not as an ONNX LSTM op: the op only takes dense weights, while unrolled
every LSTM weight is a MatMul site that any structure can replace and refine can train. "The recurrent
model's weights" compressed here are the LSTM's input weight W_ih [128 x 1024] and recurrent weight
W_hh [256 x 1024] (one site used at 31 steps); the embedding and the head stay dense. Compression counts
stored numbers over those two weights (doping entries cost a value and two indices).

Configurations, each at every ratio (stored numbers / dense):
  low rank, post-training      compress --method whiten (activation-whitened SVD, bias correction)
  low rank, trained            the same, then refine (distillation against the original, KL on the logits)
  doped kron, post-training    compress --method kron --dope-share S (activation-weighted fit)
  doped kron, trained          the same, then refine with co-matrix dropout P (and the ablations below)
  kron, trained                no doping, then refine
Test metrics on held-out docstrings: cross-entropy and perplexity against the next word, top-1 agreement with
the original model's prediction, and the original's own numbers.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

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
    """tokens [batch, 32] -> logits [batch, 32, VOCAB], the LSTM unrolled over the 32 steps (torch gate order
    i, f, g, o); weights: embedding, lstm.W_ih [E, 4H], lstm.W_hh [H, 4H], lstm.b, head.weight, head.bias."""
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
        p = f"lstm/step{t}"
        nodes.append(node("Gather", ["zx", f"t{t}"], [f"{p}/zx"], name=f"{p}/zx", axis=1))
        z = f"{p}/zx"
        if t:
            nodes += [node("MatMul", [f"lstm/step{t - 1}/h", "lstm.W_hh"], [f"{p}/zh"], name=f"{p}/recurrent"),
                      node("Add", [f"{p}/zx", f"{p}/zh"], [f"{p}/z"], name=f"{p}/z")]
            z = f"{p}/z"
        nodes.append(node("Split", [z, "gate_sizes"], [f"{p}/{g}" for g in "ifgo"], name=f"{p}/gates", axis=1))
        nodes += [node("Sigmoid", [f"{p}/i"], [f"{p}/si"]), node("Sigmoid", [f"{p}/f"], [f"{p}/sf"]),
                  node("Tanh", [f"{p}/g"], [f"{p}/tg"]), node("Sigmoid", [f"{p}/o"], [f"{p}/so"]),
                  node("Mul", [f"{p}/si", f"{p}/tg"], [f"{p}/ig" if t else f"{p}/c"])]
        if t:
            nodes += [node("Mul", [f"{p}/sf", f"lstm/step{t - 1}/c"], [f"{p}/fc"]),
                      node("Add", [f"{p}/fc", f"{p}/ig"], [f"{p}/c"])]
        nodes += [node("Tanh", [f"{p}/c"], [f"{p}/tc"]), node("Mul", [f"{p}/so", f"{p}/tc"], [f"{p}/h"]),
                  node("Unsqueeze", [f"{p}/h", "axis1"], [f"{p}/h3"])]
        outputs.append(f"{p}/h3")
    nodes += [node("Concat", outputs, ["hidden"], axis=1),
              node("MatMul", ["hidden", "head.weight"], ["head_mm"], name="head"),
              node("Add", ["head_mm", "head.bias"], ["logits"], name="head_bias")]
    graph = helper.make_graph(nodes, "lstm_lm_unrolled",
                              [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", SEQ])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SEQ, VOCAB])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------------------------- evaluation


def logits_of(model, tokens, batch=64):
    from onnx_fwlr.io import runtime

    session = runtime.make_session(model, runtime.session_options(threads=2))
    parts = [session.run(None, {"tokens": tokens[i: i + batch]})[0] for i in range(0, len(tokens), batch)]
    return np.concatenate(parts)


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


# ------------------------------------------------------------------------------------- the benchmark


def configurations(args):
    """(label, compress options, refine options or None) for every row of the table."""
    lowrank = {"method": "whiten"}
    kron = {"method": "kron", "dope_share": args.dope_share}
    rows = [("low rank, post-training", lowrank, None),
            ("low rank, trained", lowrank, {"dope_dropout": 0.0}),
            ("doped kron, post-training", kron, None)]
    for p in args.dropouts:
        rows.append((f"doped kron, trained, dropout {p:g}", kron, {"dope_dropout": p}))
    if args.reselect:
        rows.append((f"doped kron, trained, dropout {args.dropouts[-1]:g}, reselect 1", kron,
                     {"dope_dropout": args.dropouts[-1], "reselect": 1}))
    rows.append(("kron, trained", {"method": "kron"}, {"dope_dropout": 0.0}))
    return rows


def run_config(model, calib_path, label, options, refine_options, ratio, test, reference, args, log, cache):
    from onnx_fwlr import compress
    from onnx_fwlr.refine.loop import refine

    start = time.perf_counter()
    key = (ratio, tuple(sorted(options.items())))
    if key not in cache:  # trained configurations start from the same post-training model
        cache[key] = compress(model, ratio=ratio, include=r"^lstm\.", calibration=str(calib_path), progress=False,
                              **options)
    compressed, report = cache[key]
    row = {"config": label, "ratio": ratio, "sites": [f"{s.name}: {s.note}" for s in report.sites]}
    dense, stored = lstm_params(report)
    row.update(dense_params=dense, stored_params=stored, compression=dense / stored)
    if refine_options is not None:
        compressed, refined = refine(model, compressed, str(calib_path), steps=args.steps, lr=args.lr,
                                     batch_size=args.batch_size, eval_every=args.eval_every, patience=args.patience,
                                     progress=False, **refine_options)
        row["refine"] = {"steps": refined.steps, "best_step": refined.best_step, "before": refined.before,
                         "after": refined.after, "step_seconds": refined.step_seconds, "dropped": refined.dropped,
                         "phases": refined.phases}
    row.update(metrics(logits_of(compressed, test[:, :-1]), test[:, 1:], reference))
    row["seconds"] = time.perf_counter() - start
    log(f"  {label:45s} ratio {ratio:.2f} ({row['compression']:.1f}x): CE {row['cross_entropy']:.3f}, "
        f"top-1 agree {100 * row['top1_agreement']:.1f} % ({row['seconds']:.0f} s)")
    return row


def table(rows) -> str:
    header = (f"{'config':<45} {'ratio':>5} {'stored':>7} {'compr.':>6} {'test CE':>7} {'ppl':>7} {'top-1 agree':>11} "
              f"{'accuracy':>8} {'steps':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        steps = r.get("refine", {}).get("best_step", "")
        lines.append(f"{r['config']:<45} {r['ratio']:>5.2f} {r.get('stored_params', ''):>7} "
                     f"{r.get('compression', 1.0):>6.1f} {r['cross_entropy']:>7.3f} {r['perplexity']:>7.1f} "
                     f"{100 * r['top1_agreement']:>9.1f} % {100 * r['accuracy']:>6.1f} % {steps:>5}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.05", help="stored numbers / dense of the LSTM weights")
    parser.add_argument("--steps", type=int, default=300, help="refine steps per trained configuration")
    parser.add_argument("--lr", type=float, default=2e-3, help="refine peak learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="refine batch (sequences of 32 tokens)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--dope-share", type=float, default=0.3, help="share of each site's budget spent on doping")
    parser.add_argument("--dropouts", default="0,0.5", help="co-matrix dropout probabilities to train with")
    parser.add_argument("--reselect", action="store_true", help="also train with one support re-selection")
    parser.add_argument("--calib", type=int, default=1024, help="calibration/training sequences (from train text)")
    parser.add_argument("--test", type=int, default=1024, help="test sequences at most (held-out docstrings)")
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
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    streams, _ = corpus(args.seed)
    weights = trained_weights(work, streams, args)
    model = lm_onnx(weights)
    onnx.save(model, work / "lstm_lm.onnx")
    export_error = float(np.max(np.abs(logits_of(model, weights["check_tokens"]) - weights["check_logits"])))
    if export_error > 1e-3:
        raise SystemExit(f"the unrolled ONNX LM disagrees with torch (max abs logit difference {export_error:.2e})")
    rng = np.random.default_rng(args.seed + 2)
    calib = windows(streams[0], args.calib, rng)[:, :-1]
    calib_path = work / "calib.npz"
    np.savez(calib_path, tokens=calib)
    test = tiles(streams[2])[: args.test]
    reference = logits_of(model, test[:, :-1])
    base = {"config": "original", "ratio": 1.0, "compression": 1.0, **metrics(reference, test[:, 1:], reference)}
    log(f"original: test CE {base['cross_entropy']:.3f} (torch val CE {float(weights['val_ce']):.3f}), "
        f"{len(test)} test sequences, {int(weights['steps'])} torch steps; export max abs error {export_error:.1e}")
    base["torch_steps"], base["export_error"] = int(weights["steps"]), export_error
    rows, cache = [base], {}
    for ratio in args.ratios:
        for label, options, refine_options in configurations(args):
            if args.only and args.only not in label:
                continue
            rows.append(run_config(model, calib_path, label, options, refine_options, ratio, test, reference, args,
                                   log, cache))
    print(f"\nLSTM LM (vocabulary {VOCAB}, embedding {EMBED}, hidden {HIDDEN}, unrolled over {SEQ} steps); "
          f"W_ih and W_hh compressed; {len(test)} x {SEQ} test tokens")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                             if k != "train_in_torch"}, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
