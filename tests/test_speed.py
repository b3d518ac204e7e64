"""compress --rank-multiple and --target-latency, with an injected latency model (a fake timer; no timing here)."""

import json
from pathlib import Path

import pytest

from onnx_fwlr.cli.main import main
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate import latency as lat
from onnx_fwlr.pipeline.compress import compress

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
DIGITS, CALIB = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_calib.npz"  # fc1 64x256, fc2 256x256, head 256x10
KFAC = {"method": "kfac", "calibration": str(CALIB), "progress": False}


def fake_timer(multiple=32, penalty=0.2, slower=()):
    """ms = FLOPs / 1e6, the pair `penalty` slower off multiples of `multiple`; shapes in `slower`: pair 2x dense."""

    def timer(K, N, rank, tokens):
        dense = 2 * tokens * K * N / 1e6
        if rank is None:
            return dense
        if (K, N) in slower:
            return 2 * dense
        return 2 * tokens * rank * (K + N) / 1e6 * (1.0 + (penalty if rank % multiple else 0.0))

    return timer


class FakeLatency(lat.MeasuredLatency):
    """The measured latency model with a fake timer, and a fixed share of time in the sites (no profiler)."""

    def __init__(self, cache_dir, share=0.9, **timer_options):
        super().__init__(threads=1, cache_dir=cache_dir, timer=fake_timer(**timer_options))
        self.share = share

    def site_share(self, model, sites, feed, runs=5):
        return self.share


def _ranks(report):
    return {s.name: s.rank for s in report.sites}


def test_rank_multiple_given_rounds_without_timing():
    _, plain = compress(str(DIGITS), ratio=0.3, allocation="global", **KFAC)
    _, rounded = compress(str(DIGITS), ratio=0.3, allocation="global", rank_multiple=16, **KFAC)
    before, after = _ranks(plain), _ranks(rounded)
    for name in ("fc1/Gemm", "fc2/MatMul"):
        assert before[name] % 16  # not a multiple yet, else the test would prove nothing
        assert after[name] % 16 == 0 and abs(after[name] - before[name]) < 16
    assert after["head/Gemm"] == before["head/Gemm"]
    assert rounded.budget["speed"]["rank_multiple"] == 16 and not rounded.budget["speed"]["measured"]


def test_rank_multiple_auto_measures_the_multiple_and_keeps_slower_sites_dense(tmp_path):
    latency = FakeLatency(tmp_path, multiple=32, penalty=2.0, slower={(64, 256)})  # off multiples: 3x slower
    _, report = compress(str(DIGITS), ratio=0.3, allocation="global", rank_multiple="auto", latency=latency, **KFAC)
    speed = report.budget["speed"]
    assert speed["measured"] and speed["rank_multiple"] == 32
    ranks = _ranks(report)
    assert ranks["fc1/Gemm"] is None and speed["kept_dense"] == ["fc1/Gemm"]  # its pair is slower than dense
    assert ranks["fc2/MatMul"] == 32  # from 20: rank 32 runs faster here, and drops less
    assert any("not faster" in w for w in report.warnings)
    assert list(tmp_path.glob("latency-*.json"))  # the tables were cached


def test_target_latency_meets_the_budget_in_loss_units(tmp_path):
    latency = FakeLatency(tmp_path, share=0.9)
    _, report = compress(str(DIGITS), target_latency=0.6, **KFAC, latency=latency)
    speed = report.budget["speed"]
    assert report.allocation == "latency" and report.budget["target_latency"] == 0.6
    assert speed["predicted_ratio"] <= 0.6 and speed["best_ratio"] < 0.6
    assert report.factorised >= 1
    _, looser = compress(str(DIGITS), target_latency=0.9, **KFAC, latency=latency)
    kept = sum(s.params_after for s in looser.sites)
    assert kept > sum(s.params_after for s in report.sites)  # a looser budget keeps more
    with pytest.raises(FwlrError, match="cannot be reached"):
        compress(str(DIGITS), target_latency=0.1, **KFAC, latency=latency)  # 10 % of the time is not in the sites
    with pytest.raises(FwlrError, match="loss units"):
        compress(str(DIGITS), target_latency=0.6, method="svd", progress=False, latency=latency)


def test_cli_target_latency_with_injected_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(lat.OrtTimer, "__call__", lambda self, K, N, rank, tokens: fake_timer()(K, N, rank, tokens))
    monkeypatch.setattr(lat.MeasuredLatency, "site_share", lambda self, model, sites, feed, runs=5: 0.9)
    out, report = tmp_path / "fast.onnx", tmp_path / "r.json"
    code = main(["compress", str(DIGITS), "-o", str(out), "--method", "kfac", "--calib", str(CALIB), "--quiet",
                 "--target-latency", "0.7", "--latency-cache", str(tmp_path / "cache"), "--json", str(report)])
    assert code == 0 and out.is_file()
    speed = json.loads(report.read_text())["budget"]["speed"]
    assert speed["predicted_ratio"] <= 0.7 and speed["tokens"] == [32]  # one calibration batch of 32 rows
    assert list((tmp_path / "cache").glob("latency-*.json"))


@pytest.mark.parametrize("flags, message", [
    (["--target-latency", "1.5"], "--target-latency 1.5 is out of range"),
    (["--ratio", "0.5", "--rank-multiple", "0"], "--rank-multiple 0 is out of range"),
    (["--target-latency", "0.6", "--ratio", "0.5"], "given together"),
    (["--target-latency", "0.6", "--rank-multiple", "16"], "drop --rank-multiple"),
])
def test_cli_speed_flag_errors(tmp_path, capsys, flags, message):
    out = tmp_path / "x.onnx"
    code = main(["compress", str(DIGITS), "-o", str(out), "--method", "kfac", "--calib", str(CALIB), "--quiet", *flags])
    assert code == 2 and not out.exists()
    assert message in capsys.readouterr().err
