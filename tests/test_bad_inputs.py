"""A catalogue of a newcomer's mistakes and hostile inputs, through the command line in-process: each gives exit
code 2 and exactly one line on stderr (`onnx-fwlr: error: ...`, no traceback), writes nothing, and leaves the
bytes of every file it was given unchanged (issue 28). Every case is refused before the real work, so the
whole table takes a few seconds."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_fwlr.cli.main import main

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "sample_models"
M = "model.onnx"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder of inputs: the digits model and data, a copy with external data, links to the model, broken
    data and statistics, and an existing report."""
    d = tmp_path_factory.mktemp("inputs")
    for source, name in (("digits_mlp.onnx", M), ("digits_calib.npz", "calib.npz"), ("digits_test.npz", "test.npz")):
        shutil.copy(SAMPLES / source, d / name)
    onnx.save(onnx.load(d / "model.onnx"), d / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    os.symlink(d / "model.onnx", d / "link.onnx")
    os.link(d / "model.onnx", d / "hard.onnx")
    test = dict(np.load(d / "test.npz"))
    np.savez(d / "labels.npz", input=test["input"], labels=test["labels"] + 50)
    np.savez(d / "objects.npz", input=np.array([np.zeros(64), np.zeros(3)], dtype=object))
    assert main(["calibrate", str(d / "model.onnx"), "-o", str(d / "stats.npz"), "--calib", str(d / "calib.npz"),
                 "--fisher", "--quiet"]) == 0
    stats = dict(np.load(d / "stats.npz"))
    stats["a2"] = stats["a2"][:3]  # a site input's Gram cut to 3 rows
    np.savez(d / "damaged_stats.npz", **stats)
    (d / "report.json").write_text("{}\n")
    return d


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


COMPRESS = ["compress", M, "-o", "out.onnx", "--ratio", "0.5"]
# (id, argv with paths relative to the inputs folder, words the one line must hold)
CASES = [
    ("json-is-the-model", COMPRESS + ["--json", M], "--json model.onnx is the input model"),
    ("json-is-the-calibration", COMPRESS + ["--calib", "calib.npz", "--json", "calib.npz"], "the --calib data"),
    ("json-is-the-output", COMPRESS + ["--json", "out.onnx"], "is the -o output"),
    ("json-exists", COMPRESS + ["--json", "report.json"], "already exists; pass --force"),
    ("validate-json-is-the-data", ["validate", M, M, "--data", "test.npz", "--json", "test.npz", "--force"],
     "is the --data"),
    ("validate-json-is-the-model", ["validate", M, M, "--data", "test.npz", "--json", M, "--force"],
     "is the original model"),
    ("output-is-the-calibration", COMPRESS + ["--calib", "calib.npz", "-o", "calib.npz", "--force"],
     "-o calib.npz is the --calib data"),
    ("output-is-the-validation", COMPRESS + ["--val", "test.npz", "-o", "test.npz", "--force"], "the --val data"),
    ("output-is-the-external-data", ["compress", "ext.onnx", "-o", "ext.onnx.data", "--ratio", "0.5", "--force"],
     "is the input model"),
    ("output-data-file-is-the-input's", ["compress", "ext.onnx", "-o", "ext.onnx", "--ratio", "0.5", "--force"],
     "is the input model"),
    ("output-is-a-symlink-to-the-model", COMPRESS + ["-o", "link.onnx", "--force"], "is the input model"),
    ("output-is-a-hard-link-to-the-model", COMPRESS + ["-o", "hard.onnx", "--force"], "is the input model"),
    ("calibrate-output-is-its-data", ["calibrate", M, "-o", "calib.npz", "--calib", "calib.npz", "--force"],
     "the --calib data"),
    ("json-is-the-statistics", COMPRESS + ["--stats", "stats.npz", "--json", "stats.npz", "--force"],
     "the --stats file"),
    ("refine-plot-is-the-model", ["refine", M, M, "-o", "out.onnx", "--calib", "calib.npz", "--plot", M],
     "--plot model.onnx is the original model"),
    ("refine-output-is-the-compressed-model", ["refine", M, "hard.onnx", "-o", M, "--calib", "calib.npz", "--force"],
     "is the original model"),
    ("merge-output-is-an-input", ["merge-stats", "stats.npz", "damaged_stats.npz", "-o", "stats.npz", "--force"],
     "is the statistics file"),
    ("profile-test-data-at-a-file", ["profile", M, "--save-test-data", "test.npz"], "is a file; give a folder"),
    ("profile-json-is-the-data", ["profile", M, "--data", "test.npz", "--json", "test.npz", "--force"],
     "is the --data"),
    ("sweep-folder-is-the-model", ["sweep", M, "--val", "test.npz", "-o", M, "--force"], "is the input model"),
    ("sweep-no-workers", ["sweep", M, "--val", "test.npz", "-o", "sweep", "--workers", "0"], "--workers 0"),
    ("sweep-ratio-named-as-typed", ["sweep", M, "--val", "test.npz", "-o", "sweep", "--ratios", "2"],
     "--ratios entry 2 is out of range"),
    ("inspect-json-exists", ["inspect", M, "--json", "report.json"], "already exists"),
    ("unwritable-folder", COMPRESS + ["-o", "/proc/out.onnx"], "cannot be written"),
    ("object-arrays", COMPRESS + ["--calib", "objects.npz"], "dtype object"),
    ("object-arrays-validate", ["validate", M, M, "--data", "objects.npz"], "dtype object"),
    ("damaged-statistics", COMPRESS + ["--stats", "damaged_stats.npz"], "has shape [3, 256], not [256, 256]"),
    ("perplexity-of-a-classifier", COMPRESS + ["--val", "test.npz", "--metric", "perplexity"], "token-id input"),
    ("fisher-output-typo", COMPRESS + ["--calib", "calib.npz", "--fisher-output", "logitz"],
     "--fisher-output 'logitz' is not an output"),
    ("labels-out-of-range", ["validate", M, M, "--data", "labels.npz"], "Labels must lie in [0, 10)"),
    ("refine-steps-named-as-typed", COMPRESS + ["--calib", "calib.npz", "--refine", "-5"], "--refine -5"),
    ("calib-shards-zero", COMPRESS + ["--calib", "calib.npz", "--calib-shards", "0"],
     "--calib-shards 0 is out of range"),
    ("ray-address-without-ray", COMPRESS + ["--calib", "calib.npz", "--ray-address", "127.0.0.1:1"],
     "--ray-address names a Ray cluster; add --executor ray"),
    ("calib-shards-with-quantize", COMPRESS + ["--quantize", "int8", "--calib-shards", "2"],
     "drop them with --quantize"),
    ("calib-shards-with-kron", COMPRESS + ["--calib", "calib.npz", "--method", "kron", "--calib-shards", "2"],
     "spread plain low-rank compression"),
    ("calibrate-shard-and-shards", ["calibrate", M, "-o", "s.npz", "--calib", "calib.npz", "--shard", "0/2",
                                    "--calib-shards", "2"], "drop it to let --executor measure every shard"),
    ("more-shards-than-batches", ["calibrate", M, "-o", "s.npz", "--calib", "calib.npz", "--batch-size", "256",
                                  "--calib-shards", "3"], "--calib-shards 3 is more than the 2 batch(es)"),
    ("user-text-kept-verbatim", ["compress", "in put `ratio` .onnx", "-o", "out.onnx", "--ratio", "0.5"],
     "in put `ratio` .onnx: file not found"),
    ("ratio-below-rank-one", ["compress", M, "-o", "out.onnx", "--ratio", "0.01", "--calib", "calib.npz"],
     "--ratio 0.01 is below what rank 1 on every factorised site keeps (1,098 of 84,480 parameters); give a "
     "--ratio of at least 0.013"),
    ("sweep-ratio-below-rank-one", ["sweep", M, "-o", "swept", "--calib", "calib.npz", "--val", "test.npz",
                                    "--ratios", "0.5,0.01"],
     "--ratios entry 0.01 is below what rank 1 on every factorised site keeps (1,098 of 84,480 parameters); give "
     "ratios of at least 0.013"),
    ("target-size-below-rank-one", ["compress", M, "-o", "out.onnx", "--target-size", "5000"],
     "rank 1 on every factorised site already makes the model about"),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_exit_2_nothing_written_inputs_untouched(argv, words, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    before = _tree(files)
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-fwlr: error: "), captured.err
    assert words in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _tree(files) == before  # no output, no leftover folder, every input's bytes as they were


def test_a_bad_int8_override_is_one_line(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    monkeypatch.setenv("ONNX_FWLR_INT8_SATURATES", "maybe")
    before = _tree(files)
    assert main(["compress", M, "-o", "out.onnx", "--quantize", "int8", "--rank", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "ONNX_FWLR_INT8_SATURATES" in err[0]
    assert _tree(files) == before


def test_json_overwrites_with_force(files, capsys, monkeypatch, tmp_path):
    """--json follows --force like -o: refused without it (above), written with it."""
    shutil.copy(files / M, tmp_path / M)
    (tmp_path / "report.json").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", M, "--json", "report.json", "--force"]) == 0
    assert '"sites"' in (tmp_path / "report.json").read_text()


# ------------------------------------------------------------------------------------------ start-up, Ctrl-C

HEAVY = ("numpy", "onnx", "onnxruntime", "scipy")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["compress", "--help"], ["refine", "--help"]])
def test_help_and_version_answer_without_importing_the_library(argv):
    code = ("import sys\nfrom onnx_fwlr.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_ctrl_c_while_the_library_is_imported_is_one_line(files):
    """KeyboardInterrupt raised by the first import of onnx (where a Ctrl-C in the first second lands)."""
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def interrupting(name, *a, **k):\n"
            "    if name == 'onnx' or name.startswith('onnx.'):\n        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\nbuiltins.__import__ = interrupting\n"
            "from onnx_fwlr.cli.main import main\n"
            f"sys.exit(main(['inspect', {str(files / M)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr == "onnx-fwlr: interrupted\n"


def test_the_cli_offers_the_librarys_choices():
    from onnx_fwlr.cli import choices
    from onnx_fwlr.methods.registry import METHODS
    from onnx_fwlr.pipeline.budget import ALLOCATIONS
    from onnx_fwlr.refine import LOSSES, SCHEDULES

    assert choices.METHODS == tuple(METHODS) and choices.ALLOCATIONS == tuple(ALLOCATIONS)
    assert choices.REFINE_LOSSES == tuple(LOSSES) and choices.SCHEDULES == tuple(SCHEDULES)


# ------------------------------------------------------------------------------------------ ONNX Runtime's logs

def test_the_decoder_calibrates_on_trimmed_batches_without_a_word_from_onnxruntime(tmp_path, capfd):
    decoder = SAMPLES / "decoder"
    assert main(["calibrate", str(decoder / "decoder.onnx"), "-o", str(tmp_path / "s.npz"), "--calib",
                 str(decoder / "calib.npz"), "--fisher", "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "And node" not in err, err


def test_onnxruntime_failures_are_exceptions_not_log_lines(capfd):
    from onnx import helper

    from onnx_fwlr.io.runtime import make_session, silence_onnxruntime

    inputs = [helper.make_tensor_value_info("a", 1, ["n"]), helper.make_tensor_value_info("b", 1, ["m"])]
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"], name="add")], "g", inputs,
                              [helper.make_tensor_value_info("c", 1, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    silence_onnxruntime()
    session = make_session(model)
    with pytest.raises(Exception, match="broadcast"):
        session.run(None, {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)})
    assert "onnxruntime" not in capfd.readouterr().err


def test_the_flag_mapping_leaves_user_text_alone():
    from onnx_fwlr.cli.options import in_flag_terms, user_texts

    message = "input 'in put `ratio`' of a.onnx is unknown; `ratio` is a budget; ONNX Runtime's `ratio` too"
    assert in_flag_terms(message) == ("input 'in put `ratio`' of a.onnx is unknown; --ratio is a budget; ONNX "
                                      "Runtime's --ratio too")
    typed = user_texts(["compress", "x `rank`.onnx"])
    assert in_flag_terms("x `rank`.onnx: not found (`rank`)", None, typed) == "x `rank`.onnx: not found (--rank)"
    typed = user_texts(["compress", "--include=`rank`"])  # the value of --flag=value counts as typed too
    assert in_flag_terms("pattern `rank` matches nothing", None, typed) == "pattern `rank` matches nothing"
