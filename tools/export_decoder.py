"""Train a small LLaMA-architecture decoder on the standard library's docstrings and export it to ONNX with a KV cache.

Run `python tools/export_decoder.py` (any Python 3.11). Like tools/export_minilm.py it makes its own
virtual environment (<cache>/decoder-venv: a CPU build of torch, transformers, onnx, onnxruntime,
numpy) and runs itself again inside it; torch never enters the project's environment and nothing is
fetched from a model hub. The model is transformers' LlamaForCausalLM (grouped-query attention,
rotary position embeddings, RMSNorm, SwiGLU) with random initial weights, trained here for a few
minutes on CPU on tools/decoder_text.py's byte-level BPE tokens of stdlib docstring sentences.

Writes to <out> (default <cache>/decoder; `--size tiny --out sample_models/decoder` for the shipped sample):
    decoder.onnx               input_ids, attention_mask [batch, seq] -> logits [batch, seq, vocab] and
                               present.{i}.key / present.{i}.value [batch, kv_heads, seq, head_dim]
    decoder_with_past.onnx     the same plus inputs past_key_values.{i}.key/.value [batch, kv_heads, past,
                               head_dim]; attention_mask covers past + new tokens
    decoder_merged.onnx        one model: an If on use_cache_branch (bool [1]) runs either graph; the
                               weights are shared outer-scope initializers (optimum's merged layout)
    calib.npz / eval.npz       input_ids, attention_mask int64 [rows, seq]: whole sentences packed into
                               rows and right-padded; eval sentences are held out from training and calib
    tokenizer.json, report.json  the merges; sizes, timings, perplexities (model and unigram)

Linear weights are named after their torch module (e.g. model.layers.0.mlp.up_proj.weight, stored
[in, out] for MatMul), the same in all three files. Every export is checked against torch with ONNX
Runtime, and cached decoding against the full forward; any mismatch stops the script.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCH_REQUIREMENT = "torch==2.13.0"
OTHER_REQUIREMENTS = ["transformers", "onnx", "onnxruntime", "numpy"]
OPSET = 17
SEED = 0
MAX_ABS_DIFF = 2e-3

SIZES = {
    # hidden, layers, heads, kv heads, ffn, vocab, row length, calib rows, eval rows, train seconds
    "base": dict(hidden=256, layers=4, heads=8, kv_heads=2, ffn=688, vocab=512, seq=128,
                 calib_rows=256, eval_rows=128, train_seconds=270, batch=8),
    "tiny": dict(hidden=96, layers=2, heads=4, kv_heads=2, ffn=192, vocab=512, seq=64,
                 calib_rows=64, eval_rows=48, train_seconds=90, batch=16),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache",
                        help="folder for the virtual environment (default: <repo>/.cache)")
    parser.add_argument("--size", choices=sorted(SIZES), default="base",
                        help="base: hidden 256, 4 layers (default); tiny: hidden 96, 2 layers (sample_models)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <cache>/decoder[-tiny])")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="training time budget in seconds (default: 270 base, 90 tiny)")
    return parser.parse_args()


# ---------------------------------------------------------------- outside the venv

def venv_python(venv):
    return venv / "bin" / "python"


def ensure_venv(venv):
    """Create the venv with the pinned CPU torch, then the rest; skip when already done."""
    marker = venv / "decoder-ready.txt"
    wanted = "\n".join([TORCH_REQUIREMENT, *OTHER_REQUIREMENTS]) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        print(f"venv ready: {venv}")
        return
    python = str(venv_python(venv))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", TORCH_REQUIREMENT], check=True)
    subprocess.run([python, "-m", "pip", "install", TORCH_REQUIREMENT, *OTHER_REQUIREMENTS], check=True)
    cuda = subprocess.run([python, "-c", "import torch; print(torch.version.cuda)"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if cuda != "None":
        sys.exit(f"ERROR: pip installed a CUDA build of torch in {venv}; remove it and install a CPU wheel.")
    marker.write_text(wanted)


def in_venv(venv):
    return Path(sys.prefix).resolve() == venv.resolve()


# ---------------------------------------------------------------- inside the venv: data and training

def make_data(size):
    """Tokenizer, training token stream, calib rows and eval rows (eval sentences never seen in training)."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decoder_text import Tokenizer, pack_rows, train_bpe
    from minilm_sentences import harvest_sentences

    sentences = harvest_sentences()
    eval_count = len(sentences) // 16
    eval_sentences, train_sentences = sentences[:eval_count], sentences[eval_count:]
    tokenizer = Tokenizer(train_bpe(train_sentences, size["vocab"]))
    train_encoded = [tokenizer.encode(s) for s in train_sentences]
    stream = np.fromiter((i for ids in train_encoded for i in ids), dtype=np.int64)
    calib = pack_rows(train_encoded, size["seq"], size["calib_rows"])
    evaluation = pack_rows([tokenizer.encode(s) for s in eval_sentences], size["seq"], size["eval_rows"])
    print(f"sentences: {len(train_sentences)} train, {eval_count} held out; training tokens {stream.size}; "
          f"vocab {tokenizer.vocab_size}; calib {calib['input_ids'].shape}, eval {evaluation['input_ids'].shape}")
    return tokenizer, stream, calib, evaluation


def build_model(size, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                         num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                         intermediate_size=size["ffn"], max_position_embeddings=4 * size["seq"],
                         rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, attn_implementation="eager")
    return LlamaForCausalLM(config)


def train(model, stream, size, seconds):
    """AdamW on random windows of the token stream until the time budget is spent."""
    import numpy as np
    import torch

    rng = np.random.default_rng(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    seq, batch = size["seq"], size["batch"]
    start, step, losses = time.perf_counter(), 0, []
    model.train()
    while time.perf_counter() - start < seconds:
        fraction = (time.perf_counter() - start) / seconds
        for group in optimizer.param_groups:  # linear warm-up over 20 steps, then cosine to 10 %
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + np.cos(np.pi * fraction)))
        offsets = rng.integers(0, stream.size - seq, size=batch)
        ids = torch.from_numpy(np.stack([stream[o:o + seq] for o in offsets]))
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            print(f"  step {step:4d}  {time.perf_counter() - start:6.1f} s  loss {np.mean(losses[-25:]):.3f}")
        step += 1
    model.eval()
    return step, time.perf_counter() - start


def torch_perplexity(model, rows):
    """Next-token perplexity of the HF model on padded rows (padding targets ignored)."""
    import torch

    ids = torch.from_numpy(rows["input_ids"])
    mask = torch.from_numpy(rows["attention_mask"])
    labels = ids.masked_fill(mask == 0, -100)
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, ids.shape[0], 16):
            logits = model(input_ids=ids[s:s + 16], attention_mask=mask[s:s + 16]).logits
            target = labels[s:s + 16, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    target.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((target != -100).sum())
    return float(torch.exp(torch.tensor(total / count)))


# ---------------------------------------------------------------- inside the venv: export

def export_wrapper(lm, with_past):
    """A module computing LlamaForCausalLM's forward from its own submodules, with explicit past/present tensors."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    config = lm.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, *past):
            model = self.lm.model
            batch, length = input_ids.shape
            past_length = past[0].shape[2] if with_past else 0
            x = model.embed_tokens(input_ids)
            positions = torch.arange(length).unsqueeze(0) + past_length
            cos, sin = model.rotary_emb(x, positions)
            key_positions = torch.arange(past_length + length)
            causal = key_positions.unsqueeze(0) <= positions.transpose(0, 1)
            keep = causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
            presents = []
            for index, layer in enumerate(model.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(batch, length, heads, head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(batch, length, kv_heads, head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(batch, length, kv_heads, head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                if with_past:
                    k = torch.cat([past[2 * index], k], dim=2)
                    v = torch.cat([past[2 * index + 1], v], dim=2)
                presents += [k, v]
                scores = q @ repeat_kv(k, heads // kv_heads).transpose(2, 3) * head_dim ** -0.5
                scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
                context = torch.softmax(scores, dim=-1) @ repeat_kv(v, heads // kv_heads)
                x = x + attn.o_proj(context.transpose(1, 2).reshape(batch, length, heads * head_dim))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            return (self.lm.lm_head(model.norm(x)), *presents)

    return Decoder().eval()


def io_names(layers, with_past):
    inputs = ["input_ids", "attention_mask"]
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present})
    return (inputs + past if with_past else inputs), ["logits", *present], axes


def export(lm, path, with_past, example):
    import torch

    layers = lm.config.num_hidden_layers
    inputs, outputs, axes = io_names(layers, with_past)
    axes = {k: v for k, v in axes.items() if k in inputs + outputs}
    with torch.inference_mode():
        torch.onnx.export(export_wrapper(lm, with_past), example, str(path), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)


def name_weights(path, lm):
    """Give every MatMul weight its torch module's name (the exporter writes onnx::MatMul_N), and its node a name
    after it, in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    by_shape = {}
    for name, module in lm.named_modules():
        if isinstance(module, __import__("torch").nn.Linear):
            by_shape.setdefault(tuple(module.weight.shape[::-1]), []).append(
                (f"{name}.weight", module.weight.detach().numpy().T))
    renames = {}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        for name, value in by_shape.get(tuple(array.shape), []):
            if np.array_equal(array, value):
                renames[init.name] = name
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        if node.op_type == "MatMul" and node.input[1] in renames.values():  # e.g. model.layers.0.mlp.up_proj/MatMul
            node.name = node.input[1].removesuffix(".weight") + "/MatMul"
    expected = sum(len(v) for v in by_shape.values())
    if len(renames) != expected:
        sys.exit(f"ERROR: matched {len(renames)} of {expected} linear weights to MatMul initializers in {path}.")
    onnx.save(model, str(path))
    return len(renames)


def merge(no_cache_path, with_past_path, out_path):
    """One model with an If on use_cache_branch; initializers equal in both (name and value) become shared
    outer-scope initializers, so the weights are stored once.

    Everything else a branch computes or holds is prefixed with the branch's name, so the two bodies never
    clash; graph inputs stay outer-scope references.
    """
    import onnx
    from onnx import TensorProto, helper

    graphs = [onnx.load(str(path)).graph for path in (with_past_path, no_cache_path)]
    held = [{t.name: t.SerializeToString() for t in g.initializer} for g in graphs]
    shared = {name for name, data in held[0].items() if held[1].get(name) == data}
    bodies, outer = [], {}
    for prefix, graph in zip(("past/", "nocache/"), graphs):
        rename = {}
        for init in graph.initializer:
            if init.name not in shared:
                rename[init.name] = prefix + init.name
                init.name = prefix + init.name
            outer.setdefault(init.name, init)
        for node in graph.node:  # topological order: inputs are renamed before they are read
            node.name = prefix + node.name
            node.input[:] = [rename.get(i, i) for i in node.input]
            rename.update({o: prefix + o for o in node.output if o})
            node.output[:] = [rename.get(o, o) for o in node.output]
        outputs = []
        for value in graph.output:
            renamed = onnx.ValueInfoProto()
            renamed.CopyFrom(value)
            renamed.name = rename[value.name]
            outputs.append(renamed)
        bodies.append(helper.make_graph(list(graph.node), prefix.rstrip("/"), [], outputs))
    with_past = onnx.load(str(with_past_path)).graph
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in with_past.output], name="optimum::if",
                            then_branch=bodies[0], else_branch=bodies[1])
    graph = helper.make_graph([node], "decoder_merged", list(with_past.input) + [flag], list(with_past.output),
                              initializer=list(outer.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


# ---------------------------------------------------------------- inside the venv: checks

def save_npz(path, arrays):
    """npz written with a fixed zip timestamp, so the same arrays give the same bytes."""
    import io
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(2024, 1, 1, 0, 0, 0)), buffer.getvalue())


def check(name, got, want, mask=None):
    import numpy as np

    diff = np.abs(got - want)
    if mask is not None:
        diff = diff[mask.astype(bool)]
    worst = float(diff.max()) if diff.size else 0.0
    print(f"  {name}: max abs diff {worst:.2e}  {'OK' if worst <= MAX_ABS_DIFF else 'FAIL'}")
    if worst > MAX_ABS_DIFF:
        sys.exit(f"ERROR: {name} differs by {worst:.3g} (allowed {MAX_ABS_DIFF}).")


def empty_past(session, batch):
    import numpy as np

    shapes = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    return {name: np.zeros((batch, shape[1], 0, shape[3]), dtype=np.float32) for name, shape in shapes.items()}


def verify(lm, out_dir, rows):
    """ONNX Runtime against torch; the cached path and the merged model against the full forward."""
    import numpy as np
    import onnxruntime as ort
    import torch

    feed = {k: v[:4] for k, v in rows.items()}
    with torch.inference_mode():
        hf = lm(input_ids=torch.from_numpy(feed["input_ids"]),
                attention_mask=torch.from_numpy(feed["attention_mask"])).logits.numpy()
        wrapped = export_wrapper(lm, False)(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask")))
    mask = np.broadcast_to(feed["attention_mask"][..., None], hf.shape)
    check("export wrapper vs LlamaForCausalLM (real tokens)", wrapped[0].numpy(), hf, mask)
    sessions = {name: ort.InferenceSession(str(out_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                for name in ("decoder", "decoder_with_past", "decoder_merged")}
    full = sessions["decoder"].run(None, feed)
    check("decoder.onnx vs torch (logits, real tokens)", full[0], hf, mask)
    for k, (got, want) in enumerate(zip(full[1:], wrapped[1:])):
        if k == 0:
            check("decoder.onnx vs torch (present.0.key)", got, want.numpy())
    split = feed["input_ids"].shape[1] // 2
    first = {k: v[:, :split] for k, v in feed.items()}
    prefix = sessions["decoder"].run(None, first)
    names = [i.name for i in sessions["decoder_with_past"].get_inputs() if i.name.startswith("past_key_values.")]
    past_feed = dict(zip(names, prefix[1:]), input_ids=feed["input_ids"][:, split:],
                     attention_mask=feed["attention_mask"])
    rest = sessions["decoder_with_past"].run(None, past_feed)
    check("with-past continuation vs full forward", rest[0], full[0][:, split:], mask[:, split:])
    merged_empty = dict(feed, use_cache_branch=np.array([False]), **empty_past(sessions["decoder_merged"], 4))
    check("merged, no-cache branch", sessions["decoder_merged"].run(None, merged_empty)[0], full[0])
    merged_past = dict(past_feed, use_cache_branch=np.array([True]))
    check("merged, cache branch", sessions["decoder_merged"].run(None, merged_past)[0], rest[0])


def onnx_perplexity(path, rows):
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decoder_text import next_token_targets

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    targets, keep = next_token_targets(rows)
    total, count = 0.0, 0
    for s in range(0, rows["input_ids"].shape[0], 16):
        logits = session.run(["logits"], {k: v[s:s + 16] for k, v in rows.items()})[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_p, targets[s:s + 16, :, None], axis=-1)[..., 0]
        total -= float(picked[keep[s:s + 16]].sum())
        count += int(keep[s:s + 16].sum())
    return float(np.exp(total / count))


def export_all(out_dir, size_name, seconds):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decoder_text import unigram_perplexity

    size = SIZES[size_name]
    seconds = size["train_seconds"] if seconds is None else seconds
    torch.manual_seed(SEED)
    # One thread: on a busy 2-core machine two threads waited on each other (5 s per step against 1.1 s).
    torch.set_num_threads(int(os.environ.get("DECODER_THREADS", "1")))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}")
    tokenizer, stream, calib, evaluation = make_data(size)
    lm = build_model(size, tokenizer.vocab_size)
    params = sum(p.numel() for p in lm.parameters())
    print(f"LlamaForCausalLM {size_name}: {params:,} parameters; training for {seconds:.0f} s")
    steps, train_seconds = train(lm, stream, size, seconds)
    lm_ppl = torch_perplexity(lm, evaluation)
    uni_ppl = unigram_perplexity(stream, evaluation)
    print(f"held-out perplexity: model {lm_ppl:.2f}, unigram {uni_ppl:.2f} ({steps} steps, {train_seconds:.0f} s)")
    if not lm_ppl < 0.5 * uni_ppl:
        sys.exit("ERROR: the model is not clearly better than a unigram model; train longer (--train-seconds).")

    example = tuple(torch.from_numpy(calib[k][:2, :8]) for k in ("input_ids", "attention_mask"))
    layers, kv_heads = lm.config.num_hidden_layers, lm.config.num_key_value_heads
    head_dim = lm.config.hidden_size // lm.config.num_attention_heads
    past = tuple(torch.zeros(2, kv_heads, 5, head_dim) for _ in range(2 * layers))
    past_example = (example[0], torch.ones(2, 13, dtype=torch.int64), *past)
    export(lm, out_dir / "decoder.onnx", False, example)
    export(lm, out_dir / "decoder_with_past.onnx", True, past_example)
    for name in ("decoder", "decoder_with_past"):
        print(f"{name}.onnx: {name_weights(out_dir / f'{name}.onnx', lm)} linear weights named")
    merge(out_dir / "decoder.onnx", out_dir / "decoder_with_past.onnx", out_dir / "decoder_merged.onnx")
    verify(lm, out_dir, evaluation)
    ort_ppl = onnx_perplexity(out_dir / "decoder.onnx", evaluation)
    print(f"decoder.onnx held-out perplexity in ONNX Runtime: {ort_ppl:.3f}")

    save_npz(out_dir / "calib.npz", calib)
    save_npz(out_dir / "eval.npz", evaluation)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_json() + "\n")
    report = {"size": size_name, "config": size, "parameters": params, "train_steps": steps,
              "train_seconds": round(train_seconds, 1), "perplexity_torch": round(lm_ppl, 3),
              "perplexity_onnx": round(ort_ppl, 3), "perplexity_unigram": round(uni_ppl, 3),
              "calib_rows": int(calib["input_ids"].shape[0]), "eval_rows": int(evaluation["input_ids"].shape[0]),
              "torch": torch.__version__, "transformers": transformers.__version__}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    sample = "Return the number of items in the"
    ids = tokenizer.encode(sample)[:-1]
    session = ort.InferenceSession(str(out_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for _ in range(12):
        logits = session.run(["logits"], {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)),
                                                                                                  np.int64)})[0]
        ids.append(int(logits[0, -1].argmax()))
    print(f"greedy sample: {tokenizer.decode(ids[1:])!r}")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path}  {path.stat().st_size / 1e6:.2f} MB")


def main():
    args = parse_args()
    cache = args.cache.resolve()
    venv = cache / "decoder-venv"
    out = (args.out or cache / ("decoder" if args.size == "base" else f"decoder-{args.size}")).resolve()
    if in_venv(venv):
        start = time.perf_counter()
        export_all(out, args.size, args.train_seconds)
        print(f"export and checks took {time.perf_counter() - start:.1f} s")
        return
    ensure_venv(venv)
    argv = [str(venv_python(venv)), str(Path(__file__).resolve()), "--cache", str(cache), "--size", args.size,
            "--out", str(out)]
    if args.train_seconds is not None:
        argv += ["--train-seconds", str(args.train_seconds)]
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
