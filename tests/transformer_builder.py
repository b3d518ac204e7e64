"""A BERT-style encoder ONNX graph with random weights, shaped like PyTorch's opset-17 export.

Used by tests and benchmarks as a stand-in for a real sentence-transformer (no download needed).
With low_rank_decay the MatMul weights have an exponentially decaying singular spectrum, so
low-rank compression has something real to find.

    python tools/synthetic_transformer.py --hidden 64 --layers 2 -o /tmp/bert_tiny.onnx
"""


import numpy as np
from onnx import TensorProto, helper, numpy_helper

LAYER_NORM_EPSILON = 1e-12
MASK_FILL = -10000.0


class _GraphBuilder:
    """Collects nodes, initializers and Constant nodes; names outputs the way the exporter does."""

    def __init__(self):
        self.nodes = []
        self.initializers = []

    def op(self, op_type, inputs, name, output=None, **attributes):
        output = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attributes))
        return output

    def constant(self, name, array):
        """A Constant node (how the exporter writes shapes, axes and scalars)."""
        output = f"{name}_output_0"
        tensor = numpy_helper.from_array(np.asarray(array), output)
        self.nodes.append(helper.make_node("Constant", [], [output], name=name, value=tensor))
        return output

    def weight(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name


def _weight_matrix(rng, rows, cols, low_rank_decay):
    """[rows, cols] weight whose outputs keep about unit variance for unit-variance inputs.

    With low_rank_decay: U diag(s) Vᵀ with random orthonormal U, V and s_i ∝ exp(-i / (r/4)),
    scaled so ‖W‖_F² = cols, the same as a Gaussian with std 1/√rows.
    """
    if not low_rank_decay:
        return rng.normal(0.0, 1.0 / np.sqrt(rows), size=(rows, cols))
    rank = min(rows, cols)
    left, _ = np.linalg.qr(rng.normal(size=(rows, rank)))
    right, _ = np.linalg.qr(rng.normal(size=(cols, rank)))
    spectrum = np.exp(-np.arange(rank) / (rank / 4.0))
    spectrum *= np.sqrt(cols / np.sum(spectrum**2))
    return (left * spectrum) @ right.T


def _linear(builder, rng, x, rows, cols, prefix, low_rank_decay):
    """MatMul(x, W[rows, cols]) + Add(bias), as the exporter writes nn.Linear."""
    param = prefix.strip("/").replace("/", ".")
    weight = builder.weight(f"{param}.weight", _weight_matrix(rng, rows, cols, low_rank_decay))
    bias = builder.weight(f"{param}.bias", rng.normal(0.0, 0.1, size=cols))
    product = builder.op("MatMul", [x, weight], f"{prefix}/MatMul")
    return builder.op("Add", [bias, product], f"{prefix}/Add")


def _layer_norm(builder, rng, x, hidden, prefix, output=None):
    param = prefix.strip("/").replace("/", ".")
    scale = builder.weight(f"{param}.weight", 1.0 + rng.normal(0.0, 0.1, size=hidden))
    bias = builder.weight(f"{param}.bias", rng.normal(0.0, 0.1, size=hidden))
    return builder.op("LayerNormalization", [x, scale, bias], f"{prefix}/LayerNormalization",
                      output=output, axis=-1, epsilon=LAYER_NORM_EPSILON)


def _embeddings(builder, rng, hidden, vocab, max_len):
    """Word + token-type + position embeddings (positions sliced to the sequence length), then LN."""
    word_table = builder.weight("embeddings.word_embeddings.weight",
                                rng.normal(0.0, 1.0, size=(vocab, hidden)))
    type_table = builder.weight("embeddings.token_type_embeddings.weight",
                                rng.normal(0.0, 0.5, size=(2, hidden)))
    position_table = builder.weight("embeddings.position_embeddings.weight",
                                    rng.normal(0.0, 0.5, size=(max_len, hidden)))
    builder.initializers.append(numpy_helper.from_array(
        np.arange(max_len, dtype=np.int64)[None, :], "embeddings.position_ids"))

    words = builder.op("Gather", [word_table, "input_ids"], "/embeddings/word_embeddings/Gather")
    types = builder.op("Gather", [type_table, "token_type_ids"],
                       "/embeddings/token_type_embeddings/Gather")
    summed = builder.op("Add", [words, types], "/embeddings/Add")

    shape = builder.op("Shape", ["input_ids"], "/embeddings/Shape")
    seq_len = builder.op("Gather", [shape, builder.constant("/embeddings/Constant", np.int64(1))],
                         "/embeddings/Gather", axis=0)
    seq_end = builder.op("Unsqueeze", [seq_len, builder.constant("/embeddings/Constant_1",
                                                                 np.array([0], np.int64))],
                         "/embeddings/Unsqueeze")
    position_ids = builder.op(
        "Slice",
        ["embeddings.position_ids", builder.constant("/embeddings/Constant_2", np.array([0], np.int64)),
         seq_end, builder.constant("/embeddings/Constant_3", np.array([1], np.int64))],
        "/embeddings/Slice")
    positions = builder.op("Gather", [position_table, position_ids],
                           "/embeddings/position_embeddings/Gather")
    summed = builder.op("Add", [summed, positions], "/embeddings/Add_1")
    return _layer_norm(builder, rng, summed, hidden, "/embeddings/LayerNorm")


def _extended_mask(builder):
    """(1 - mask) * -10000 as [batch, 1, 1, seq], added to the attention scores."""
    axes = builder.constant("/Constant", np.array([1, 2], np.int64))
    mask = builder.op("Unsqueeze", ["attention_mask", axes], "/Unsqueeze")
    mask = builder.op("Cast", [mask], "/Cast", to=TensorProto.FLOAT)
    inverted = builder.op("Sub", [builder.constant("/Constant_1", np.float32(1.0)), mask], "/Sub")
    return builder.op("Mul", [inverted, builder.constant("/Constant_2", np.float32(MASK_FILL))], "/Mul")


def _split_heads(builder, x, heads, head_dim, prefix, perm):
    shape = builder.constant(f"{prefix}/Constant", np.array([0, 0, heads, head_dim], np.int64))
    x = builder.op("Reshape", [x, shape], f"{prefix}/Reshape")
    return builder.op("Transpose", [x], f"{prefix}/Transpose", perm=perm)


def _attention(builder, rng, x, mask, hidden, heads, prefix, low_rank_decay):
    head_dim = hidden // heads
    self_prefix = f"{prefix}/attention/self"
    query = _linear(builder, rng, x, hidden, hidden, f"{self_prefix}/query", low_rank_decay)
    key = _linear(builder, rng, x, hidden, hidden, f"{self_prefix}/key", low_rank_decay)
    value = _linear(builder, rng, x, hidden, hidden, f"{self_prefix}/value", low_rank_decay)
    query = _split_heads(builder, query, heads, head_dim, f"{self_prefix}/query_heads", [0, 2, 1, 3])
    key = _split_heads(builder, key, heads, head_dim, f"{self_prefix}/key_heads", [0, 2, 3, 1])
    value = _split_heads(builder, value, heads, head_dim, f"{self_prefix}/value_heads", [0, 2, 1, 3])

    scores = builder.op("MatMul", [query, key], f"{self_prefix}/MatMul")
    scale = builder.constant(f"{self_prefix}/Constant", np.float32(np.sqrt(head_dim)))
    scores = builder.op("Div", [scores, scale], f"{self_prefix}/Div")
    scores = builder.op("Add", [scores, mask], f"{self_prefix}/Add")
    probs = builder.op("Softmax", [scores], f"{self_prefix}/Softmax", axis=-1)
    context = builder.op("MatMul", [probs, value], f"{self_prefix}/MatMul_1")
    context = builder.op("Transpose", [context], f"{self_prefix}/Transpose", perm=[0, 2, 1, 3])
    merged = builder.constant(f"{self_prefix}/Constant_1", np.array([0, 0, hidden], np.int64))
    context = builder.op("Reshape", [context, merged], f"{self_prefix}/Reshape")

    out_prefix = f"{prefix}/attention/output"
    projected = _linear(builder, rng, context, hidden, hidden, f"{out_prefix}/dense", low_rank_decay)
    residual = builder.op("Add", [projected, x], f"{out_prefix}/Add")
    return _layer_norm(builder, rng, residual, hidden, f"{out_prefix}/LayerNorm")


def _gelu(builder, x, prefix):
    """Erf GELU: x * (1 + erf(x / √2)) * 0.5, node by node as the exporter writes it."""
    scaled = builder.op("Div", [x, builder.constant(f"{prefix}/Constant", np.float32(np.sqrt(2.0)))],
                        f"{prefix}/Div")
    erf = builder.op("Erf", [scaled], f"{prefix}/Erf")
    shifted = builder.op("Add", [erf, builder.constant(f"{prefix}/Constant_1", np.float32(1.0))],
                         f"{prefix}/Add")
    product = builder.op("Mul", [x, shifted], f"{prefix}/Mul")
    return builder.op("Mul", [product, builder.constant(f"{prefix}/Constant_2", np.float32(0.5))],
                      f"{prefix}/Mul_1")


def _feed_forward(builder, rng, x, hidden, ffn, prefix, low_rank_decay, output=None):
    inner = _linear(builder, rng, x, hidden, ffn, f"{prefix}/intermediate/dense", low_rank_decay)
    inner = _gelu(builder, inner, f"{prefix}/intermediate/intermediate_act_fn")
    outer = _linear(builder, rng, inner, ffn, hidden, f"{prefix}/output/dense", low_rank_decay)
    residual = builder.op("Add", [outer, x], f"{prefix}/output/Add")
    return _layer_norm(builder, rng, residual, hidden, f"{prefix}/output/LayerNorm", output)


def _mean_pool_normalised(builder, hidden_states):
    """Masked mean over tokens, then L2 normalisation (sentence-transformers' Pooling + Normalize)."""
    mask = builder.op("Unsqueeze", ["attention_mask", builder.constant("/pooler/Constant",
                                                                       np.array([-1], np.int64))],
                      "/pooler/Unsqueeze")
    mask = builder.op("Cast", [mask], "/pooler/Cast", to=TensorProto.FLOAT)
    masked = builder.op("Mul", [hidden_states, mask], "/pooler/Mul")
    token_axis = builder.constant("/pooler/Constant_1", np.array([1], np.int64))
    total = builder.op("ReduceSum", [masked, token_axis], "/pooler/ReduceSum", keepdims=0)
    count = builder.op("ReduceSum", [mask, token_axis], "/pooler/ReduceSum_1", keepdims=0)
    count = builder.op("Clip", [count, builder.constant("/pooler/Constant_2", np.float32(1e-9))],
                       "/pooler/Clip")
    mean = builder.op("Div", [total, count], "/pooler/Div")
    norm = builder.op("ReduceL2", [mean], "/normalize/ReduceL2", axes=[1], keepdims=1)
    norm = builder.op("Clip", [norm, builder.constant("/normalize/Constant", np.float32(1e-12))],
                      "/normalize/Clip")
    builder.op("Div", [mean, norm], "/normalize/Div", output="sentence_embedding")


def build_transformer(hidden=64, layers=2, heads=4, ffn=256, vocab=1000, max_len=128, seed=0,
                      low_rank_decay=True):
    """BERT-style encoder ModelProto (opset 17) with outputs last_hidden_state and sentence_embedding."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}).")
    rng = np.random.default_rng(seed)
    builder = _GraphBuilder()
    x = _embeddings(builder, rng, hidden, vocab, max_len)
    mask = _extended_mask(builder)
    for index in range(layers):
        prefix = f"/encoder/layer.{index}"
        x = _attention(builder, rng, x, mask, hidden, heads, prefix, low_rank_decay)
        last = "last_hidden_state" if index == layers - 1 else None
        x = _feed_forward(builder, rng, x, hidden, ffn, prefix, low_rank_decay, output=last)
    _mean_pool_normalised(builder, x)

    token_inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
                    for name in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                      ["batch", "sequence", hidden]),
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
    ]
    graph = helper.make_graph(builder.nodes, "synthetic_bert", token_inputs, outputs,
                              builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnx_fwlr",
                              doc_string="Synthetic BERT-style encoder with random weights.")
    model.ir_version = 9
    helper.set_model_props(model, {
        "source": "tools/synthetic_transformer.py",
        "config": f"hidden={hidden} layers={layers} heads={heads} ffn={ffn} vocab={vocab} "
                  f"max_len={max_len} seed={seed} low_rank_decay={low_rank_decay}",
    })
    return model


def make_token_batch(n, seq, vocab, seed=0):
    """Feed dict of int64 [n, seq] arrays padded like a tokenizer with padding='longest'.

    Each row has a random length in [1, seq] (one row uses the full length); tokens after the
    length are id 0 with attention_mask 0. Single-sentence input, so token_type_ids are all 0.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, size=n)
    lengths[rng.integers(n)] = seq
    attention_mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    input_ids = rng.integers(1, vocab, size=(n, seq), dtype=np.int64) * attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": np.zeros((n, seq), dtype=np.int64),
    }
