"""A two-layer BERT-style encoder in a few lines of onnx.helper, shared by the backward-pass and refine tests."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H, HEADS, FFN, VOCAB, SEQ, BATCH, CLASSES, LAYERS = 8, 2, 16, 11, 5, 3, 3, 2


def make_bert(dtype=np.float64, seed=0) -> onnx.ModelProto:
    """A two-layer BERT-style encoder: embeddings, masked attention, Erf-GELU FFN, CLS Gemm head + Softmax."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits, nodes = [], []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype if np.asarray(value).dtype.kind == "f"
                                                        else np.asarray(value).dtype), name))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def weight(name, *shape, scale=0.5):
        return init(name, rng.normal(0, scale, shape))

    def layer_norm(x, name):
        return node("LayerNormalization", [x, weight(name + ".g", H, scale=0.3), weight(name + ".b", H, scale=0.1)],
                    name, axis=-1, epsilon=1e-5)

    def linear(x, name, k, n):
        return node("Add", [node("MatMul", [x, weight(name + ".W", k, n)], name + ".mm"),
                            weight(name + ".bias", n, scale=0.1)], name)

    emb = node("Gather", [weight("word_emb", VOCAB, H), "input_ids"], "emb")
    x = layer_norm(node("Add", [emb, weight("pos_emb", SEQ, H)], "emb_pos"), "ln0")
    keep = node("Unsqueeze", [node("Equal", ["attention_mask", init("one", np.array(1, np.int64))], "keep2d"),
                              init("mask_axes", np.array([1, 2], np.int64))], "keep")
    init("neg_big", np.array(-1e4))
    init("scale", np.array(1 / np.sqrt(H // HEADS)))
    for li in range(LAYERS):
        p = f"l{li}"
        shape = node("Shape", [x], p + ".shape")
        b_t = node("Slice", [shape, init(p + ".s0", np.array([0], np.int64)), init(p + ".s2", np.array([2], np.int64))],
                   p + ".bt")
        heads_shape = node("Concat", [b_t, init(p + ".hd", np.array([HEADS, H // HEADS], np.int64))],
                           p + ".heads_shape", axis=0)

        def split_heads(t, perm):
            return node("Transpose", [node("Reshape", [t, heads_shape], t + ".r")], t + ".t", perm=perm)

        q = split_heads(linear(x, p + ".q", H, H), [0, 2, 1, 3])
        k = split_heads(linear(x, p + ".k", H, H), [0, 2, 3, 1])
        v = split_heads(linear(x, p + ".v", H, H), [0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], p + ".qk"), "scale"], p + ".scores")
        probs = node("Softmax", [node("Where", [keep, scores, "neg_big"], p + ".masked")], p + ".probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], p + ".ctx_h")], p + ".ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, init(p + ".flat", np.array([0, 0, H], np.int64))], p + ".ctx")
        x = layer_norm(node("Add", [x, linear(ctx, p + ".o", H, H)], p + ".res1"), p + ".ln1")
        h = linear(x, p + ".ffn1", H, FFN)
        cdf = node("Add", [node("Erf", [node("Div", [h, init(p + ".sqrt2", np.array(np.sqrt(2.0)))], p + ".hs")],
                                p + ".erf"), init(p + ".one_f", np.array(1.0))], p + ".erf1")
        gelu = node("Mul", [node("Mul", [h, cdf], p + ".hcdf"), init(p + ".half", np.array(0.5))], p + ".gelu")
        x = layer_norm(node("Add", [x, linear(gelu, p + ".ffn2", FFN, H)], p + ".res2"), p + ".ln2")
    cls = node("Gather", [x, init("zero", np.array(0, np.int64))], "cls", axis=1)
    node("Gemm", [cls, weight("head.W", CLASSES, H), weight("head.b", CLASSES, scale=0.1)], "logits", transB=1)
    node("Softmax", ["logits"], "probs", axis=-1)
    graph = helper.make_graph(
        nodes, "bert",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", SEQ]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", SEQ])],
        [helper.make_tensor_value_info("logits", elem, ["B", CLASSES]),
         helper.make_tensor_value_info("probs", elem, ["B", CLASSES]),
         helper.make_tensor_value_info(x, elem, ["B", SEQ, H])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def make_feed(rng, batch=BATCH):
    ids = rng.integers(0, VOCAB, size=(batch, SEQ))
    mask = np.ones((batch, SEQ), dtype=np.int64)
    mask[0, -2:] = 0  # padding in the first sample
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}
