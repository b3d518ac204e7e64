"""compress --rank-multiple and --target-latency, with an injected latency model (a fake timer; no timing here)."""

import json
from pathlib import Path

import pytest

from onnx_fwlr.cli.main import main
from onnx_fwlr.cost import latency as lat
from onnx_fwlr.errors import FwlrError
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

    def __init__(self, cache_dir, share=0.9, measured=0.8, **timer_options):
        super().__init__(threads=1, cache_dir=cache_dir, timer=fake_timer(**timer_options))
        self.share, self.measured, self.compared = share, measured, []

    def site_share(self, model, sites, feed, runs=5):
        return self.share

    def model_ratio(self, original, compressed, feed, runs=20):
        self.compared.append({k: v.shape for k, v in feed.items()})
        return fake_ratio(self.measured)


def fake_ratio(p50):
    return {"pairs": 20, "ratio_p50": p50, "ratio_p10": p50 - 0.02, "ratio_p90": p50 + 0.03}


def _ranks(report):
    return {s.name: s.rank for s in report.sites}


def test_ranks_come_in_steps_of_16_on_wide_sites_within_the_budget():
    _, free = compress(str(DIGITS), ratio=0.3, allocation="global", rank_multiple=1, **KFAC)
    _, default = compress(str(DIGITS), ratio=0.3, allocation="global", **KFAC)
    _, eights = compress(str(DIGITS), ratio=0.3, allocation="global", rank_multiple=8, **KFAC)
    before, after, by8 = _ranks(free), _ranks(default), _ranks(eights)
    assert before["fc2/MatMul"] % 16 and before["fc1/Gemm"] % 8  # else the test would prove nothing
    assert after["fc2/MatMul"] % 16 == 0  # 256x256: break-even 127, wide enough for steps of 16
    assert after["fc1/Gemm"] % 16  # 64x256: break-even 51 < 4 x 16, keeps fine-grained ranks
    assert by8["fc2/MatMul"] % 8 == 0 and by8["fc1/Gemm"] % 8 == 0  # break-even 51 >= 4 x 8
    total = sum(s.params_before for s in free.sites)
    for report in (free, default, eights):  # the budget holds whatever the step
        assert sum(s.params_after for s in report.sites) <= 0.3 * total
    assert default.budget.get("speed") is None  # the default step is not a speed option: nothing timed
    assert eights.budget["speed"] == {"rank_multiple": 8, "measured": False}
    assert any("steps of 8" in w for w in eights.warnings)


def test_rank_multiple_auto_measures_the_multiple_and_keeps_slower_sites_dense(tmp_path):
    latency = FakeLatency(tmp_path, multiple=32, penalty=2.0, slower={(64, 256)})  # off multiples: 3x slower
    _, report = compress(str(DIGITS), ratio=0.3, allocation="global", rank_multiple="auto", latency=latency, **KFAC)
    speed = report.budget["speed"]
    assert speed["measured"] and speed["rank_multiple"] == 32
    ranks = _ranks(report)
    assert ranks["fc1/Gemm"] is None and speed["kept_dense"] == ["fc1/Gemm"]  # its pair is slower than dense
    assert "not faster than its dense op" in next(s.note for s in report.sites if s.name == "fc1/Gemm")
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
    monkeypatch.setattr(lat.MeasuredLatency, "model_ratio", lambda self, a, b, feed, runs=20: fake_ratio(0.75))
    out, report = tmp_path / "fast.onnx", tmp_path / "r.json"
    code = main(["compress", str(DIGITS), "-o", str(out), "--method", "kfac", "--calib", str(CALIB), "--quiet",
                 "--target-latency", "0.7", "--latency-cache", str(tmp_path / "cache"), "--json", str(report)])
    assert code == 0 and out.is_file()
    speed = json.loads(report.read_text())["budget"]["speed"]
    assert speed["predicted_ratio"] <= 0.7 and speed["tokens"] == [32]  # one calibration batch of 32 rows
    assert speed["measured_ratio"] == 0.75  # the written model was timed against the original


def test_a_model_that_measures_no_faster_is_not_written(tmp_path, monkeypatch, capsys):
    latency = FakeLatency(tmp_path, measured=1.04)
    with pytest.raises(FwlrError, match="cannot pay here: the compressed model measures 1.04x"):
        compress(str(DIGITS), ratio=0.3, allocation="global", rank_multiple="auto", latency=latency, **KFAC)
    assert latency.compared == [{"input": (32, 64)}]  # timed at one calibration batch
    _, report = compress(str(DIGITS), ratio=0.3, allocation="global", rank_multiple=16, latency=latency, **KFAC)
    assert "measured_ratio" not in report.budget["speed"] and len(latency.compared) == 1  # a given multiple: no timing

    monkeypatch.setattr(lat.OrtTimer, "__call__", lambda self, K, N, rank, tokens: fake_timer()(K, N, rank, tokens))
    monkeypatch.setattr(lat.MeasuredLatency, "site_share", lambda self, model, sites, feed, runs=5: 0.9)
    monkeypatch.setattr(lat.MeasuredLatency, "model_ratio", lambda self, a, b, feed, runs=20: fake_ratio(1.02))
    out = tmp_path / "slow.onnx"
    code = main(["compress", str(DIGITS), "-o", str(out), "--method", "kfac", "--calib", str(CALIB), "--quiet",
                 "--target-latency", "0.7", "--latency-cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and list(tmp_path.iterdir()) != []
    assert "cannot pay here" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
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
