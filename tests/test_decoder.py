"""Decoder language models with a KV cache: a tiny LLaMA-like decoder built with onnx.helper.

One attention layer (RMSNorm pieces, rotary embedding from Sin/Cos/Neg/Slice/Concat, a causal mask from
Trilu/Where, past/present tensors), a SwiGLU MLP and a language-model head. The same nodes build the
no-cache model, the with-past model and the merged model (an If on use_cache_branch whose branches read
the weights as outer-scope initializers).
"""

import json

import numpy as np
import onnx
import pytest
from builders import low_rank, run
from gradcheck import check as check_vjp
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr import FwlrError, compress
from onnx_fwlr.autodiff import losses
from onnx_fwlr.evaluate.language import compare_language_models, greedy_check, validate_language
from onnx_fwlr.io.data import open_data
from onnx_fwlr.pipeline.transplant import apply_same_factors
from onnx_fwlr.sites.find import find_sites
from onnx_fwlr.stats.fisher import collect_fisher_stats

D, F, V, RANK = 8, 12, 16, 3
OPSET = 18
WEIGHTS = {"Wq": (D, D), "Wk": (D, D), "Wv": (D, D), "Wo": (D, D), "Wg": (D, F), "Wu": (D, F), "Wd": (F, D),
           "Wlm": (D, V)}


def initializers(seed=0):
    rng = np.random.default_rng(seed)
    arrays = {name: low_rank(*shape, RANK, seed=seed + i) * np.float32(1.5 / np.sqrt(shape[0]))
              for i, (name, shape) in enumerate(WEIGHTS.items())}
    arrays["E"] = rng.standard_normal((V, D)).astype(np.float32)
    arrays["norm_scale"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    arrays["inv_freq"] = (1.0 / 100 ** (np.arange(D // 2) / (D // 2))).astype(np.float32)
    arrays.update(eps=np.array(1e-5, np.float32), neg=np.array(-1e9, np.float32),
                  scale=np.array(D ** -0.5, np.float32), one=np.array([1], np.int64), zero=np.array([0], np.int64),
                  half=np.array([D // 2], np.int64), full=np.array([D], np.int64), last=np.array([-1], np.int64),
                  axis1=np.array([1], np.int64))
    return [numpy_helper.from_array(a, name) for name, a in arrays.items()]


def decoder_nodes(with_past, p=""):
    """Nodes of one decoder layer and head; tensor names get prefix ``p`` (distinct If branches)."""
    def n(op, ins, outs, **attrs):
        return helper.make_node(op, ins, [p + o for o in outs], name=p + outs[0], **attrs)

    x, t = p + "x", p
    nodes = [n("Gather", ["E", "input_ids"], ["x"]), n("Shape", ["input_ids"], ["ids_shape"]),
             n("Gather", [t + "ids_shape", "one"], ["T"])]
    if with_past:
        nodes += [n("Shape", ["past_key"], ["past_shape"]), n("Gather", [t + "past_shape", "one"], ["P"])]
    else:
        nodes += [n("Identity", ["zero"], ["P"])]
    nodes += [
        n("Add", [t + "P", t + "T"], ["S"]),
        # RMSNorm: x / sqrt(mean(x²) + eps) * scale
        n("Mul", [x, x], ["sq"]), n("ReduceMean", [t + "sq", "last"], ["ms"]), n("Add", [t + "ms", "eps"], ["ms_eps"]),
        n("Sqrt", [t + "ms_eps"], ["rms"]), n("Div", [x, t + "rms"], ["xn"]), n("Mul", [t + "xn", "norm_scale"], ["h"]),
        n("MatMul", [t + "h", "Wq"], ["q"]), n("MatMul", [t + "h", "Wk"], ["k"]), n("MatMul", [t + "h", "Wv"], ["v"]),
        # rotary embedding: positions P..S-1, cos/sin of position * inv_freq, rotate_half by Slice/Neg/Concat
        n("Squeeze", [t + "P"], ["p0"]), n("Squeeze", [t + "S"], ["s0"]),
        n("Range", [t + "p0", t + "s0", "one_scalar"], ["pos"]), n("Cast", [t + "pos"], ["posf"], to=TensorProto.FLOAT),
        n("Unsqueeze", [t + "posf", "last"], ["pos2"]), n("Mul", [t + "pos2", "inv_freq"], ["freqs"]),
        n("Concat", [t + "freqs", t + "freqs"], ["emb"], axis=-1), n("Cos", [t + "emb"], ["cos"]),
        n("Sin", [t + "emb"], ["sin"])]
    for name in ("q", "k"):
        nodes += [n("Slice", [t + name, "zero", "half", "last"], [name + "1"]),
                  n("Slice", [t + name, "half", "full", "last"], [name + "2"]),
                  n("Neg", [t + name + "2"], [name + "2n"]),
                  n("Concat", [t + name + "2n", t + name + "1"], [name + "rot"], axis=-1),
                  n("Mul", [t + name, t + "cos"], [name + "c"]), n("Mul", [t + name + "rot", t + "sin"], [name + "s"]),
                  n("Add", [t + name + "c", t + name + "s"], [name + "r"])]
    if with_past:
        nodes += [n("Concat", ["past_key", t + "kr"], ["present_key"], axis=1),
                  n("Concat", ["past_value", t + "v"], ["present_value"], axis=1)]
    else:
        nodes += [n("Identity", [t + "kr"], ["present_key"]), n("Identity", [t + "v"], ["present_value"])]
    nodes += [
        n("Transpose", [t + "present_key"], ["kt"], perm=[0, 2, 1]), n("MatMul", [t + "qr", t + "kt"], ["raw"]),
        n("Mul", [t + "raw", "scale"], ["scores"]),
        # causal mask: ones [T, S] kept on and below diagonal P (Trilu), and the attention mask [B, 1, S]
        n("Concat", [t + "T", t + "S"], ["ts"], axis=0), n("ConstantOfShape", [t + "ts"], ["ones"],
                                                         value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        n("Trilu", [t + "ones", t + "p0"], ["tri"], upper=0), n("Cast", [t + "tri"], ["causal"], to=TensorProto.BOOL),
        n("Cast", ["attention_mask"], ["am"], to=TensorProto.BOOL), n("Unsqueeze", [t + "am", "axis1"], ["am3"]),
        n("And", [t + "causal", t + "am3"], ["keep"]), n("Where", [t + "keep", t + "scores", "neg"], ["masked"]),
        n("Softmax", [t + "masked"], ["probs"], axis=-1), n("MatMul", [t + "probs", t + "present_value"], ["ctx"]),
        n("MatMul", [t + "ctx", "Wo"], ["attn"]), n("Add", [x, t + "attn"], ["x2"]),
        # SwiGLU MLP
        n("MatMul", [t + "x2", "Wg"], ["gate"]), n("Sigmoid", [t + "gate"], ["sig"]),
        n("Mul", [t + "gate", t + "sig"], ["silu"]), n("MatMul", [t + "x2", "Wu"], ["up"]),
        n("Mul", [t + "silu", t + "up"], ["act"]), n("MatMul", [t + "act", "Wd"], ["down"]),
        n("Add", [t + "x2", t + "down"], ["x3"]), n("MatMul", [t + "x3", "Wlm"], ["logits"])]
    return nodes


def out_infos(p=""):
    return [helper.make_tensor_value_info(p + "logits", TensorProto.FLOAT, ["B", "T", V]),
            helper.make_tensor_value_info(p + "present_key", TensorProto.FLOAT, ["B", "S", D]),
            helper.make_tensor_value_info(p + "present_value", TensorProto.FLOAT, ["B", "S", D])]


def token_inputs():
    return [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])]


def past_inputs():
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "P", D])
            for name in ("past_key", "past_value")]


def finish(graph):
    graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one_scalar"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def decoder(with_past):
    inputs = token_inputs() + (past_inputs() if with_past else [])
    return finish(helper.make_graph(decoder_nodes(with_past), "decoder", inputs, out_infos(), initializers()))


def merged_decoder():
    then = helper.make_graph(decoder_nodes(True, "past/"), "with_past", [], out_infos("past/"))
    other = helper.make_graph(decoder_nodes(False, "nocache/"), "no_cache", [], out_infos("nocache/"))
    node = helper.make_node("If", ["use_cache_branch"], ["logits", "present_key", "present_value"], name="if",
                            then_branch=then, else_branch=other)
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    return finish(helper.make_graph([node], "merged", token_inputs() + past_inputs() + [flag], out_infos(),
                                    initializers()))


def token_batch(batch=4, length=6, seed=0, padded=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if padded:
        mask[0, length - 2:] = 0
        ids[0, length - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def past_feed(batch=4, past=3, new=2, seed=1):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, V, size=(batch, new)).astype(np.int64),
            "attention_mask": np.ones((batch, past + new), np.int64),
            "past_key": rng.standard_normal((batch, past, D)).astype(np.float32),
            "past_value": rng.standard_normal((batch, past, D)).astype(np.float32)}


def assert_same_outputs(a, b, feed, tol=1e-4):
    for want, got in zip(run(a, feed), run(b, feed)):
        assert np.max(np.abs(want - got)) <= tol * max(1.0, np.max(np.abs(want)))


# ---------------------------------------------------------------- exact at full rank, with and without the cache

def test_cache_path_matches_full_forward():
    full = run(decoder(False), token_batch(padded=False))
    prefix = {k: v[:, :4] for k, v in token_batch(padded=False).items()}
    first = run(decoder(False), prefix)
    rest = run(decoder(True), {"input_ids": token_batch(padded=False)["input_ids"][:, 4:],
                               "attention_mask": np.ones((4, 6), np.int64), "past_key": first[1],
                               "past_value": first[2]})
    assert np.allclose(rest[0], full[0][:, 4:], atol=1e-5)


@pytest.mark.parametrize("with_past", [False, True])
def test_full_rank_svd_reproduces_outputs(with_past):
    model = decoder(with_past)
    compressed, report = compress(model, rank=RANK, progress=False)
    assert report.factorised == len(WEIGHTS)
    assert_same_outputs(model, compressed, past_feed() if with_past else token_batch())


def test_full_rank_kfac_with_lm_loss_reproduces_outputs():
    model = decoder(False)
    calib = [token_batch(seed=s) for s in range(3)]
    compressed, report = compress(model, rank=RANK, method="kfac", calibration=calib,
                                  fisher_options={"loss": "lm"}, progress=False)
    assert report.factorised == len(WEIGHTS)
    assert_same_outputs(model, compressed, token_batch(seed=9))


# ---------------------------------------------------------------- the merged decoder shares factors

def test_merged_if_sites_have_one_use_per_branch():
    sites, _ = find_sites(merged_decoder())
    by_weight = {site.weight: site for site in sites}
    assert set(by_weight) >= {"Wq", "Wk", "Wv", "Wo", "Wg", "Wu", "Wd"}
    for site in by_weight.values():
        assert site.graph_index == 0 and sorted(u.graph_index for u in site.uses) == [1, 2]


def test_merged_if_compresses_once_and_both_branches_match():
    model = merged_decoder()
    compressed, report = compress(model, rank=RANK, progress=False)
    assert report.factorised == len(WEIGHTS)
    outer = {t.name for t in compressed.graph.initializer}
    branches = [compressed.graph.node[0].attribute[i].g for i in range(2)]
    read = [{i for node in g.node for i in node.input} for g in branches]
    factors = (read[0] & read[1] & outer) - {t.name for t in model.graph.initializer}
    assert len(factors) == 2 * len(WEIGHTS)  # every factor pair lives once, outside, and both branches read it
    assert not any(g.initializer for g in branches)
    cached = dict(past_feed(), use_cache_branch=np.array([True]))
    fresh = dict(token_batch(), past_key=np.zeros((4, 0, D), np.float32), past_value=np.zeros((4, 0, D), np.float32),
                 use_cache_branch=np.array([False]))
    for feed in (cached, fresh):
        assert_same_outputs(model, compressed, feed)


def test_factors_from_one_calibration_apply_to_with_past_and_merged_models():
    """kfac (with bias correction) calibrated on the no-cache model; the same factors go into the other forms."""
    original = decoder(False)
    calib = [token_batch(seed=s) for s in range(3)]
    compressed, _ = compress(original, ratio=0.5, method="kfac", calibration=calib, fisher_options={"loss": "lm"},
                             progress=False)
    factors = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer if "/factor_" in t.name}
    assert any("bias_correction" in n.name for n in compressed.graph.node)
    with_past, replaced = apply_same_factors(decoder(True), original, compressed)
    merged, replaced_merged = apply_same_factors(merged_decoder(), original, compressed)
    assert replaced == replaced_merged and len(replaced) == len(factors) // 2
    for model in (with_past, merged):
        held = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if "/factor_" in t.name}
        assert held.keys() == factors.keys() and all(np.array_equal(held[k], factors[k]) for k in held)
    # the compressed with-past model continues exactly where the compressed no-cache model left off
    feed = token_batch(padded=False)
    full = run(compressed, feed)[0]
    first = run(compressed, {k: v[:, :4] for k, v in feed.items()})
    step = {"input_ids": feed["input_ids"][:, 4:], "attention_mask": feed["attention_mask"], "past_key": first[1],
            "past_value": first[2]}
    assert np.allclose(run(with_past, step)[0], full[:, 4:], atol=1e-5)
    assert np.allclose(run(merged, dict(step, use_cache_branch=np.array([True])))[0], full[:, 4:], atol=1e-5)
    empty = np.zeros((4, 0, D), np.float32)
    fresh = dict(feed, past_key=empty, past_value=empty, use_cache_branch=np.array([False]))
    assert np.allclose(run(merged, fresh)[0], full, atol=1e-5)


def test_factors_need_the_same_weights():
    original = decoder(False)
    compressed, _ = compress(original, rank=RANK, progress=False)
    other = decoder(True)
    next(t for t in other.graph.initializer if t.name == "Wq").CopyFrom(
        numpy_helper.from_array(low_rank(D, D, RANK, seed=99), "Wq"))
    with pytest.raises(FwlrError, match="differs"):
        apply_same_factors(other, original, compressed)


# ---------------------------------------------------------------- the language-model loss

def lm_loss(logits, ids, mask):
    """Per-sequence next-token cross-entropy in float64, padding masked (the definition, written out)."""
    z = logits.astype(np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    total = np.zeros(len(ids))
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                total[b] -= log_p[b, t, ids[b, t + 1]]
    return total


def test_lm_seed_is_gradient_of_per_sequence_loss(monkeypatch):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 2 * V)  # several float64 chunks per batch
    feed = token_batch()
    z = np.random.default_rng(3).standard_normal((4, 6, V))
    seed = losses.lm_seed(z.astype(np.float32), feed["input_ids"], mask=feed["attention_mask"])
    assert seed.dtype == np.float32
    fd = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        plus, minus = z.copy(), z.copy()
        plus[idx] += 1e-6
        minus[idx] -= 1e-6
        b = idx[0]
        fd[idx] = (lm_loss(plus, feed["input_ids"], feed["attention_mask"])[b]
                   - lm_loss(minus, feed["input_ids"], feed["attention_mask"])[b]) / 2e-6
    assert np.allclose(seed, fd, atol=1e-5)
    assert not seed[0, 3:].any() and not seed[:, -1].any()  # padding and the last position carry nothing


def test_lm_fisher_matches_finite_differences():
    """Σ_n Σ_j (∂L_n/∂W_ij)² of the head weight from our backward pass against central differences."""
    rng = np.random.default_rng(4)
    E, W = rng.standard_normal((V, D)).astype(np.float32), rng.standard_normal((D, V)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]), helper.make_node("Tanh", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["logits"], name="head")]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", V])
    weights = [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")]
    graph = helper.make_graph(nodes, "toy", token_inputs(), [logits], weights)
    model = finish(graph)
    feed = token_batch()
    sites, _ = find_sites(model)
    stats = collect_fisher_stats(model, sites, open_data([feed], model), loss="lm", progress=False)
    assert stats.meta["loss"] == "lm"
    a = np.tanh(E[feed["input_ids"]].astype(np.float64))
    w = W.astype(np.float64)
    grads = np.zeros((4, D, V))
    for i, j in np.ndindex(D, V):
        plus, minus = w.copy(), w.copy()
        plus[i, j] += 1e-6
        minus[i, j] -= 1e-6
        grads[:, i, j] = (lm_loss(a @ plus, feed["input_ids"], feed["attention_mask"])
                          - lm_loss(a @ minus, feed["input_ids"], feed["attention_mask"])) / 2e-6
    acc = stats.gradients["W"]
    assert np.allclose(acc["fisher_row"], (grads ** 2).sum(axis=(0, 2)), rtol=1e-4)
    assert np.allclose(acc["fisher_col"], (grads ** 2).sum(axis=(0, 1)), rtol=1e-4)


def test_default_loss_for_logits_over_token_ids_is_lm_and_mc_runs():
    model = decoder(False)
    sites, _ = find_sites(model)
    data = open_data([token_batch()], model)
    assert collect_fisher_stats(model, sites, data, progress=False).meta["loss"] == "lm"
    mc = collect_fisher_stats(model, sites, data, loss="mc", samples=2, progress=False)
    assert mc.meta["loss"] == "mc" and all(np.all(np.isfinite(a["fisher_row"])) for a in mc.gradients.values())
    assert {s.weight for s in sites} == set(mc.gradients)  # every weight is reached through the decoder's ops


def test_lm_loss_without_token_ids_is_a_user_error():
    with pytest.raises(FwlrError, match="token ids"):
        losses.make_seeds("lm", np.zeros((2, 3, V), np.float32))


# ---------------------------------------------------------------- VJP rules the decoder exports use

@pytest.mark.parametrize("op", ["Sin", "Cos"])
def test_sin_cos_vjp(op):
    check_vjp(op, [np.random.default_rng(0).uniform(-2, 2, (2, 3))])


@pytest.mark.parametrize("upper,k", [(0, 0), (1, 1), (0, -1)])
def test_trilu_vjp(upper, k):
    check_vjp("Trilu", [np.random.default_rng(1).uniform(-1, 1, (2, 3, 4)), np.array(k, np.int64)], {"upper": upper},
              opset=14)


def test_rms_normalization_vjp():
    rng = np.random.default_rng(2)
    check_vjp("RMSNormalization", [rng.uniform(-1, 1, (2, 3, 4)), rng.uniform(0.5, 1.5, (4,))], {"epsilon": 1e-3},
              opset=23)


# ---------------------------------------------------------------- perplexity and greedy decoding

def test_perplexity_metrics():
    model = decoder(False)
    batches = [token_batch(seed=s) for s in range(2)]
    same = compare_language_models(model, model, batches, progress=False)
    assert same.perplexity_ratio == pytest.approx(1.0) and same.top1_agreement == 1.0
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-12)
    want = [lm_loss(run(model, b)[0], b["input_ids"], b["attention_mask"]).sum() for b in batches]
    assert same.tokens == 2 * (4 * 5 - 2)
    assert same.original_perplexity == pytest.approx(np.exp(sum(want) / same.tokens), rel=1e-6)
    worse, _ = compress(model, rank=1, progress=False)
    other = compare_language_models(model, worse, batches, progress=False)
    assert other.kl_divergence > 0 and other.top1_agreement < 1.0
    assert other.check(max_perplexity_ratio=1.0, max_kl=1e-9)  # both tolerances fail


def test_rows_per_run_bounds_the_logits_of_each_call():
    from onnx_fwlr.evaluate.language import LOGITS_BYTES, rows_per_run

    assert rows_per_run(128, 49_152) == 2  # SmolLM2: 2 x 128 x 49,152 float32 = 48 MiB per model per call
    assert 2 * 128 * 49_152 * 4 <= LOGITS_BYTES < 3 * 128 * 49_152 * 4
    assert rows_per_run(128, 32_000) == 4 and rows_per_run(2048, 49_152) == 1  # never less than one row
    assert rows_per_run(5, 10, limit=4 * 5 * 10 * 3) == 3 and rows_per_run(5, 10, limit=1) == 1


def test_perplexity_in_bounded_runs_has_the_same_sums(monkeypatch):
    """Batches cut into runs of a few rows (and chunks that straddle them) fold the same float64 sums, in the
    same order, as one run per batch; every run stays within the logits limit."""
    from onnx_fwlr.evaluate import language

    model = decoder(False)
    worse, _ = compress(model, rank=1, progress=False)
    batches = [token_batch(batch=5, seed=s) for s in range(3)]
    monkeypatch.setattr(language, "CHUNK_ELEMENTS", 7 * V)  # 7 positions a chunk: not a multiple of a row's 5
    whole = compare_language_models(model, worse, batches, progress=False, max_logits_bytes=1 << 30)
    rows = []
    run_logits = language._run_logits
    monkeypatch.setattr(language, "_run_logits", lambda s, feed, *a: rows.append(len(feed["input_ids"])) or
                        run_logits(s, feed, *a))
    limit = 2 * 6 * V * 4  # two rows of 6 tokens
    bounded = compare_language_models(model, worse, batches, progress=False, max_logits_bytes=limit)
    assert bounded == whole and bounded.kl_divergence > 0 and bounded.tokens == whole.tokens
    assert max(rows) == language.rows_per_run(6, V, limit=limit) == 2 and len(rows) > 2 * len(batches)


@pytest.mark.parametrize("form", ["with_past", "merged", "two_models"])
def test_greedy_decoding_with_cache_matches_full_path(form):
    prompt = token_batch(batch=2, length=3, padded=False)["input_ids"]
    if form == "merged":
        result = greedy_check(merged_decoder(), prompt, steps=5)
    elif form == "two_models":
        result = greedy_check(decoder(True), prompt, steps=5, no_cache=decoder(False))
    else:
        result = greedy_check(decoder(True), prompt, steps=5)
    assert result.full.shape == (2, 8) and result.matches and result.max_logit_diff < 1e-4


def test_cli_compress_with_lm_loss_and_perplexity_validation(tmp_path, capsys):
    from onnx_fwlr.cli.main import main

    onnx.save(decoder(False), tmp_path / "decoder.onnx")
    for name, seeds in (("calib", range(3)), ("val", range(5, 7))):
        batches = [token_batch(seed=s) for s in seeds]
        np.savez(tmp_path / f"{name}.npz", **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    args = ["compress", tmp_path / "decoder.onnx", "-o", tmp_path / "small.onnx", "--method", "kfac", "--loss", "lm",
            "--calib", tmp_path / "calib.npz", "--ratio", "0.5", "--val", tmp_path / "val.npz", "--metric",
            "perplexity", "--max-perplexity-ratio", "100", "--quiet", "--json", tmp_path / "report.json"]
    assert main([str(a) for a in args]) == 0
    assert "perplexity" in capsys.readouterr().out
    language = json.loads((tmp_path / "report.json").read_text())["language"]
    assert language["tokens"] == 2 * (4 * 5 - 2) and language["perplexity_ratio"] > 0
    args = ["validate", tmp_path / "decoder.onnx", tmp_path / "small.onnx", "--data", tmp_path / "val.npz",
            "--metric", "perplexity", "--max-kl", "0", "--quiet"]
    assert main([str(a) for a in args]) == 1  # a compressed model never has zero KL
    assert "FAIL: KL divergence" in capsys.readouterr().out


# ---------------------------------------------------------------- the shipped sample decoder (tools/export_decoder.py)

SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "sample_models" / "decoder"


def test_sample_decoder_kfac_lm_keeps_perplexity_and_the_cache_path():
    original = str(SAMPLE / "decoder.onnx")
    compressed, report = compress(original, ratio=0.8, method="kfac", allocation="global",
                                  calibration=str(SAMPLE / "calib.npz"), fisher_options={"loss": "lm"},
                                  batch_size=16, progress=False)
    assert report.factorised >= 1 and report.calibration["loss"] == "lm"
    metrics = validate_language(original, compressed, str(SAMPLE / "eval.npz"), progress=False)
    plain, _ = compress(original, ratio=0.8, method="svd", progress=False)
    baseline = validate_language(original, plain, str(SAMPLE / "eval.npz"), progress=False)
    assert 1.0 < metrics.perplexity_ratio < 1.3 and metrics.top1_agreement > 0.7  # measured: 1.19, 0.77
    assert metrics.perplexity_ratio < baseline.perplexity_ratio - 0.2  # svd: 1.57
    merged, replaced = apply_same_factors(str(SAMPLE / "decoder_merged.onnx"), original, compressed)
    assert len(replaced) == report.factorised
    prompt = np.load(SAMPLE / "eval.npz")["input_ids"][:2, :6]
    assert greedy_check(merged, prompt, steps=6).matches
