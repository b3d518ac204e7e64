"""What a new user meets first (issue 18): defaults that never hand back a useless model, and one plain
sentence, an exit code and nothing written for every rough edge."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, vinfo
from onnx import helper, numpy_helper

from onnx_fwlr import FwlrError, compress
from onnx_fwlr.cli.main import main
from onnx_fwlr.methods import allocation as alloc
from onnx_fwlr.pipeline.compress import calibrate, validate

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "sample_models" / "digits_mlp.onnx"
CALIB = ROOT / "sample_models" / "digits_calib.npz"
TEST = ROOT / "sample_models" / "digits_test.npz"


def accuracy(report) -> float:
    return report.checked.compressed_accuracy


def one_line_error(capsys, code, mentions):
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("onnx-fwlr: error: ") and err.count("\n") == 1, err
    assert mentions.lower() in err.lower(), err
    return err


@pytest.fixture(scope="module")
def crushed(tmp_path_factory):
    """The digits model at svd's old uniform ranks for ratio 0.3 (head at rank 2): 31.6 % accuracy."""
    model, _ = compress(str(DIGITS), ranks={"fc1/Gemm": 15, "fc2/MatMul": 38, "head/Gemm": 2}, method="svd",
                        progress=False)
    path = tmp_path_factory.mktemp("crushed") / "crushed.onnx"
    onnx.save_model(model, str(path))
    return path


# ------------------------------------------------------------------------------------------ 1. defaults

def test_default_with_calibration_is_kfac_global_and_keeps_accuracy(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["compress", str(DIGITS), "-o", str(out), "--ratio", "0.3", "--calib", str(CALIB), "--val",
                 str(TEST), "--quiet", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert (data["method"], data["allocation"]) == ("kfac", "global")
    assert data["validation"]["compressed_accuracy"] >= 0.97  # svd + uniform kept 31.6 %


def test_default_without_data_says_it_is_data_free(tmp_path, capsys):
    assert main(["compress", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "method svd, allocation uniform" in text
    assert "data-free" in text and "--calib" in text


def test_api_defaults_follow_the_data():
    _, with_data = compress(str(DIGITS), ratio=0.3, calibration=str(CALIB), progress=False)
    assert (with_data.method, with_data.allocation) == ("kfac", "global")
    _, without = compress(str(DIGITS), ratio=0.3, progress=False)
    assert (without.method, without.allocation) == ("svd", "uniform")
    _, fwsvd = compress(str(DIGITS), ratio=0.3, method="fwsvd", calibration=str(CALIB), progress=False)
    assert fwsvd.allocation == "global"  # gradient statistics: global by default
    _, whiten = compress(str(DIGITS), ratio=0.3, method="whiten", calibration=str(CALIB), progress=False)
    assert whiten.allocation == "uniform"  # an explicit choice keeps its meaning
    with pytest.raises(FwlrError, match="global"):
        compress(str(DIGITS), ratio=0.3, method="svd", allocation="global", progress=False)


def test_stats_decide_the_default_method():
    activations = calibrate(str(DIGITS), str(CALIB), progress=False)
    gradients = calibrate(str(DIGITS), str(CALIB), fisher=True, progress=False)
    _, from_activations = compress(str(DIGITS), ratio=0.3, stats=activations, progress=False)
    _, from_gradients = compress(str(DIGITS), ratio=0.3, stats=gradients, progress=False)
    assert (from_activations.method, from_activations.allocation) == ("whiten", "uniform")
    assert (from_gradients.method, from_gradients.allocation) == ("kfac", "global")


def test_fwsvd_default_allocation_beats_svd_default():
    _, svd = compress(str(DIGITS), ratio=0.3, validation=str(TEST), progress=False)
    _, fwsvd = compress(str(DIGITS), ratio=0.3, method="fwsvd", calibration=str(CALIB), validation=str(TEST),
                        progress=False)
    assert accuracy(fwsvd) > accuracy(svd)


def test_default_falls_back_to_whiten_where_gradients_cannot_run():
    W = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"), helper.make_node("Shrink", ["h"], ["y"])]
    model = make_model(nodes, [vinfo("x", ["b", 8])], [vinfo("y", ["b", 6])], [numpy_helper.from_array(W, "W")])
    calib = [{"x": np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)}]
    _, report = compress(model, ratio=0.5, calibration=calib, progress=False)
    assert (report.method, report.allocation) == ("whiten", "uniform")
    assert any("Shrink" in w and "whiten" in w for w in report.warnings)
    with pytest.raises(FwlrError, match="Shrink"):  # an explicit kfac is the caller's choice: no silent change
        compress(model, ratio=0.5, method="kfac", calibration=calib, progress=False)


# ------------------------------------------------------------------------------------------ 2. uniform floor

def test_uniform_ranks_keep_the_narrow_head_dense(tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert main(["compress", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--method", "svd",
                 "--val", str(TEST), "--max-accuracy-drop", "100", "--quiet", "--json", str(report_path)]) == 0
    data = json.loads(report_path.read_text())
    head = next(s for s in data["sites"] if s["name"] == "head/Gemm")
    assert head["rank"] is None and "below the floor of 8" in head["note"]
    assert data["site_params_after"] <= 0.3 * data["site_params_before"]  # the other sites paid for it
    assert data["validation"]["compressed_accuracy"] > 0.75  # 31.6 % with the head at rank 2
    assert "below the floor" in capsys.readouterr().out


def test_floor_spends_the_share_elsewhere_or_warns():
    shapes = [(64, 256), (256, 256), (256, 10)]
    ranks, floored = alloc.floored_uniform_ranks(shapes, 0.3)
    assert floored == [2] and ranks[2] is None and min(ranks[:2]) >= alloc.MIN_UNIFORM_RANK
    assert sum(alloc.site_params(K, N, r) for (K, N), r in zip(shapes, ranks)) <= 0.3 * sum(K * N for K, N in shapes)
    narrow = [(16, 12), (16, 12)]  # every uniform rank below the floor: nothing can pay, plain ranks stand
    assert alloc.floored_uniform_ranks(narrow, 0.5) == (alloc.uniform_ranks(narrow, 0.5), [])


def test_floor_that_cannot_be_paid_is_said():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="b")]
    model = make_model(nodes, [vinfo("x", ["n", 16])], [vinfo("y", ["n", 12])],
                       [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W1"),
                        numpy_helper.from_array(rng.standard_normal((16, 12)).astype(np.float32), "W2")])
    _, report = compress(model, ratio=0.4, progress=False)
    assert any("below 8" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------ 3. nothing to do

@pytest.mark.parametrize("budget", [["--ratio", "1"], ["--target-size", "1GB"]])
def test_budget_that_allows_everything_changes_nothing(tmp_path, capsys, budget):
    out = tmp_path / "o.onnx"
    assert main(["compress", str(DIGITS), "-o", str(out), *budget, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "nothing to do" in text and "was not written" in text
    assert not out.exists()


# ------------------------------------------------------------------------------------------ 4, 8. tolerances

def test_validate_with_labels_has_a_default_accuracy_tolerance(crushed, capsys):
    assert main(["validate", str(DIGITS), str(crushed), "--data", str(TEST), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "default tolerance" in text and "\nPASS" not in text


def test_validate_without_labels_or_tolerance_judges_nothing(crushed, tmp_path, capsys):
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, input=np.load(TEST)["input"])
    assert main(["validate", str(DIGITS), str(crushed), "--data", str(unlabelled), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "no tolerance given" in text and "PASS" not in text


def test_max_accuracy_drop_is_in_points_and_range_checked(crushed, tmp_path, capsys):
    common = ["validate", str(DIGITS), str(crushed), "--data", str(TEST), "--quiet"]
    assert main([*common, "--max-accuracy-drop", "5"]) == 1  # 65.8 points lost: 5 points allowed, not 500 %
    assert "more than the allowed 5.00" in capsys.readouterr().out
    assert main([*common, "--max-accuracy-drop", "70"]) == 0
    capsys.readouterr()
    one_line_error(capsys, main([*common, "--max-accuracy-drop", "500"]), "between 0 and 100")
    out = tmp_path / "o.onnx"
    one_line_error(capsys, main(["compress", str(DIGITS), "-o", str(out), "--ratio", "0.3", "--max-accuracy-drop",
                                 "-1"]), "out of range")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ 5, 6. before any work

def test_unwritable_json_path_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    one_line_error(capsys, main(["compress", str(DIGITS), "-o", str(out), "--ratio", "0.3", "--json",
                                 str(tmp_path / "no" / "such" / "r.json")]), "does not exist")
    assert not out.exists()


def test_nan_in_validation_data_is_found_before_calibrating(tmp_path, capsys, monkeypatch):
    data = dict(np.load(TEST))
    data["input"][450, 3] = np.nan
    bad = tmp_path / "bad_val.npz"
    np.savez(bad, **data)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the validation data was checked")

    monkeypatch.setattr("onnx_fwlr.stats.fisher.collect_fisher_stats", no_calibration)
    out = tmp_path / "o.onnx"
    err = one_line_error(capsys, main(["compress", str(DIGITS), "-o", str(out), "--ratio", "0.3", "--calib",
                                       str(CALIB), "--val", str(bad), "--quiet"]), "NaN")
    assert "bad_val.npz" in err and "before calibrating" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ 7. Ctrl-C

def _worker_pids(pid: int) -> list[str]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text(errors="ignore"):
                found.append(child)
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to see the workers")
def test_ctrl_c_with_workers_is_one_line_and_130(tmp_path):
    rng = np.random.default_rng(0)
    n, nodes, inits, x = 1200, [], [], "x"
    for i in range(6):  # six 1200x1200 SVDs: seconds of work for two workers
        inits.append(numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
        x = f"h{i}"
    big = make_model(nodes, [vinfo("x", ["b", n])], [vinfo(x, ["b", n])], inits)
    onnx.save_model(big, str(tmp_path / "big.onnx"))
    command = [sys.executable, "-m", "onnx_fwlr", "compress", str(tmp_path / "big.onnx"), "-o",
               str(tmp_path / "o.onnx"), "--ratio", "0.5", "--svd", "exact", "--workers", "2"]
    # A terminal's child gets the default SIGINT action even when pytest itself was started with SIGINT ignored
    # (a shell's `cmd &` does that): restore it, or Python never installs its KeyboardInterrupt handler.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while len(_worker_pids(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "onnx-fwlr: interrupted\n", err[-2000:]
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------------------ 10. sweep

def test_sweep_defaults_reference_row_and_skipped_pairs(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(DIGITS), "--calib", str(CALIB), "--val", str(TEST), "--ratios", "0.3", "-o", str(out),
                 "--no-plots", "--quiet"]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["original", "svd/uniform", "whiten/uniform", "kfac/global"]
    assert rows[0]["accuracy"] == pytest.approx(0.974) and rows[-1]["accuracy"] > 0.96
    capsys.readouterr()
    one_line_error(capsys, main(["sweep", str(DIGITS), "--val", str(TEST), "--ratios", "0.3", "-o", str(out)]),
                   "--force")
    assert main(["sweep", str(DIGITS), "--calib", str(CALIB), "--val", str(TEST), "--ratios", "0.3", "-o", str(out),
                 "--methods", "svd,kfac", "--allocations", "uniform,global", "--no-plots", "--quiet", "--force"]) == 0
    assert "svd/global skipped" in capsys.readouterr().out
    data = json.loads((out / "sweep.json").read_text())
    assert [r["config"] for r in data["rows"]] == ["original", "svd/uniform", "kfac/uniform", "kfac/global"]
    assert data["skipped"] and "svd/global" in data["skipped"][0]


def test_sweep_finds_recurrent_sites_like_compress(tmp_path):
    from builders import write_lstm

    write_lstm(tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", str(tmp_path / "lstm.onnx"), "--calib", str(tmp_path / "lstm_calib.npz"), "--val",
                 str(tmp_path / "lstm_val.npz"), "--ratios", "0.5", "--methods", "whiten,kfac", "-o", str(out),
                 "--no-plots", "--quiet"]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"][1:]
    assert {r["config"] for r in rows} == {"whiten/uniform", "kfac/global"}
    assert all("lstm" in r["ranks"] for r in rows)


def test_spectra_plots_have_axis_labels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from onnx_fwlr.evaluate.plots import plot_spectra

    labels = []
    original_savefig = Figure.savefig

    def record(figure, *args, **kwargs):
        labels.extend((ax.get_xlabel(), ax.get_ylabel()) for ax in figure.axes if ax.axison)
        return original_savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    plot_spectra([("a", np.array([3.0, 2.0, 1.0]), 2), ("b", np.array([1.0, 0.5]), None)], tmp_path / "s.png")
    assert labels and all(x and y for x, y in labels)


# ------------------------------------------------------------------------------------------ 11. choosing outputs

def _two_outputs(length: int) -> onnx.ModelProto:
    """y = x W [n, 8]; z = y[:, :length], a stand-in for an output whose length the model decides."""
    W = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W")] + [numpy_helper.from_array(np.array([v], np.int64), name)
                                                 for name, v in (("s", 0), ("e", length), ("ax", 1))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Slice", ["y", "s", "e", "ax"], ["z"])]
    return make_model(nodes, [vinfo("x", ["n", 4])], [vinfo("y", ["n", 8]), vinfo("z", ["n", "len"])], inits)


def test_outputs_and_common_prefix(tmp_path, capsys):
    onnx.save_model(_two_outputs(8), str(tmp_path / "a.onnx"))
    onnx.save_model(_two_outputs(6), str(tmp_path / "b.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(4).standard_normal((10, 4)).astype(np.float32))
    common = ["validate", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--data", str(tmp_path / "d.npz"),
              "--quiet", "--min-cosine", "0.999"]
    one_line_error(capsys, main(common), "--common-prefix")
    assert main([*common, "--outputs", "y"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and not re.search(r"^z ", text, re.M)
    assert main([*common, "--common-prefix", "--json", str(tmp_path / "v.json")]) == 0
    outputs = {o["name"]: o for o in json.loads((tmp_path / "v.json").read_text())["outputs"]}
    assert outputs["z"]["rel_l2_error"] == 0.0  # the first 6 columns are the same


def test_compress_val_compares_only_the_chosen_outputs(tmp_path):
    _, report = compress(_two_outputs(8), ratio=0.5, validation=[{"x": np.ones((3, 4), np.float32)}], outputs=["z"],
                         progress=False)
    assert [o.name for o in report.checked.outputs] == ["z"]


# ------------------------------------------------------------------------------------------ 12. nothing to factorise

def test_model_with_nothing_to_factorise_says_so_plainly(tmp_path, capsys):
    path = tmp_path / "relu.onnx"
    onnx.save_model(make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [2, 3])], [vinfo("y", [2, 3])]),
                    str(path))
    assert main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "nothing to do" in text and "not written" in text and "--write-unchanged" in text
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------------------ 13. rough edges

def test_nan_in_a_weight_names_the_weight(tmp_path, capsys):
    model = onnx.load(str(DIGITS))
    for tensor in model.graph.initializer:
        if tensor.name == "fc2.weight":
            values = numpy_helper.to_array(tensor).copy()
            values[0, 0] = np.nan
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save_model(model, str(tmp_path / "nan.onnx"))
    one_line_error(capsys, main(["compress", str(tmp_path / "nan.onnx"), "-o", str(tmp_path / "o.onnx"), "--ratio",
                                 "0.5", "--quiet"]), "fc2.weight")


def test_progress_bars_have_a_total_and_stay_out_of_logs(tmp_path, capsys):
    from onnx_fwlr.io.data import open_data

    assert len(open_data(str(CALIB), onnx.load(str(DIGITS)))) == 16  # 512 samples / 32: the bar's total
    compress(str(DIGITS), ratio=0.3, calibration=str(CALIB), progress=True)
    assert "/16" in capsys.readouterr().err  # "n/16" with an ETA while calibrating
    assert main(["compress", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--calib", str(CALIB)]) == 0
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no bar frames in the log


def test_top1_agreement_only_for_class_scores():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((8, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
             helper.make_node("ReduceL2", ["h"], ["norm"], axes=[1], keepdims=1),
             helper.make_node("Div", ["h", "norm"], ["y"])]
    embedding = make_model(nodes, [vinfo("x", ["n", 8])], [vinfo("y", ["n", 16])], [numpy_helper.from_array(W, "W")])
    data = [{"x": rng.standard_normal((12, 8)).astype(np.float32)}]
    compressed, _ = compress(embedding, ratio=0.5, progress=False)
    assert validate(embedding, compressed, data, progress=False).outputs[0].top1_agreement is None
    digits, _ = compress(str(DIGITS), ratio=0.5, progress=False)
    assert validate(str(DIGITS), digits, str(TEST), progress=False).outputs[0].top1_agreement is not None


def test_api_types_are_checked():
    with pytest.raises(FwlrError, match="`ratio` must be a number"):
        compress(str(DIGITS), ratio="0.5")
    with pytest.raises(FwlrError, match="`batch_size` must be a whole number"):
        compress(str(DIGITS), ratio=0.5, batch_size="32")


def test_generator_with_sequential_is_refused_up_front():
    drawn = []

    def batches():
        drawn.append(1)
        yield {"input": np.load(CALIB)["input"][:32]}

    with pytest.raises(FwlrError, match="read only once"):
        compress(str(DIGITS), ratio=0.3, calibration=batches(), sequential=True)
    assert not drawn


# ------------------------------------------------------------------------------------------ 14. BLAS threads

def test_blas_threads_follow_the_work_and_the_load():
    from onnx_fwlr.pipeline.decompose import blas_threads

    assert blas_threads(512, 512, cores=16, load=0.0) == 1  # small: one thread was never slower
    assert blas_threads(4096, 4096, cores=16, load=0.0) == 8
    assert blas_threads(4096, 4096, cores=16, load=15.5) == 1  # a busy machine: no threads to spare
    assert blas_threads(4096, 4096, cores=2, load=0.0) == 2


def test_small_svd_runs_on_one_blas_thread(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from onnx_fwlr.methods import lowrank
    from onnx_fwlr.pipeline import decompose
    from onnx_fwlr.sites.find import WeightRef

    seen = []
    real = lowrank.weighted_svd

    def recording(*args, **kwargs):
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return real(*args, **kwargs)

    monkeypatch.setattr(decompose.lowrank, "weighted_svd", recording)
    job = (WeightRef(False, values=np.ones((64, 32), np.float32)), None, None, None, 0, "w")
    with threadpool_limits(2, user_api="blas"):
        decompose.decompose_one(job)
    assert seen and max(seen) == 1


# ------------------------------------------------------------------------------------------ 15. README quickstart

def test_readme_quickstart_uses_the_defaults_and_writes_to_an_ignored_path():
    readme = (ROOT / "README.md").read_text()
    first = next(block for block in re.findall(r"```bash\n(.*?)```", readme, re.S) if "onnx-fwlr compress" in block)
    assert "--method" not in first and "--allocation" not in first  # the defaults do the right thing
    output = re.search(r"-o (\S+)", first).group(1)
    ignored = subprocess.run(["git", "check-ignore", "-q", output], cwd=ROOT)
    assert ignored.returncode == 0, f"{output} is not covered by .gitignore"


NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?")


def _same_line(shown: str, printed: str) -> bool:
    """A README line and a printed one: the same words; integers (ranks, parameters, bytes) equal; decimals
    within 1 % (their last digit moves between CPUs: 0.02827 here, 0.02828 on an AVX2-only EPYC)."""
    if NUMBER.sub("#", shown) != NUMBER.sub("#", printed):
        return False
    for a, b in zip(NUMBER.findall(shown), NUMBER.findall(printed)):
        if "." in a or "e" in a:
            if abs(float(a) - float(b)) > 0.01 * abs(float(a)):
                return False
        elif a != b:
            return False
    return True


def _shown_in_order(shown: list[str], printed: list[str]) -> list[str]:
    """The README's lines that are not printed in its order: runs of lines are consecutive, '...' skips lines,
    and 'wrote PATH' matches any path."""
    missing, at, gap = [], 0, True
    for line in shown:
        if line == "...":
            gap = True
            continue
        def same(candidate):
            return candidate.startswith("wrote ") if line.startswith("wrote ") else _same_line(line, candidate)
        window = range(at, len(printed)) if gap else range(at, min(at + 1, len(printed)))
        found = next((i for i in window if same(printed[i])), None)
        if found is None:
            missing.append(line)
        else:
            at, gap = found + 1, False
    return missing


def test_readme_quickstart_output_is_what_the_command_prints(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    command = next(block for block in re.findall(r"```bash\n(.*?)```", readme, re.S) if "onnx-fwlr compress" in block)
    argv = command.split("onnx-fwlr ", 1)[1].split()
    argv[argv.index("-o") + 1] = str(tmp_path / "digits_small.onnx")
    argv = [str(ROOT / a) if a.startswith("sample_models/") else a for a in argv]
    shown = readme.split("What the first command prints", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    assert main(argv + ["--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(shown.splitlines()) > 20
    assert _shown_in_order(shown.splitlines(), printed) == []


def test_compress_prints_where_the_model_went(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compress", str(DIGITS), "-o", "o.onnx", "--ratio", "0.5", "--quiet"]) == 0
    assert f"wrote {(tmp_path / 'o.onnx').resolve()}\n" in capsys.readouterr().out  # the full path
