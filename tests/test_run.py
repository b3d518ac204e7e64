"""One run for the CLI and the API: `onnx_fwlr.compress(..., quantize=...)` runs what `compress --quantize` runs
(quantized inputs, the speed guard, validation), the default method is derived once, and the typed config is
checked once, recorded and replayed (--save-config / --config)."""

import json
from pathlib import Path

import onnx
import pytest

from onnx_fwlr import FwlrError, compress
from onnx_fwlr.cli.main import main
from onnx_fwlr.cost import latency as lat
from onnx_fwlr.methods.allocation import MS_TOLERANCE
from onnx_fwlr.pipeline import budget as budget_module
from onnx_fwlr.pipeline import checks as checks_module
from onnx_fwlr.pipeline import quantized as quantized_module
from onnx_fwlr.pipeline.compress import calibrate
from onnx_fwlr.pipeline.config import (
    BudgetOptions,
    DataOptions,
    MethodOptions,
    QuantizeOptions,
    RunConfig,
    StructuredOptions,
)
from onnx_fwlr.pipeline.run import run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
DIGITS, CALIB, TEST = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_calib.npz", SAMPLES / "digits_test.npz"


@pytest.fixture(scope="module")
def activation_stats(tmp_path_factory):
    """Statistics without gradients, as `onnx-fwlr calibrate` (no --fisher) writes them."""
    path = tmp_path_factory.mktemp("stats") / "activations.npz"
    calibrate(str(DIGITS), str(CALIB), progress=False).save(path)
    return path


@pytest.fixture
def int8_model(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp_path / "digits_int8.onnx"
    quantize_dynamic(str(DIGITS), str(path), weight_type=QuantType.QInt8)
    return path


def _cli(tmp_path, *flags, name="out"):
    out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
    code = main(["compress", str(DIGITS), "-o", str(out), "--quiet", "--json", str(report), *flags])
    return code, out, report


def test_quantize_with_activation_stats_takes_the_same_default_method_as_the_float_path(tmp_path, activation_stats):
    """Failed before: --quantize derived its own default (kfac for any --stats) and stopped with "needs gradient
    (Fisher) statistics" although nobody asked for kfac."""
    code, _, report = _cli(tmp_path, "--stats", str(activation_stats), "--quantize", "int8", "--rank", "4")
    assert code == 0
    code_ratio, _, ratio_report = _cli(tmp_path, "--stats", str(activation_stats), "--ratio", "0.5", name="ratio")
    assert code_ratio == 0
    assert json.loads(report.read_text())["method"] == json.loads(ratio_report.read_text())["method"] == "whiten"


def test_api_quantize_gives_the_cli_bytes(tmp_path):
    code, out, report = _cli(tmp_path, "--calib", str(CALIB), "--quantize", "int4", "--rank", "4")
    model, api_report = compress(str(DIGITS), quantize="int4", rank=4, calibration=str(CALIB), progress=False)
    assert code == 0 and model.SerializeToString() == onnx.load(str(out)).SerializeToString()
    assert api_report.budget == json.loads(report.read_text())["budget"]


def test_api_quantize_on_an_int8_input_requantizes_and_validates(int8_model):
    model, report = compress(str(int8_model), quantize="int8", rank=4, calibration=str(CALIB),
                             validation=str(TEST), progress=False)
    assert "quantized again" in report.input_quantization  # the int8 input was dequantized, then requantized
    assert report.checked is not None and report.validation["outputs"]  # validated against the int8 input
    ops = {n.op_type for n in model.graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops


class _FakeLatency(lat.MeasuredLatency):
    """FLOP-proportional tables (int8 forms 0.57x, int4 1.06x), a profiled share of 0.9, a measured 0.8."""

    def site_share(self, model, nodes, feed, runs=5):
        return 0.9

    def model_ratio(self, original, compressed, feed, runs=20):
        return {"pairs": 20, "ratio_p50": 0.8, "ratio_p10": 0.78, "ratio_p90": 0.83}


def _fake_timer(K, N, rank, tokens, form=lat.FP32):
    dense = 2 * tokens * K * N / 1e6
    flops = 0.0 if rank is None else 2 * tokens * rank * (K + N) / 1e6
    if form in (lat.FP32, lat.INT8):
        return (1.0 if form == lat.FP32 else 0.57) * (dense if rank is None else flops)
    return (1.06 if form.startswith("int4") else 0.57) * dense + flops


def test_api_quantize_under_a_latency_budget_runs_the_measured_guard(tmp_path, monkeypatch):
    """The speed guard ran only in the CLI before: the API's report now carries the measured ratio too."""
    latency = _FakeLatency(threads=1, cache_dir=tmp_path, timer=_fake_timer)
    _, report = compress(str(DIGITS), quantize="auto", target_latency=0.8, calibration=str(CALIB), progress=False,
                         latency=latency)
    assert report.budget["speed"]["measured_ratio"] == 0.8


def test_the_budget_and_the_quantize_options_are_checked_once(monkeypatch):
    calls = {"budget": 0, "options": 0, "quantized budget": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(budget_module.Budget, "check", counting("budget", budget_module.Budget.check))
    compress(str(DIGITS), ratio=0.3, method="whiten", calibration=str(CALIB), progress=False)
    assert calls["budget"] == 1
    options = counting("options", quantized_module.check_options)
    quantized_budget = counting("quantized budget", quantized_module.check_budget)
    for module in (quantized_module, checks_module):  # where they are defined, and where the config calls them
        monkeypatch.setattr(module, "check_options", options)
        monkeypatch.setattr(module, "check_budget", quantized_budget)
    compress(str(DIGITS), quantize="int8", rank=4, calibration=str(CALIB), progress=False)
    assert calls["options"] == 1 and calls["quantized budget"] == 1


def test_a_config_is_checked_when_it_is_made():
    with pytest.raises(FwlrError, match="`quantize` does not combine with `sequential`"):
        compress(str(DIGITS), quantize="int8", rank=4, sequential=True, calibration=str(CALIB), progress=False)
    with pytest.raises(FwlrError, match="unknown `quantize` 'int3'"):
        QuantizeOptions(mode="int3")
    with pytest.raises(FwlrError, match="`batch_size` must be a whole number"):
        DataOptions(batch_size=2.5)
    with pytest.raises(FwlrError, match="`fisher_options` has no option 'sample'"):
        compress(str(DIGITS), ratio=0.3, fisher_options={"sample": 2}, progress=False)
    config = RunConfig(model=str(DIGITS), budget=BudgetOptions(ratio=0.5), quantize=QuantizeOptions(mode="int8"),
                       data=DataOptions(calibration=str(CALIB)))
    assert config.currency == "bytes"
    assert RunConfig(model=str(DIGITS), budget=BudgetOptions(ratio=0.5)).currency == "parameters"
    assert RunConfig(model=str(DIGITS), budget=BudgetOptions(target_latency=0.5), data=DataOptions(
        calibration=str(CALIB))).currency == "milliseconds"


def test_save_config_then_config_replays_the_same_bytes(tmp_path):
    saved = tmp_path / "run.json"
    code, out, report = _cli(tmp_path, "--calib", str(CALIB), "--method", "whiten", "--ratio", "0.4",
                             "--save-config", str(saved))
    assert code == 0
    values = json.loads(saved.read_text())
    assert values["budget"]["ratio"] == 0.4 and values["method"]["method"] == "whiten"
    replay = tmp_path / "replay.onnx"
    assert main(["compress", "--config", str(saved), "-o", str(replay), "--quiet"]) == 0
    assert replay.read_bytes() == out.read_bytes()
    model, _ = run(RunConfig.from_dict(values))  # the API reads the same file
    assert model.SerializeToString() == onnx.load(str(out)).SerializeToString()


def test_a_bad_config_file_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": str(DIGITS), "budget": {"ratios": 0.5}}))
    out = tmp_path / "x.onnx"
    assert main(["compress", "--config", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "group 'budget' has no option 'ratios'" in err and "Traceback" not in err and not out.exists()
    with pytest.raises(FwlrError, match="a config file cannot hold"):
        RunConfig(model=onnx.load(str(DIGITS)), budget=BudgetOptions(ratio=0.5)).to_dict()


def test_the_report_records_the_config_it_ran_with(tmp_path):
    feeds = [{"input": __import__("numpy").zeros((4, 64), "float32")}]
    _, report = compress(str(DIGITS), ratio=0.5, method="whiten", calibration=feeds, progress=False)
    recorded = report.to_dict()["config"]
    assert recorded["budget"]["ratio"] == 0.5 and recorded["method"]["method"] == "whiten"
    assert recorded["data"]["calibration"] == "<list>" and recorded["model"] == str(DIGITS)


@pytest.mark.parametrize("options, message", [
    ({"method": "kron", "rank_multiple": 16}, "works with plain low-rank methods"),
    ({"methods": ["whiten", "kron"], "target_latency": 0.5}, "works with plain low-rank methods"),
    ({"method": "svd", "target_latency": 0.5}, "loss units"),
    ({"method": "whiten", "forms": "measured"}, "chooses the ONNX form of structured sites"),
], ids=["kron-multiple", "methods-latency", "svd-latency", "forms-low-rank"])
def test_speed_and_form_options_are_checked_before_the_timing_batch(options, message):
    """No calibration file and no shapes: the option that cannot apply is named, not the missing timing batch."""
    budget = {} if "target_latency" in options else {"ratio": 0.5}
    with pytest.raises(FwlrError, match=message):
        compress(str(DIGITS), calibration="random", progress=False, **budget, **options)


def test_config_records_its_currency_and_a_bad_save_config_path_stops_first(tmp_path, capsys):
    config = RunConfig(model=str(DIGITS), budget=BudgetOptions(target_size=150000))
    assert config.to_dict()["currency"] == "bytes"
    assert RunConfig.from_dict(config.to_dict()) == config  # the derived currency is not read back
    out = tmp_path / "out.onnx"
    code = main(["compress", str(DIGITS), "-o", str(out), "--ratio", "0.5", "--save-config",
                 str(tmp_path / "missing" / "run.json")])
    assert code == 2 and not out.exists() and "--save-config" in capsys.readouterr().err


def test_the_flags_added_beside_the_refactor_reach_the_config_and_the_api(tmp_path):
    """--accuracy-level, --merge-corrections, --no-latency-check and --batch-axis are config fields: saved,
    replayed, and the same run as the API's keywords."""
    saved = tmp_path / "run.json"
    code, out, _ = _cli(tmp_path, "--calib", str(CALIB), "--quantize", "int4", "--rank", "4", "--accuracy-level", "0",
                        "--merge-corrections", "--no-latency-check", "--batch-axis", "logits:0",
                        "--save-config", str(saved))
    assert code == 0
    values = json.loads(saved.read_text())
    assert values["quantize"]["accuracy_level"] == 0 and values["quantize"]["merge_corrections"] is True
    assert values["speed"]["latency_check"] is False and values["compare"]["batch_axes"] == {"logits": 0}
    model, _ = compress(str(DIGITS), quantize="int4", rank=4, calibration=str(CALIB), accuracy_level=0,
                        merge_corrections=True, batch_axes={"logits": 0}, progress=False)
    assert model.SerializeToString() == onnx.load(str(out)).SerializeToString()
    assert RunConfig.from_dict(values).quantize.merge_corrections is True


def test_the_options_added_beside_the_refactor_are_checked_when_the_config_is_made():
    with pytest.raises(FwlrError, match="unknown `accuracy_level` 2"):
        QuantizeOptions(mode="int4", accuracy_level=2)
    with pytest.raises(FwlrError, match="`merge_corrections` applies to quantized sites"):
        compress(str(DIGITS), ratio=0.5, merge_corrections=True, progress=False)
    with pytest.raises(FwlrError, match="`refine_steps` 0 is out of range"):
        compress(str(DIGITS), ratio=0.5, refine_steps=0, calibration=str(CALIB), progress=False)
    balanced = RunConfig(model=str(DIGITS), budget=BudgetOptions(ratio=0.5),
                         structured=StructuredOptions(kron_shape="balanced"), method=MethodOptions(method="kron"))
    assert RunConfig.from_dict(balanced.to_dict()) == balanced  # "balanced" stays a word, four numbers a tuple
    shaped = RunConfig(model=str(DIGITS), budget=BudgetOptions(ratio=0.5),
                       structured=StructuredOptions(kron_shape=(8, 8, 4, 4)), method=MethodOptions(method="kron"))
    assert RunConfig.from_dict(json.loads(json.dumps(shaped.to_dict()))) == shaped


def test_config_file_model_is_checked_for_perplexity_before_work(tmp_path, capsys):
    """`compress --config F --metric perplexity` with the model named only in F: one sentence, nothing written."""
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"model": str(DIGITS), "budget": {"ratio": 0.5}}))
    out = tmp_path / "x.onnx"
    code = main(["compress", "--config", str(saved), "-o", str(out), "--val", str(TEST), "--metric", "perplexity",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no token-id input" in err and "Traceback" not in err and not out.exists()


def test_the_executor_is_a_method_option_saved_and_replayed():
    from onnx_fwlr.pipeline.distributed import Executor

    config = RunConfig(model=str(DIGITS), budget=BudgetOptions(ratio=0.5), data=DataOptions(calibration=str(CALIB)),
                       method=MethodOptions(method="whiten", executor=Executor(shards=2)))
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["method"]["executor"] == {"kind": "local", "address": None, "shards": 2, "shared_dir": None}
    assert RunConfig.from_dict(saved) == config
    del saved["method"]["executor"]["shared_dir"]  # a config saved before `ray_shared_dir` existed
    assert RunConfig.from_dict(saved) == config
    with pytest.raises(FwlrError, match="`shards` 0 is out of range"):
        MethodOptions(executor=Executor(shards=0))
    with pytest.raises(FwlrError, match="spread low-rank compression; drop them with `quantize`"):
        compress(str(DIGITS), quantize="int8", rank=4, executor=Executor(shards=2), progress=False)


def test_reuse_shares_decompositions_across_budgets_and_refuses_other_runs():
    """run(config, reuse=...): the second budget reuses the first run's whole decompositions (no prepare), its
    bytes equal a run of its own with exact SVDs; a run that differs in more than the budget is refused."""
    from onnx_fwlr.pipeline.run import Reuse

    model = onnx.load(str(DIGITS))
    stats = calibrate(str(DIGITS), str(CALIB), fisher=True, progress=False)

    def config(ratio, **method):
        return RunConfig(model=model, data=DataOptions(stats=stats), budget=BudgetOptions(ratio=ratio),
                         method=MethodOptions(**{"method": "kfac", "allocation": "global", "svd": "exact", **method}),
                         progress=False)

    reuse = Reuse()
    first, _ = run(config(0.3), reuse=reuse)
    prepared = reuse.prepared["kfac"]
    second, report = run(config(0.5), reuse=reuse)
    assert reuse.prepared["kfac"] is prepared and prepared.decompositions  # kept whole for the next budget
    alone, alone_report = run(config(0.5))
    assert second.SerializeToString() == alone.SerializeToString()
    assert [s.rank for s in report.sites] == [s.rank for s in alone_report.sites]
    assert first.SerializeToString() != second.SerializeToString()
    with pytest.raises(FwlrError, match="more than its budget"):
        run(config(0.4, sequential=True), reuse=reuse)


@pytest.mark.parametrize("options, currency, rank_of", [
    (dict(ratio=0.4, method="kfac", allocation="global"), "parameters", {"low rank"}),
    (dict(rank=8), "parameters", {"low rank"}),
    (dict(target_size=150000), "bytes", {"low rank"}),
    (dict(method="kron", ratio=0.3, kron_shape="balanced"), "parameters", {"kronecker terms", "low rank"}),
    (dict(max_error=0.05, validation=str(TEST)), "output error", {"low rank"}),
    (dict(method="kfac", target_latency=0.7), "milliseconds", {"low rank"}),
    (dict(quantize="auto", ratio=0.5), "bytes", {"correction"}),
    (dict(quantize="int4"), None, {"correction"}),
    (dict(quantize="auto", target_latency=0.8), "milliseconds", {"correction", "low rank"}),
], ids=["global", "rank", "target-size", "kron", "max-error", "latency", "quantize-bytes", "quantize-fixed",
        "quantize-latency"])
def test_every_mode_fills_one_budget_shape(tmp_path, options, currency, rank_of):
    """report.budget's currency, target, spent and totals mean the same in every mode; spent is the total of
    its currency after, and within the target where the allocator spends it; each site's rank says what it
    counts (rank_of)."""
    latency = _FakeLatency(threads=1, cache_dir=tmp_path, timer=_fake_timer)
    _, report = compress(str(DIGITS), calibration=str(CALIB), progress=False, latency=latency, **options)
    budget = report.budget
    assert budget["currency"] == currency
    assert set(budget["totals"]) >= {"parameters"}
    assert budget["totals"]["parameters"] == {"before": report.site_params_before, "after": report.site_params_after}
    if currency is None:
        assert budget["target"] is None and budget["spent"] is None
    elif currency == "output error":
        assert budget["spent"] <= budget["target"] == 0.05
    else:
        assert budget["spent"] == budget["totals"][currency]["after"]
        if "rank" not in options and "kron_shape" not in options:  # a rank, or per-site structures, set no limit
            slack = MS_TOLERANCE if currency == "milliseconds" else 0.0  # sums of ms met within a rounding
            assert budget["spent"] <= budget["target"] * (1 + slack)
    if currency == "milliseconds":
        before = budget["totals"]["milliseconds"]["before"]
        assert budget["target"] == pytest.approx(options["target_latency"] * before)
    ranks = {s.rank_of for s in report.sites if s.rank is not None}
    assert ranks and ranks <= rank_of
    assert all(s.rank_of == "" for s in report.sites if s.rank is None)
    assert json.loads(json.dumps(report.to_dict()))["budget"]["currency"] == currency


def test_a_quantized_inputs_byte_budget_is_recorded_in_bytes(int8_model):
    """`ratio` of an int8 input counts its bytes (the float sites keep the share that meets it): the record says
    bytes, the share of the input's bytes as the target, and the requantized model's bytes as spent."""
    _, report = compress(str(int8_model), ratio=0.5, calibration=str(CALIB), progress=False)
    budget = report.budget
    assert budget["currency"] == "bytes" and budget["totals"]["bytes"]["before"] == budget["input_bytes"]
    assert budget["target"] == 0.5 * budget["input_bytes"]
    assert budget["spent"] == budget["totals"]["bytes"]["after"] <= budget["target"]
