"""Language models from the CLI: perplexity by default in `validate` and `compress --val`, the KV-cache
exports written with the same factors, fp16 exports; on the shipped tiny decoder (tools/export_decoder.py)."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_fwlr import compress, save_model
from onnx_fwlr.cli.main import main
from onnx_fwlr.evaluate.language import is_language_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "decoder"
EVAL = SAMPLE / "eval.npz"
CALIB = SAMPLE / "calib.npz"


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def svd_half(tmp_path_factory):
    """The sample decoder at half its linear-layer parameters (plain SVD: clearly worse than the original)."""
    path = tmp_path_factory.mktemp("svd") / "half.onnx"
    model, _ = compress(str(SAMPLE / "decoder.onnx"), ratio=0.5, method="svd", progress=False)
    save_model(model, path)
    return path


def test_language_models_are_recognised_by_their_io():
    assert is_language_model(SAMPLE / "decoder.onnx")
    assert is_language_model(SAMPLE / "decoder_with_past.onnx")
    assert not is_language_model(SAMPLE / "decoder.onnx", logits="present.0.key")  # 4-D, not [batch, seq, vocab]
    assert not is_language_model(ROOT / "sample_models" / "digits_mlp.onnx")  # a classifier: no token ids


def test_validate_reports_perplexity_kl_and_top1_by_default(svd_half, tmp_path, capsys):
    report = tmp_path / "metrics.json"
    assert cli("validate", SAMPLE / "decoder.onnx", svd_half, "--data", EVAL, "--quiet", "--json", report) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "KL(original" in out and "no tolerance given" in out
    metrics = json.loads(report.read_text())
    assert metrics["perplexity_ratio"] > 1.05 and 0 < metrics["top1_agreement"] < 1 and metrics["kl_divergence"] > 0
    eval_rows = np.load(EVAL)
    mask = eval_rows["attention_mask"]
    assert metrics["tokens"] == int((mask[:, 1:] * mask[:, :-1]).sum())  # real tokens with a real next token


def test_max_perplexity_ratio_is_the_tolerance(svd_half, capsys):
    args = ("validate", SAMPLE / "decoder.onnx", svd_half, "--data", EVAL, "--quiet")
    assert cli(*args, "--max-perplexity-ratio", "1.01") == 1
    assert "FAIL: perplexity ratio" in capsys.readouterr().out
    assert cli(*args, "--max-perplexity-ratio", "50") == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")


def test_an_output_tolerance_or_metric_outputs_keeps_the_output_table(svd_half, capsys):
    args = ("validate", SAMPLE / "decoder.onnx", svd_half, "--data", EVAL, "--quiet")
    assert cli(*args, "--min-cosine", "0.0") == 0
    assert "cos mean" in capsys.readouterr().out
    assert cli(*args, "--metric", "outputs") == 0
    out = capsys.readouterr().out
    assert "cos mean" in out and "perplexity" not in out


def test_compress_val_reports_perplexity_for_a_language_model(tmp_path, capsys):
    out_path, report = tmp_path / "small.onnx", tmp_path / "report.json"
    code = cli("compress", SAMPLE / "decoder.onnx", "-o", out_path, "--ratio", "0.8", "--calib", CALIB,
               "--val", EVAL, "--max-perplexity-ratio", "1.5", "--quiet", "--json", report)
    out = capsys.readouterr().out
    assert code == 0 and "perplexity" in out and "ratio" in out and out.rstrip().endswith("PASS")
    language = json.loads(report.read_text())["language"]
    assert 1.0 < language["perplexity_ratio"] < 1.5 and language["top1_agreement"] > 0.7
    assert "validation" not in json.loads(report.read_text()) or not json.loads(report.read_text())["validation"]


# ---------------------------------------------------------------- --also: the KV-cache exports with the same factors

def _save_token_npz(path, batches):
    np.savez(path, **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})


def test_also_writes_cache_exports_whose_greedy_tokens_equal_the_originals_at_full_rank(tmp_path, capsys):
    from test_decoder import RANK, decoder, merged_decoder, token_batch

    from onnx_fwlr.evaluate.language import greedy_check

    for name, model in (("nocache", decoder(False)), ("past", decoder(True)), ("merged", merged_decoder())):
        onnx.save(model, tmp_path / f"{name}.onnx")
    _save_token_npz(tmp_path / "calib.npz", [token_batch(seed=s, padded=False) for s in range(3)])
    report = tmp_path / "report.json"
    code = cli("compress", tmp_path / "nocache.onnx", "-o", tmp_path / "small.onnx", "--rank", RANK, "--method",
               "kfac", "--loss", "lm", "--calib", tmp_path / "calib.npz", "--also",
               f"{tmp_path / 'past.onnx'}={tmp_path / 'small_past.onnx'}", "--also",
               f"{tmp_path / 'merged.onnx'}={tmp_path / 'small_merged.onnx'}", "--quiet", "--json", report)
    out = capsys.readouterr().out
    assert code == 0 and out.count("greedy decoding through its KV cache matches small.onnx") == 2
    also = json.loads(report.read_text())["also"]
    assert [len(item["weights"]) for item in also] == [8, 8] and all(item["greedy_matches"] for item in also)
    prompt = token_batch(batch=2, length=4, padded=False)["input_ids"]
    want = greedy_check(str(tmp_path / "past.onnx"), prompt, 6, no_cache=str(tmp_path / "nocache.onnx"))
    for name in ("small_past", "small_merged"):
        got = greedy_check(str(tmp_path / f"{name}.onnx"), prompt, 6)
        assert got.matches and np.array_equal(got.cached, want.cached)  # full rank: the original's tokens


def test_also_on_the_sample_decoder_keeps_the_cache_path_at_ratio_0_8(tmp_path, capsys):
    code = cli("compress", SAMPLE / "decoder.onnx", "-o", tmp_path / "small.onnx", "--ratio", "0.8", "--calib", CALIB,
               "--also", f"{SAMPLE / 'decoder_merged.onnx'}={tmp_path / 'small_merged.onnx'}", "--quiet",
               "--json", tmp_path / "report.json")
    assert code == 0
    item = json.loads((tmp_path / "report.json").read_text())["also"][0]
    assert item["greedy_matches"] and item["greedy_tokens"] == 8 and len(item["weights"]) >= 1
    assert (tmp_path / "small_merged.onnx").is_file()


def _tied(model, table="E", head="Wlm"):
    """The model with its head weight [D, V] replaced by a copy of its embedding table [V, D], transposed (as
    SmolLM2's export stores its tied head)."""
    tensors = {t.name: t for t in model.graph.initializer}
    values = onnx.numpy_helper.to_array(tensors[table])
    tensors[head].CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(values.T), head))
    return model


def test_also_re_ties_the_head_of_the_cache_exports_as_the_compressed_model_did(tmp_path, capsys):
    """A head re-tied to its table in the compressed model (stored once, not factorised) is re-tied in the
    with-past export too; the merged model, whose head is read inside its If branches, keeps its copy; greedy
    decoding through both caches agrees with the compressed model."""
    from test_decoder import decoder, merged_decoder, token_batch

    for name, model in (("nocache", decoder(False)), ("past", decoder(True)), ("merged", merged_decoder())):
        onnx.save(_tied(model), tmp_path / f"{name}.onnx")
    _save_token_npz(tmp_path / "calib.npz", [token_batch(seed=s, padded=False) for s in range(3)])
    report = tmp_path / "report.json"
    code = cli("compress", tmp_path / "nocache.onnx", "-o", tmp_path / "small.onnx", "--ratio", "0.8", "--method",
               "kfac", "--loss", "lm", "--calib", tmp_path / "calib.npz", "--also",
               f"{tmp_path / 'past.onnx'}={tmp_path / 'small_past.onnx'}", "--also",
               f"{tmp_path / 'merged.onnx'}={tmp_path / 'small_merged.onnx'}", "--quiet", "--json", report)
    summary = json.loads(report.read_text())
    assert code == 0 and len(summary["tied"]) == 1, capsys.readouterr().out
    assert [item["greedy_matches"] for item in summary["also"]] == [True, True]
    assert all("Wlm" not in item["weights"] and item["weights"] for item in summary["also"])
    names = {name: {t.name for t in onnx.load(str(tmp_path / f"{name}.onnx")).graph.initializer}
             for name in ("small", "small_past", "small_merged")}
    assert "Wlm" not in names["small"] and "Wlm" not in names["small_past"] and "E" in names["small_past"]
    assert {"Wlm", "E"} <= names["small_merged"]
    past = onnx.load(str(tmp_path / "small_past.onnx"))
    head = next(n for n in past.graph.node if n.output == ["logits"])
    assert head.input[1] == "E/tied_transpose"  # reads the table, transposed, as the compressed model does


def test_also_with_quantize_writes_the_one_quantized_copy_of_a_tied_pair(tmp_path, capsys):
    """Under --quantize the tied table and head share one quantized copy in the with-past export as well."""
    for name in ("decoder", "decoder_with_past"):
        model = _tied(onnx.load(str(SAMPLE / f"{name}.onnx")), "lm.model.embed_tokens.weight", "lm_head.weight")
        onnx.save(model, tmp_path / f"{name}.onnx")
    out, past, report = tmp_path / "q.onnx", tmp_path / "q_past.onnx", tmp_path / "r.json"
    code = cli("compress", tmp_path / "decoder.onnx", "-o", out, "--quantize", "auto", "--ratio", "0.4", "--calib",
               CALIB, "--also", f"{tmp_path / 'decoder_with_past.onnx'}={past}", "--quiet", "--json", report)
    summary = json.loads(report.read_text())
    assert code == 0 and "one copy for the pair" in summary["tied"][0], capsys.readouterr().out
    assert summary["also"][0]["greedy_matches"]
    tensors = [{t.name: t.raw_data for t in onnx.load(str(path)).graph.initializer} for path in (out, past)]
    assert not {"lm_head.weight", "lm.model.embed_tokens.weight"} & set(tensors[1])
    assert {n: b for n, b in tensors[0].items() if "lm_head" in n or "embed" in n} == \
        {n: b for n, b in tensors[1].items() if "lm_head" in n or "embed" in n}


@pytest.mark.parametrize("mode, flags", [("int4", ["--rank", "8"]), ("int8", ["--ratio", "0.5"]),
                                         ("auto", ["--ratio", "0.4"])])
def test_also_with_quantize_writes_the_same_quantized_weights_into_the_with_past_export(tmp_path, capsys, mode, flags):
    from onnx_fwlr.evaluate.language import greedy_check

    out, past, report = tmp_path / "q.onnx", tmp_path / "q_past.onnx", tmp_path / "r.json"
    code = cli("compress", SAMPLE / "decoder.onnx", "-o", out, "--quantize", mode, *flags, "--calib", CALIB,
               "--also", f"{SAMPLE / 'decoder_with_past.onnx'}={past}", "--quiet", "--json", report)
    text = capsys.readouterr().out
    assert code == 0 and "with the quantized weights of q.onnx" in text and "KV cache matches q.onnx" in text, text
    item = json.loads(report.read_text())["also"][0]
    assert item["greedy_matches"] and len(item["weights"]) >= 10
    compressed, cached = onnx.load(str(out)), onnx.load(str(past))
    main_tensors = {t.name: onnx.numpy_helper.to_array(t) for t in compressed.graph.initializer}
    past_tensors = {t.name: onnx.numpy_helper.to_array(t) for t in cached.graph.initializer}
    quantized = [n for n in main_tensors if n.endswith(("_quantized", "_Q4", "_Q8", "/factor_A", "/factor_B"))]
    assert quantized and all(np.array_equal(main_tensors[n], past_tensors[n]) for n in quantized)
    ops = {n.op_type for n in cached.graph.node}
    assert ({"MatMulInteger"} if mode == "int8" else {"MatMulNBits"}) <= ops  # auto: weight-only on an LM
    assert not {w for w in item["weights"]} & set(past_tensors)  # no dense copy of a replaced weight is left
    if mode != "int8":  # weight-only formats compute each position alone: any prompt decodes alike through the cache
        prompt = np.load(CALIB)["input_ids"][:2, :6]
        assert greedy_check(str(past), prompt, 4, no_cache=str(out)).matches


def test_also_with_quantize_refuses_an_input_that_is_already_quantized(tmp_path, capsys):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = tmp_path / "decoder_int8.onnx"
    quantize_dynamic(str(SAMPLE / "decoder.onnx"), str(int8), weight_type=QuantType.QInt8)
    out = tmp_path / "small.onnx"
    code = cli("compress", int8, "-o", out, "--quantize", "int4", "--rank", "8", "--calib", CALIB, "--quiet",
               "--also", f"{SAMPLE / 'decoder_with_past.onnx'}={tmp_path / 'past.onnx'}")
    err = capsys.readouterr().err
    assert code == 2 and "takes a float model; this one already holds quantized weights" in err
    assert "Traceback" not in err and not out.exists() and not (tmp_path / "past.onnx").exists()


@pytest.mark.parametrize("also, extra, message", [
    ("nosep.onnx", [], "is not MODEL=OUT"),
    ("missing.onnx=x.onnx", [], "is not a model file"),
    ("{past}={out}", [], "writes"),
    ("{merged}=y.onnx", ["--quantize", "int4", "--calib", CALIB], "not rewritten yet; give the with-past export"),
])
def test_also_bad_input_is_one_sentence_and_writes_nothing(tmp_path, capsys, also, extra, message):
    out = tmp_path / "small.onnx"
    also = also.format(past=SAMPLE / "decoder_with_past.onnx", merged=SAMPLE / "decoder_merged.onnx", out=out)
    code = cli("compress", SAMPLE / "decoder.onnx", "-o", out, "--ratio", "0.8", "--also", also, "--quiet", *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- fp16 exports (weights stored in half precision)

@pytest.fixture(scope="module")
def half_decoder(tmp_path_factory):
    """The sample decoder as a GPU-style export: every float tensor, inputs and outputs included, in float16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = tmp_path_factory.mktemp("fp16") / "decoder_fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(SAMPLE / "decoder.onnx"), keep_io_types=False), path)
    return path


def _initializers(path):
    model = onnx.load(path)
    return model, {t.name: t for t in model.graph.initializer}


def test_fp16_low_rank_keeps_half_precision_storage(half_decoder, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert cli("compress", half_decoder, "-o", out, "--ratio", "0.8", "--calib", CALIB, "--val", EVAL,
               "--max-perplexity-ratio", "1.3", "--quiet") == 0
    _, tensors = _initializers(out)
    factors = [t for name, t in tensors.items() if "/factor_" in name]
    assert factors and all(t.data_type == onnx.TensorProto.FLOAT16 for t in factors)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.dims and np.prod(t.dims) > 64
                   for t in tensors.values())  # nothing large was widened to float32
    assert out.stat().st_size < 0.9 * half_decoder.stat().st_size


@pytest.mark.parametrize("quantize, ratio, extra", [("int4", 0.7, []), ("auto", 0.7, []),
                                                    ("int8", 0.8, ["--int8", "block"])])
def test_fp16_quantize_writes_half_precision_matmulnbits_and_factors(half_decoder, tmp_path, capsys, quantize, ratio,
                                                                     extra):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    code = cli("compress", half_decoder, "-o", out, "--quantize", quantize, "--ratio", ratio, "--calib", CALIB,
               "--val", EVAL, "--quiet", "--json", report, *extra)
    assert code == 0
    model, tensors = _initializers(out)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(tensors[n.input[2]].data_type == onnx.TensorProto.FLOAT16 for n in nbits)  # scales
    corrections = [t for name, t in tensors.items() if "/correction_" in name]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in corrections)
    assert not any(n.op_type == "Cast" and any("/correction_" in i for i in n.input) for n in model.graph.node)
    summary = json.loads(report.read_text())
    assert summary["file_size_after"] <= ratio * summary["file_size_before"]
    assert summary["language"]["perplexity_ratio"] < 1.05  # measured: 1.00-1.01


def test_fp16_dynamic_int8_is_refused_in_one_sentence(half_decoder, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert cli("compress", half_decoder, "-o", out, "--quantize", "int8", "--rank", "4", "--quiet") == 2
    err = capsys.readouterr().err
    assert "float16" in err and "--int8 block" in err and "Traceback" not in err
    assert not out.exists()


def test_decode_speed_runs_the_cache_path_for_the_asked_steps():
    from onnx_fwlr.evaluate.language import decode_speed

    prompt = np.load(EVAL)["input_ids"][:1, :6]
    result = decode_speed(str(SAMPLE / "decoder_with_past.onnx"), prompt, 5, no_cache=str(SAMPLE / "decoder.onnx"),
                          threads=1)
    assert result["steps"] == 5 and result["batch"] == 1
    assert result["tokens_per_second"] == pytest.approx(5 / result["decode_seconds"])
    with pytest.raises(Exception, match="at least one step"):
        decode_speed(str(SAMPLE / "decoder_with_past.onnx"), prompt, 0)


def test_apply_same_quantization_checks_the_weights_are_the_same(tmp_path):
    from onnx_fwlr.errors import FwlrError
    from onnx_fwlr.pipeline.quantized import compress_quantized
    from onnx_fwlr.pipeline.transplant import apply_same_quantization

    model, report = compress_quantized(str(SAMPLE / "decoder.onnx"), quantize="int4", rank=8,
                                       calibration=str(CALIB), progress=False)
    assert report.rewritten is not None and len(report.rewritten.plans) >= 10
    past = onnx.load(str(SAMPLE / "decoder_with_past.onnx"))
    same, replaced = apply_same_quantization(past, str(SAMPLE / "decoder.onnx"), report.rewritten)
    assert sorted(replaced) == sorted([*report.rewritten.plans, *report.rewritten.tables])
    assert "lm.model.embed_tokens.weight" in replaced  # the table too (int4 blocks, as the compressed model has it)
    assert not set(replaced) & {t.name for t in same.graph.initializer}  # no float copy left
    changed = onnx.ModelProto()
    changed.CopyFrom(past)
    weight = next(t for t in changed.graph.initializer if t.name == replaced[0])
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    with pytest.raises(FwlrError, match="differs between the target model and the original"):
        apply_same_quantization(changed, str(SAMPLE / "decoder.onnx"), report.rewritten)
    with pytest.raises(FwlrError, match="shares no quantized weight"):
        apply_same_quantization(str(ROOT / "sample_models" / "digits_mlp.onnx"), str(SAMPLE / "decoder.onnx"),
                                report.rewritten)
