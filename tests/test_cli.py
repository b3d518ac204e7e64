"""The command line: tables, JSON, reproducibility, and one clear sentence for every user mistake."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import low_rank, make_model, matmul_model, vinfo
from onnx import helper, numpy_helper

from onnx_fwlr.cli.main import main


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp(tmp_path):
    """Two-layer model: big enough that ratio 0.5 factorises both weights."""
    W1, W2 = low_rank(64, 96, 40, seed=1), low_rank(96, 48, 30, seed=2)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "W2"], ["y"], name="fc2"),
    ]
    model = make_model(nodes, [vinfo("x", ["b", 64])], [vinfo("y", ["b", 48])],
                       [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])
    helper.set_model_props(model, {"author": "tests"})
    path = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(path))
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def test_compress_ratio_half_counts_and_size(mlp, tmp_path, capsys):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    assert run_cli("compress", mlp, "-o", out, "--ratio", 0.5, "--json", report_path, "--quiet") == 0
    table = capsys.readouterr().out
    assert "fc1" in table and "params before" in table and "file size" in table
    report = json.loads(report_path.read_text())
    compressed = onnx.load(str(out))
    actual = sum(int(np.prod(t.dims)) for t in compressed.graph.initializer)
    assert report["model_params_after"] == actual
    assert report["site_params_after"] == actual  # only factor weights remain
    assert report["site_params_after"] <= 0.5 * report["site_params_before"]
    assert out.stat().st_size < mlp.stat().st_size
    assert report["file_size_after"] < report["file_size_before"]
    # metadata, inputs, outputs and opsets survive
    assert {p.key: p.value for p in compressed.metadata_props} == {"author": "tests"}
    original = onnx.load(str(mlp))
    assert compressed.graph.input == original.graph.input and compressed.graph.output == original.graph.output
    assert compressed.opset_import == original.opset_import
    onnx.checker.check_model(compressed, full_check=True)


def test_compress_twice_is_byte_identical(mlp, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run_cli("compress", mlp, "-o", a, "--ratio", 0.4, "--quiet") == 0
    assert run_cli("compress", mlp, "-o", b, "--ratio", 0.4, "--quiet") == 0
    assert sha(a) == sha(b)


def test_inspect_lists_sites_and_skipped(tmp_path, capsys):
    W = low_rank(32, 16, 4)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("MatMul", ["h", "ht"], ["s"], name="scores"),
        helper.make_node("MatMul", ["x", "tiny"], ["t"], name="tiny_mm"),
    ]
    model = make_model(
        nodes, [vinfo("x", [4, 32]), vinfo("ht", [16, 4])], [vinfo("s", [4, 4]), vinfo("t", [4, 1])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.ones((32, 1), np.float32), "tiny")],
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    assert run_cli("inspect", path, "--json", tmp_path / "i.json") == 0
    out = capsys.readouterr().out
    assert "proj" in out and "32x16" in out
    assert "computed at run time" in out and "too small" in out
    listing = json.loads((tmp_path / "i.json").read_text())
    assert [s["name"] for s in listing["sites"]] == ["proj"]
    assert len(listing["skipped"]) == 2


def test_json_to_stdout(mlp, tmp_path, capsys):
    assert run_cli("compress", mlp, "-o", tmp_path / "o.onnx", "--rank", 8, "--json", "-", "--quiet") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sites"][0]["rank"] == 8
    assert "params before" in captured.err


# --- bad input: exit 2, one sentence, input untouched, nothing written ------------------------------


def expect_error(capsys, *args, mentions):
    code = run_cli(*args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("onnx-fwlr: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert mentions.lower() in err.lower(), err
    return err


def test_missing_file(tmp_path, capsys):
    expect_error(capsys, "compress", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx", "--ratio", 0.5,
                 mentions="not found")
    assert not (tmp_path / "o.onnx").exists()


def test_not_onnx(tmp_path, capsys):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("this is a text file, not a model\n" * 20)
    expect_error(capsys, "compress", bogus, "-o", tmp_path / "o.onnx", "--ratio", 0.5, mentions="not")
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_model(mlp, tmp_path, capsys):
    data = mlp.read_bytes()
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    expect_error(capsys, "compress", truncated, "-o", tmp_path / "o.onnx", "--ratio", 0.5, mentions="truncated")
    assert not (tmp_path / "o.onnx").exists()


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    expect_error(capsys, "inspect", empty, mentions="not an ONNX model")


def test_output_equals_input(mlp, capsys):
    before = sha(mlp)
    expect_error(capsys, "compress", mlp, "-o", mlp, "--ratio", 0.5, "--force", mentions="is the input model")
    assert sha(mlp) == before


def test_existing_output_needs_force(mlp, tmp_path, capsys):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"keep me")
    expect_error(capsys, "compress", mlp, "-o", out, "--ratio", 0.5, mentions="--force")
    assert out.read_bytes() == b"keep me"
    assert run_cli("compress", mlp, "-o", out, "--ratio", 0.5, "--force", "--quiet") == 0
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5])
def test_ratio_out_of_range(mlp, tmp_path, capsys, ratio):
    expect_error(capsys, "compress", mlp, "-o", tmp_path / "o.onnx", "--ratio", ratio, mentions="out of range")
    assert not (tmp_path / "o.onnx").exists()


def test_bad_regex(mlp, tmp_path, capsys):
    expect_error(capsys, "compress", mlp, "-o", tmp_path / "o.onnx", "--ratio", 0.5, "--include", "fc(",
                 mentions="not a valid regular expression")


def test_regex_matching_nothing_warns(mlp, tmp_path, capsys):
    assert run_cli("compress", mlp, "-o", tmp_path / "o.onnx", "--ratio", 0.5, "--exclude", "no_such_layer",
                   "--quiet") == 0
    assert "matched no node or weight name" in capsys.readouterr().out


def test_no_factorisable_site(tmp_path, capsys):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [2, 3])], [vinfo("y", [2, 3])])
    path = tmp_path / "relu.onnx"
    onnx.save_model(model, str(path))
    assert run_cli("compress", path, "-o", tmp_path / "o.onnx", "--ratio", 0.5) == 0
    assert "no factorisable" in capsys.readouterr().out
    assert not (tmp_path / "o.onnx").exists()
    assert run_cli("compress", path, "-o", tmp_path / "o.onnx", "--ratio", 0.5, "--write-unchanged") == 0
    assert (tmp_path / "o.onnx").exists()


def test_external_data_outside_folder_refused(tmp_path, capsys):
    W = low_rank(32, 16, 4)
    model = matmul_model(W)
    path = tmp_path / "evil.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    evil = onnx.load(str(path), load_external_data=False)
    for entry in evil.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    onnx.save_model(evil, str(path))
    expect_error(capsys, "inspect", path, mentions="outside the model's folder")


def test_external_data_output(mlp, tmp_path):
    out = tmp_path / "ext" / "o.onnx"
    out.parent.mkdir()
    (out.parent / "o.onnx.data").write_bytes(b"stale bytes that must not be appended to" * 100)
    assert run_cli("compress", mlp, "-o", out, "--ratio", 0.5, "--external-data", "--quiet") == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(str(out))
    expected = sum(t.ByteSize() for t in model.graph.initializer)  # loaded tensors
    assert (out.parent / "o.onnx.data").stat().st_size < expected + 4096 * len(model.graph.initializer)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]


def test_python_dash_m_entry_point(mlp):
    result = subprocess.run([sys.executable, "-m", "onnx_fwlr", "inspect", str(mlp)], capture_output=True, text=True)
    assert result.returncode == 0 and "fc1" in result.stdout


def test_stats_memory_groups_calibration_and_rejects_a_bad_size(mlp, tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    assert run_cli("compress", mlp, "-o", out, "--ratio", 0.5, "--method", "whiten", "--calib", calib,
                   "--stats-memory", "1KB", "--json", report_path, "--quiet") == 0
    assert json.loads(report_path.read_text())["calibration"]["passes"] == 2  # fc1's input, then fc2's
    assert "read the data 2 times" in capsys.readouterr().out
    expect_error(capsys, "compress", mlp, "-o", tmp_path / "o2.onnx", "--ratio", 0.5, "--method", "whiten",
                 "--calib", calib, "--stats-memory", "lots", mentions="--stats-memory 'lots' is not a size")
    assert not (tmp_path / "o2.onnx").exists()
