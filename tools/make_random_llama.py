"""A LLaMA-shaped decoder language model with random weights, written straight with onnx.helper (no torch).

RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, a final norm and an LM head, in the op
vocabulary an Optimum export uses (MatMul weights [in, out], Gather embedding, Trilu/Where causal mask).
Weights are streamed into one external `.data` file as they are drawn, so the 1.1 B preset (> 4 GB) never
sits in memory whole. Inputs: input_ids and attention_mask [batch, seq] (int64); output: logits
[batch, seq, vocab].

The LM head is tied to the embedding table (`--tie`): `copy` stores the head as its own initializer holding the
transposed table's bytes (what torch exports of tied models write), `transpose` reads Transpose(table), `none`
draws an independent head.

    python tools/make_random_llama.py --preset smollm2 -o /tmp/llama/smollm2_random.onnx --calib /tmp/llama/calib.npz
    python tools/make_random_llama.py --preset 1b -o /tmp/llama/llama_1b.onnx
    python tools/make_random_llama.py --preset tiny -o /tmp/llama/tiny.onnx
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRESETS = {  # hidden, layers, intermediate, vocab, heads, kv heads
    "tiny": dict(hidden=64, layers=2, intermediate=176, vocab=512, heads=4, kv_heads=2),
    "small": dict(hidden=256, layers=4, intermediate=688, vocab=8192, heads=8, kv_heads=2),
    "smollm2": dict(hidden=576, layers=30, intermediate=1536, vocab=49152, heads=9, kv_heads=3),
    "1b": dict(hidden=2048, layers=22, intermediate=5632, vocab=32000, heads=32, kv_heads=4),
}
OPSET = 18
ALIGNMENT = 4096


class _Writer:
    """Initializers whose data go to one external file as they are made (aligned, relative location)."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.stream = open(data_path, "wb")
        self.initializers: list[onnx.TensorProto] = []

    def external(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.stream.write(b"\0" * (-self.stream.tell() % ALIGNMENT))
        offset = self.stream.tell()
        self.stream.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = TensorProto.EXTERNAL
        self.initializers.append(tensor)
        return name

    def small(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def close(self):
        self.stream.close()


def _random(rng, rows, cols):
    """[rows, cols] with outputs of about unit variance for unit-variance inputs."""
    return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(1.0 / np.sqrt(rows)))


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type, inputs, name, **attributes):
        output = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attributes))
        return output


def _rms_norm(g, w, rng, x, hidden, prefix, param):
    square = g.op("Mul", [x, x], f"{prefix}/Mul")
    mean = g.op("ReduceMean", [square, "const_last_axis"], f"{prefix}/ReduceMean")
    shifted = g.op("Add", [mean, "const_eps"], f"{prefix}/Add")
    root = g.op("Sqrt", [shifted], f"{prefix}/Sqrt")
    normed = g.op("Div", [x, root], f"{prefix}/Div")
    scale = w.small(param, (1.0 + 0.02 * rng.standard_normal(hidden)).astype(np.float32))
    return g.op("Mul", [normed, scale], f"{prefix}/Mul_1")


def _linear(g, w, rng, x, rows, cols, prefix, param):
    weight = w.external(param, _random(rng, rows, cols))
    return g.op("MatMul", [x, weight], f"{prefix}/MatMul")


def _rotate(g, x, prefix):
    """x * cos + rotate_half(x) * sin, x [B, heads, T, head_dim]."""
    first = g.op("Slice", [x, "const_zero", "const_half", "const_last_axis"], f"{prefix}/Slice")
    second = g.op("Slice", [x, "const_half", "const_head_dim", "const_last_axis"], f"{prefix}/Slice_1")
    negated = g.op("Neg", [second], f"{prefix}/Neg")
    rotated = g.op("Concat", [negated, first], f"{prefix}/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [x, "rope_cos"], f"{prefix}/Mul"),
                        g.op("Mul", [rotated, "rope_sin"], f"{prefix}/Mul_1")], f"{prefix}/Add")


def _attention(g, w, rng, x, cfg, layer):
    hidden, heads, kv_heads = cfg["hidden"], cfg["heads"], cfg["kv_heads"]
    head_dim = hidden // heads
    prefix, param = f"/model/layers.{layer}/self_attn", f"model.layers.{layer}.self_attn"
    q = _linear(g, w, rng, x, hidden, heads * head_dim, f"{prefix}/q_proj", f"{param}.q_proj.weight")
    k = _linear(g, w, rng, x, hidden, kv_heads * head_dim, f"{prefix}/k_proj", f"{param}.k_proj.weight")
    v = _linear(g, w, rng, x, hidden, kv_heads * head_dim, f"{prefix}/v_proj", f"{param}.v_proj.weight")

    def split(t, n, name):  # [B, T, n*hd] -> [B, n, T, hd]
        shaped = g.op("Reshape", [t, w.small(f"{prefix}/{name}_shape", np.array([0, 0, n, head_dim], np.int64))],
                      f"{prefix}/{name}/Reshape")
        return g.op("Transpose", [shaped], f"{prefix}/{name}/Transpose", perm=[0, 2, 1, 3])

    def repeat(t, name):  # grouped-query attention: [B, kv, T, hd] -> [B, heads, T, hd]
        if kv_heads == heads:
            return t
        grown = g.op("Unsqueeze", [t, "const_axis2"], f"{prefix}/{name}/Unsqueeze")
        spread = g.op("Expand", [grown, w.small(f"{prefix}/{name}_repeat",
                                                 np.array([1, 1, heads // kv_heads, 1, 1], np.int64))],
                      f"{prefix}/{name}/Expand")
        return g.op("Reshape", [spread, w.small(f"{prefix}/{name}_merge", np.array([0, heads, -1, head_dim],
                                                                                    np.int64))],
                    f"{prefix}/{name}/Reshape_1")

    q = _rotate(g, split(q, heads, "q"), f"{prefix}/q_rot")
    k = repeat(_rotate(g, split(k, kv_heads, "k"), f"{prefix}/k_rot"), "k")
    v = repeat(split(v, kv_heads, "v"), "v")
    keys = g.op("Transpose", [k], f"{prefix}/Transpose_keys", perm=[0, 1, 3, 2])
    scores = g.op("Mul", [g.op("MatMul", [q, keys], f"{prefix}/MatMul_scores"),
                          w.small(f"{prefix}/scale", np.array(head_dim ** -0.5, np.float32))], f"{prefix}/Mul_scale")
    masked = g.op("Where", ["attention_keep", scores, "const_neg"], f"{prefix}/Where")
    probs = g.op("Softmax", [masked], f"{prefix}/Softmax", axis=-1)
    context = g.op("MatMul", [probs, v], f"{prefix}/MatMul_context")
    merged = g.op("Reshape", [g.op("Transpose", [context], f"{prefix}/Transpose_context", perm=[0, 2, 1, 3]),
                              "const_merge_heads"], f"{prefix}/Reshape_context")
    return _linear(g, w, rng, merged, heads * head_dim, hidden, f"{prefix}/o_proj", f"{param}.o_proj.weight")


def _mlp(g, w, rng, x, cfg, layer):
    hidden, inter = cfg["hidden"], cfg["intermediate"]
    prefix, param = f"/model/layers.{layer}/mlp", f"model.layers.{layer}.mlp"
    gate = _linear(g, w, rng, x, hidden, inter, f"{prefix}/gate_proj", f"{param}.gate_proj.weight")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{prefix}/act_fn/Sigmoid")], f"{prefix}/act_fn/Mul")
    up = _linear(g, w, rng, x, hidden, inter, f"{prefix}/up_proj", f"{param}.up_proj.weight")
    product = g.op("Mul", [silu, up], f"{prefix}/Mul")
    return _linear(g, w, rng, product, inter, hidden, f"{prefix}/down_proj", f"{param}.down_proj.weight")


def _positions(g, w, cfg):
    """rope_cos / rope_sin [T, head_dim] for positions 0..T-1, and attention_keep [B, 1, T, T] (causal and mask)."""
    head_dim = cfg["hidden"] // cfg["heads"]
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    w.small("rope_inv_freq", inv_freq.astype(np.float32))
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="/model/Shape"),
        helper.make_node("Gather", ["ids_shape", "const_one"], ["seq_len"], name="/model/Gather_seq"),
        helper.make_node("Squeeze", ["seq_len"], ["seq_scalar"], name="/model/Squeeze_seq"),
        helper.make_node("Range", ["const_zero_scalar", "seq_scalar", "const_one_scalar"], ["positions"],
                         name="/model/Range"),
        helper.make_node("Cast", ["positions"], ["positions_f"], name="/model/Cast_pos", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["positions_f", "const_last_axis"], ["positions_2d"], name="/model/Unsq_pos"),
        helper.make_node("Mul", ["positions_2d", "rope_inv_freq"], ["freqs"], name="/model/rotary/Mul"),
        helper.make_node("Concat", ["freqs", "freqs"], ["rope_angles"], name="/model/rotary/Concat", axis=-1),
        helper.make_node("Cos", ["rope_angles"], ["rope_cos"], name="/model/rotary/Cos"),
        helper.make_node("Sin", ["rope_angles"], ["rope_sin"], name="/model/rotary/Sin"),
        helper.make_node("Concat", ["seq_len", "seq_len"], ["square"], name="/model/Concat_square", axis=0),
        helper.make_node("ConstantOfShape", ["square"], ["ones"], name="/model/ConstantOfShape",
                         value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
        helper.make_node("Trilu", ["ones"], ["lower"], name="/model/Trilu", upper=0),
        helper.make_node("Cast", ["lower"], ["causal"], name="/model/Cast_causal", to=TensorProto.BOOL),
        helper.make_node("Cast", ["attention_mask"], ["mask_bool"], name="/model/Cast_mask", to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["mask_bool", "const_axes12"], ["mask_4d"], name="/model/Unsq_mask"),
        helper.make_node("And", ["causal", "mask_4d"], ["attention_keep"], name="/model/And"),
    ]
    g.nodes.extend(nodes)
    for name, value in (("const_one", [1]), ("const_zero", [0]), ("const_half", [head_dim // 2]),
                        ("const_head_dim", [head_dim]), ("const_last_axis", [-1]), ("const_axis2", [2]),
                        ("const_axes12", [1, 2]), ("const_merge_heads", [0, 0, cfg["hidden"]])):
        w.small(name, np.array(value, np.int64))
    w.small("const_zero_scalar", np.array(0, np.int64))
    w.small("const_one_scalar", np.array(1, np.int64))
    w.small("const_eps", np.array(1e-5, np.float32))
    w.small("const_neg", np.array(-1e9, np.float32))


def build(output: Path, cfg: dict, tie: str = "copy", seed: int = 0) -> Path:
    """Write output (.onnx) and output.data; returns the model path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = _Writer(output.with_name(output.name + ".data"))
    g = _Graph()
    try:
        table = rng.standard_normal((cfg["vocab"], cfg["hidden"]), dtype=np.float32)
        writer.external("model.embed_tokens.weight", table)
        x = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")
        _positions(g, writer, cfg)
        for layer in range(cfg["layers"]):
            prefix, param = f"/model/layers.{layer}", f"model.layers.{layer}"
            normed = _rms_norm(g, writer, rng, x, cfg["hidden"], f"{prefix}/input_layernorm",
                               f"{param}.input_layernorm.weight")
            x = g.op("Add", [x, _attention(g, writer, rng, normed, cfg, layer)], f"{prefix}/Add")
            normed = _rms_norm(g, writer, rng, x, cfg["hidden"], f"{prefix}/post_attention_layernorm",
                               f"{param}.post_attention_layernorm.weight")
            x = g.op("Add", [x, _mlp(g, writer, rng, normed, cfg, layer)], f"{prefix}/Add_1")
        x = _rms_norm(g, writer, rng, x, cfg["hidden"], "/model/norm", "model.norm.weight")
        if tie == "copy":
            head = writer.external("lm_head.weight", table.T)
        elif tie == "transpose":
            head = g.op("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])
        else:
            head = writer.external("lm_head.weight", _random(rng, cfg["hidden"], cfg["vocab"]))
        del table
        g.nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="/lm_head/MatMul"))
    finally:
        writer.close()
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
              for name in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", cfg["vocab"]])]
    graph = helper.make_graph(g.nodes, "random_llama", inputs, outputs, writer.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make_random_llama")
    model.ir_version = 9
    onnx.save_model(model, str(output))
    onnx.checker.check_model(str(output))
    return output


def write_calibration(path: Path, vocab: int, rows: int, seq: int, seed: int = 1) -> Path:
    """Random token rows (input_ids, attention_mask all ones) as an .npz."""
    rng = np.random.default_rng(seed)
    np.savez(path, input_ids=rng.integers(0, vocab, size=(rows, seq), dtype=np.int64),
             attention_mask=np.ones((rows, seq), dtype=np.int64))
    return path


def parameters(cfg: dict, tie: str) -> int:
    hidden, inter, heads, kv = cfg["hidden"], cfg["intermediate"], cfg["heads"], cfg["kv_heads"]
    kv_dim = hidden // heads * kv
    layer = hidden * (2 * hidden + 2 * kv_dim) + 3 * hidden * inter + 2 * hidden
    head = 0 if tie == "transpose" else hidden * cfg["vocab"]
    return cfg["layers"] * layer + cfg["vocab"] * hidden + hidden + head


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True, help="model path (.onnx; weights in .onnx.data)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for name in ("hidden", "layers", "intermediate", "vocab", "heads", "kv-heads"):
        parser.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    parser.add_argument("--tie", choices=("copy", "transpose", "none"), default="copy",
                        help="how the LM head relates to the embedding table (default copy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=Path, help="also write random calibration tokens here (.npz)")
    parser.add_argument("--rows", type=int, default=64, help="calibration rows (default 64)")
    parser.add_argument("--seq", type=int, default=128, help="calibration tokens per row (default 128)")
    args = parser.parse_args()
    cfg = dict(PRESETS[args.preset])
    for name in ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    path = build(args.output, cfg, args.tie, args.seed)
    if args.calib:
        write_calibration(args.calib, cfg["vocab"], args.rows, args.seq)
    size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
    print(json.dumps({"model": str(path), "config": cfg, "tie": args.tie, "parameters": parameters(cfg, args.tie),
                      "bytes": size}))


if __name__ == "__main__":
    main()
