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
