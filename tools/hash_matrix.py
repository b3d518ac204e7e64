"""Hash the outputs of a fixed matrix of `onnx-fwlr` commands, to prove a refactoring changes no bytes.

Runs every command as `python -m onnx_fwlr ...` with cwd and PYTHONPATH set to the checkout this script sits
in, single-threaded BLAS, fixed seeds; hashes each output file (JSON reports and stdout with timings,
versions and paths removed) and writes {command: {file: sha256}}.

    python tools/hash_matrix.py --out before.json                 # on the old code
    python tools/hash_matrix.py --out after.json --compare before.json   # exit 1 if anything differs

Rows named `api_*` call the Python API (`onnx_fwlr.compress`, then `onnx_fwlr.save_model` and the report as
JSON) in a child process of this script and must give the same bytes as their CLI twin (API_TWINS). Rows with
`fake timer` run with ONNX Runtime's timer, the profiler and the whole-model check replaced by fixed numbers
(the tests' fake, written here), so `--target-latency` is deterministic; their tables go to a cache folder in
the work dir, never to the user's. The `local-ray` row runs `--executor ray` on a small Ray cluster the
child starts itself (about 10 s) and must give the same bytes as its one-process twin (MUST_MATCH).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

DIGITS, CALIB, TEST = "sample_models/digits_mlp.onnx", "sample_models/digits_calib.npz", "sample_models/digits_test.npz"
DECODER, DECODER_CALIB = "sample_models/decoder/decoder.onnx", "sample_models/decoder/calib.npz"
VOLATILE_KEYS = {"timings", "versions", "seconds", "step_seconds"}  # wall times and library versions
# The options a compress report records since issue 24 ("config": a dict; sweep rows' "config" is a label and stays):
# a record of the input, not an output; left out so hashes from before it compare (tests/test_run.py checks that a
# saved config replays the same bytes).
RECORD_KEYS = {"config"}
TIME_PATTERN = re.compile(r"\d+(\.\d+)?\s?(s|ms)\b")  # "0.1 s", "12 ms" in text output
MUST_MATCH = [  # pairs that must give the same bytes within one run
    ("digits_fwsvd_global_workers1", "digits_fwsvd_global_workers2", ("out.onnx", "report.json")),
    ("digits_kfac_global", "digits_kfac_from_stats", ("out.onnx", "report.json")),  # --stats = --calib
    # the Ray executor's model = one process's; its report adds the executor and the shards' absolute data path
    ("digits_kfac_global", "digits_kfac_global_ray", ("out.onnx",)),
]
API_TWINS = {  # Python API row -> the CLI row it must equal (out.onnx and report.json; see ONNX_ONLY)
    "api_digits_whiten_uniform": "digits_whiten_uniform",
    "api_digits_kfac_global": "digits_kfac_global",
    "api_digits_quantize_int4": "digits_quantize_int4",
    "api_digits_quantize_int8": "digits_quantize_int8",
    "api_digits_quantize_auto": "digits_quantize_auto",
    "api_int8_input_ratio": "int8_input_ratio",
    "api_int8_input_quantize_int8": "int8_input_quantize_int8",
    "api_digits_target_latency_fake": "digits_target_latency_fake",
    "api_digits_quantize_auto_latency_fake": "digits_quantize_auto_latency_fake",
    "api_digits_kron": "digits_kron",
    "api_digits_kfac_global_sequential": "digits_kfac_global_sequential",
    "api_digits_whiten_target_size": "digits_whiten_target_size",
    "api_digits_kfac_global_refine20": "digits_kfac_global_refine20",
    "api_lstm_whiten": "lstm_whiten",
    "api_bert_kfac_global": "bert_kfac_global",
    "api_digits_quantize_int4_level4": "digits_quantize_int4_level4",
    "api_digits_kron_balanced": "digits_kron_balanced",
    "api_bert_quantize_int4_merged": "bert_quantize_int4_merged",
    "api_digits_whiten_val_batch_axis": "digits_whiten_val_batch_axis",
}
ONNX_ONLY = {  # with validation data the CLI's report adds ONNX Runtime's baselines (ort_baselines): model only
    "api_digits_kfac_global_refine20", "api_lstm_whiten", "api_bert_kfac_global", "api_digits_whiten_val_batch_axis"}


# ------------------------------------------------------------------------------------------ inputs
def write_lstm(work: Path):
    """The tests' small LSTM model and its data (tests/builders.write_lstm), built in a child run from tests/."""
    code = "import sys; from pathlib import Path; from builders import write_lstm; write_lstm(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(work)], check=True, cwd=ROOT / "tests", capture_output=True)


def write_transformer(work: Path):
    """tools/synthetic_transformer.py at hidden 64, 2 layers; token batches from its make_token_batch."""
    tool = ROOT / "tools" / "synthetic_transformer.py"
    subprocess.run([sys.executable, str(tool), "--hidden", "64", "--layers", "2", "--ffn", "128", "--vocab", "500",
                    "--max-len", "32", "-o", str(work / "bert.onnx")], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("synthetic_transformer", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, n, seed in (("bert_calib", 64, 1), ("bert_val", 32, 2)):
        np.savez(work / f"{name}.npz", **module.make_token_batch(n, 16, 500, seed=seed))


def write_int8_digits(work: Path):
    """The digits MLP after ONNX Runtime's quantize_dynamic (int8 weights per tensor), as a user brings it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(ROOT / DIGITS), str(work / "digits_int8.onnx"), weight_type=QuantType.QInt8)


# ------------------------------------------------------------------------------------------ matrix
def compress(model, *extra, data=CALIB):
    return ["compress", model, "-o", "{out}/out.onnx", "--calib", data, "--seed", "0", "--force", "--quiet",
            "--json", "{out}/report.json", *extra]


def matrix():
    """(name, arguments) in run order; {work} is the work dir, {out} the command's own folder."""
    entries = []
    for method in ("svd", "asvd", "whiten", "fwsvd", "kfac"):
        for allocation in ("uniform", "global"):  # global needs gradients: svd/asvd/whiten exit 2 (recorded)
            entries.append((f"digits_{method}_{allocation}",
                            compress(DIGITS, "--method", method, "--allocation", allocation, "--ratio", "0.3")))
    kfac_global = ("--method", "kfac", "--allocation", "global", "--ratio", "0.3")
    lstm, bert = "{work}/lstm.onnx", "{work}/bert.onnx"
    bert_data = ("--val", "{work}/bert_val.npz")
    entries += [
        ("digits_kfac_global_sequential", compress(DIGITS, *kfac_global, "--sequential")),
        ("digits_kfac_global_refine20", compress(DIGITS, *kfac_global, "--refine", "20", "--val", TEST)),
        ("digits_kron", compress(DIGITS, "--method", "kron", "--ratio", "0.3")),
        ("digits_kron_global_invalid", compress(DIGITS, "--method", "kron", "--allocation", "global",
                                                "--ratio", "0.3")),
        ("digits_whiten_dope", compress(DIGITS, "--method", "whiten", "--dope", "0.01", "--ratio", "0.3")),
        ("digits_methods_whiten_kron", compress(DIGITS, "--methods", "whiten,kron", "--ratio", "0.3")),
        ("digits_whiten_external_data", compress(DIGITS, "--method", "whiten", "--ratio", "0.3", "--external-data")),
        # the sample decoder written with external data (io.model.save_model's data file and structure copy)
        ("decoder_kfac_external_data", compress(DECODER, "--ratio", "0.8", "--external-data", data=DECODER_CALIB)),
        ("decoder_quantize_auto_external_data", compress(DECODER, "--quantize", "auto", "--ratio", "0.5",
                                                         "--external-data", data=DECODER_CALIB)),
        ("digits_fwsvd_global_workers1", compress(DIGITS, "--method", "fwsvd", "--allocation", "global",
                                                  "--ratio", "0.3", "--workers", "1")),
        ("digits_fwsvd_global_workers2", compress(DIGITS, "--method", "fwsvd", "--allocation", "global",
                                                  "--ratio", "0.3", "--workers", "2")),
        ("digits_whiten_target_size", compress(DIGITS, "--method", "whiten", "--target-size", "150000")),
        ("digits_asvd_rank", compress(DIGITS, "--method", "asvd", "--rank", "24", "--rank", "fc2/MatMul=40")),
        ("digits_whiten_val", compress(DIGITS, "--method", "whiten", "--ratio", "0.3", "--val", TEST)),
        ("lstm_whiten", compress(lstm, "--method", "whiten", "--ratio", "0.5", "--val", "{work}/lstm_val.npz",
                                 data="{work}/lstm_calib.npz")),
        ("bert_kfac_global", compress(bert, "--method", "kfac", "--allocation", "global", "--ratio", "0.4",
                                      *bert_data, data="{work}/bert_calib.npz")),
        ("bert_whiten_uniform", compress(bert, "--method", "whiten", "--ratio", "0.4", *bert_data,
                                         data="{work}/bert_calib.npz")),
        ("bert_whiten_keep_attention", compress(bert, "--method", "whiten", "--ratio", "0.4", "--keep-attention",
                                                *bert_data, data="{work}/bert_calib.npz")),
        ("inspect_digits", ["inspect", DIGITS]),
        ("inspect_bert", ["inspect", bert, "--json", "{out}/inspect.json"]),
        ("calibrate_digits", ["calibrate", DIGITS, "--calib", CALIB, "--fisher", "--seed", "0", "-o",
                              "{out}/stats.npz", "--force", "--quiet"]),
        ("calibrate_shard0", ["calibrate", DIGITS, "--calib", CALIB, "--fisher", "--shard", "0/2", "-o",
                              "{out}/stats.npz", "--force", "--quiet"]),
        ("calibrate_shard1", ["calibrate", DIGITS, "--calib", CALIB, "--fisher", "--shard", "1/2", "-o",
                              "{out}/stats.npz", "--force", "--quiet"]),
        ("merge_stats", ["merge-stats", "{work}/calibrate_shard0/stats.npz", "{work}/calibrate_shard1/stats.npz",
                         "-o", "{out}/stats.npz", "--force"]),
        ("digits_kfac_from_stats", ["compress", DIGITS, "-o", "{out}/out.onnx", "--stats",
                                    "{work}/calibrate_digits/stats.npz", "--method", "kfac", "--allocation", "global",
                                    "--ratio", "0.3", "--force", "--quiet", "--json", "{out}/report.json"]),
        ("validate_digits", ["validate", DIGITS, "{work}/digits_whiten_uniform/out.onnx", "--data", TEST,
                             "--quiet", "--json", "{out}/validate.json"]),
        ("validate_bert", ["validate", bert, "{work}/bert_whiten_uniform/out.onnx", "--data", "{work}/bert_val.npz",
                           "--quiet"]),
        ("refine_digits", ["refine", DIGITS, "{work}/digits_whiten_uniform/out.onnx", "--calib", CALIB,
                           "--val", TEST, "--steps", "10", "--seed", "0", "-o", "{out}/out.onnx", "--force",
                           "--quiet", "--json", "{out}/refine.json"]),
        ("sweep_digits", ["sweep", DIGITS, "--calib", CALIB, "--val", TEST, "--ratios", "0.2,0.4",
                          "--methods", "svd,whiten,kfac", "--allocations", "uniform,global", "-o", "{out}/sweep",
                          "--no-plots", "--quiet"]),
    ]
    return entries + quantize_matrix() + flag_matrix() + api_matrix()


CHILD_KINDS = ("api", "fake-timer", "local-ray")
INT8_INPUT = "{work}/digits_int8.onnx"
LATENCY_CACHE = "{work}/latency_cache"  # the fake timer's tables: never the user's cache
FAKE_TARGET = ("--target-latency", "0.7", "--latency-cache", LATENCY_CACHE)
FAKE_QUANT_TARGET = ("--quantize", "auto", "--target-latency", "0.8", "--latency-cache", LATENCY_CACHE)


def quantize_matrix():
    """--quantize int4/int8/auto, an int8 input, --target-latency (fake timer) and activation-only --stats."""
    return [
        ("digits_quantize_int4", compress(DIGITS, "--quantize", "int4", "--rank", "4")),
        ("digits_quantize_int8", compress(DIGITS, "--quantize", "int8", "--rank", "4")),
        ("digits_quantize_auto", compress(DIGITS, "--quantize", "auto", "--ratio", "0.5")),
        # --no-latency-check: the output timed against a quantized input is a measurement (not hashable); the
        # API's latency_check is off by default, so the twins run the same
        ("int8_input_ratio", compress(INT8_INPUT, "--ratio", "0.5", "--no-latency-check")),
        ("int8_input_quantize_int8", compress(INT8_INPUT, "--quantize", "int8", "--rank", "4", "--no-latency-check")),
        ("digits_target_latency_fake", ["fake-timer", *compress(DIGITS, "--method", "kfac", *FAKE_TARGET)]),
        ("digits_quantize_auto_latency_fake", ["fake-timer", *compress(DIGITS, *FAKE_QUANT_TARGET)]),
        ("calibrate_digits_activations", ["calibrate", DIGITS, "--calib", CALIB, "-o", "{out}/stats.npz",
                                          "--force", "--quiet"]),
        ("activation_stats_ratio", ["compress", DIGITS, "-o", "{out}/out.onnx", "--stats",
                                    "{work}/calibrate_digits_activations/stats.npz", "--ratio", "0.5", "--force",
                                    "--quiet", "--json", "{out}/report.json"]),
        ("activation_stats_quantize_int8", ["compress", DIGITS, "-o", "{out}/out.onnx", "--stats",
                                            "{work}/calibrate_digits_activations/stats.npz", "--quantize", "int8",
                                            "--rank", "4", "--force", "--quiet", "--json", "{out}/report.json"]),
    ]


def flag_matrix():
    """The flags of the executor, accuracy-level, batch-axis, Kronecker-shape and merged-correction work."""
    bert_calib = "{work}/bert_calib.npz"
    return [
        # Ray started here (ray.init(address="local"), 2 CPUs, a small object store) before the CLI connects;
        # must equal digits_kfac_global (MUST_MATCH)
        ("digits_kfac_global_ray", ["local-ray", *compress(DIGITS, "--method", "kfac", "--allocation", "global",
                                                           "--ratio", "0.3", "--executor", "ray")]),
        ("digits_quantize_int4_level4", compress(DIGITS, "--quantize", "int4", "--rank", "4",
                                                 "--accuracy-level", "4")),
        ("digits_whiten_val_batch_axis", compress(DIGITS, "--method", "whiten", "--ratio", "0.3", "--val", TEST,
                                                  "--batch-axis", "logits:0")),
        ("validate_lstm_batch_axis", ["validate", "{work}/lstm.onnx", "{work}/lstm_whiten/out.onnx", "--data",
                                      "{work}/lstm_val.npz", "--batch-axis", "logits:0", "--quiet",
                                      "--json", "{out}/validate.json"]),
        ("digits_kron_balanced", compress(DIGITS, "--method", "kron", "--ratio", "0.3", "--kron-shape", "balanced")),
        ("bert_quantize_int4_merged", compress("{work}/bert.onnx", "--quantize", "int4", "--rank", "4",
                                               "--merge-corrections", data=bert_calib)),
    ]


def api(model, fake_timer=False, **options):
    """A Python API row: onnx_fwlr.compress(model, **options) in a child process (see api_child)."""
    spec = {"model": model, "options": {"calibration": CALIB, "progress": False, **options},
            "fake_timer": fake_timer}
    return ["api", json.dumps(spec)]


def api_matrix():
    """The Python API beside its CLI twin (API_TWINS)."""
    return [
        ("api_digits_whiten_uniform", api(DIGITS, method="whiten", allocation="uniform", ratio=0.3)),
        ("api_digits_kfac_global", api(DIGITS, method="kfac", allocation="global", ratio=0.3)),
        ("api_digits_quantize_int4", api(DIGITS, quantize="int4", rank=4)),
        ("api_digits_quantize_int8", api(DIGITS, quantize="int8", rank=4)),
        ("api_digits_quantize_auto", api(DIGITS, quantize="auto", ratio=0.5)),
        ("api_int8_input_ratio", api(INT8_INPUT, ratio=0.5)),
        ("api_int8_input_quantize_int8", api(INT8_INPUT, quantize="int8", rank=4)),
        ("api_digits_target_latency_fake", api(DIGITS, fake_timer=True, method="kfac", target_latency=0.7)),
        ("api_digits_quantize_auto_latency_fake", api(DIGITS, fake_timer=True, quantize="auto",
                                                      target_latency=0.8)),
        ("api_digits_kron", api(DIGITS, method="kron", ratio=0.3)),
        ("api_digits_kfac_global_sequential", api(DIGITS, method="kfac", allocation="global", ratio=0.3,
                                                  sequential=True)),
        ("api_digits_whiten_target_size", api(DIGITS, method="whiten", target_size=150000)),
        ("api_digits_kfac_global_refine20", api(DIGITS, method="kfac", allocation="global", ratio=0.3,
                                                refine_steps=20, validation=TEST)),
        ("api_lstm_whiten", api("{work}/lstm.onnx", method="whiten", ratio=0.5, validation="{work}/lstm_val.npz",
                                calibration="{work}/lstm_calib.npz")),
        ("api_bert_kfac_global", api("{work}/bert.onnx", method="kfac", allocation="global", ratio=0.4,
                                     validation="{work}/bert_val.npz", calibration="{work}/bert_calib.npz")),
        ("api_digits_quantize_int4_level4", api(DIGITS, quantize="int4", rank=4, accuracy_level=4)),
        ("api_digits_whiten_val_batch_axis", api(DIGITS, method="whiten", ratio=0.3, validation=TEST,
                                                 batch_axes={"logits": 0})),
        ("api_digits_kron_balanced", api(DIGITS, method="kron", ratio=0.3, kron_shape="balanced")),
        ("api_bert_quantize_int4_merged", api("{work}/bert.onnx", quantize="int4", rank=4, merge_corrections=True,
                                              calibration="{work}/bert_calib.npz")),
    ]


# ------------------------------------------------------------------------------------------ child processes
def fake_form_timer(K, N, rank, tokens, form="fp32"):
    """ms = FLOPs / 1e6 for fp32; int8 forms 0.57x and int4 forms 1.06x the dense op (the 2-core CPU's shape),
    a correction or pair at its FLOPs."""
    dense = 2 * tokens * K * N / 1e6
    flops = 0.0 if rank is None else 2 * tokens * rank * (K + N) / 1e6
    if form in ("fp32", "int8"):
        scale = 1.0 if form == "fp32" else 0.57
        return scale * (dense if rank is None else flops)
    return (1.06 if form.startswith("int4") else 0.57) * dense + flops


def install_fake_timer():
    """The latency model's timer, profiler share and whole-model check replaced by fixed numbers (test hook)."""
    import onnx_fwlr

    moved = (Path(onnx_fwlr.__file__).parent / "cost" / "latency.py").exists()  # in this checkout, not another
    package = "cost" if moved else "evaluate"  # the latency module's package before issue 24's move
    module = importlib.import_module(f"onnx_fwlr.{package}.latency")
    module.OrtTimer.__call__ = lambda self, K, N, rank, tokens, form="fp32": fake_form_timer(K, N, rank, tokens, form)
    module.MeasuredLatency.site_share = lambda self, model, nodes, feed, runs=5: 0.9
    module.MeasuredLatency.model_ratio = lambda self, a, b, feed, runs=20: {
        "pairs": 20, "ratio_p50": 0.8, "ratio_p10": 0.78, "ratio_p90": 0.83}
    return module


def cli_child(argv: list[str]) -> int:
    """`onnx-fwlr ARGV` in this process, with the fake timer."""
    install_fake_timer()
    from onnx_fwlr.cli.main import main as cli_main

    return cli_main(argv)


def local_ray_child(argv: list[str]) -> int:
    """`onnx-fwlr ARGV` in this process, on a Ray cluster this process starts as tests/test_distributed.py does
    (2 CPUs, a 200 MB object store), which the CLI then keeps, so the row does not depend on what the machine's
    Ray state holds (a bare `ray.init()` once followed a stale `/tmp/ray/ray_current_cluster` for 10 minutes;
    `--executor ray` without an address now starts a fresh local cluster: docs/distributed.md)."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 << 20, logging_level=logging.ERROR)
    try:
        from onnx_fwlr.cli.main import main as cli_main

        return cli_main(argv)
    finally:
        ray.shutdown()


def api_child(spec: dict, out: Path, work: Path) -> int:
    """onnx_fwlr.compress(model, **options); writes out.onnx and report.json as `onnx-fwlr compress` does."""
    import onnx_fwlr

    options = dict(spec["options"])
    if spec["fake_timer"]:
        options["latency"] = install_fake_timer().MeasuredLatency(cache_dir=str(work / "latency_cache"))
    model = spec["model"]
    compressed, report = onnx_fwlr.compress(model, **options)
    onnx_fwlr.save_model(compressed, out / "out.onnx")
    report.file_size_before, report.file_size_after = file_bytes(Path(model)), file_bytes(out / "out.onnx")
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=plain) + "\n")
    return 0


def file_bytes(path: Path) -> int:
    """A model file plus its .data file."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def plain(value):
    return value.item() if isinstance(value, np.generic) else value.tolist()


# ------------------------------------------------------------------------------------------ hashing
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scrub_text(text: str, work: Path) -> str:
    """Paths of the work dir and the checkout replaced, wall times removed."""
    text = text.replace(str(work), "<work>").replace(str(ROOT), "<root>")
    return TIME_PATTERN.sub("<time>", text)


def scrub_json(value, work: Path):
    if isinstance(value, dict):
        return {k: scrub_json(v, work) for k, v in value.items()
                if k not in VOLATILE_KEYS and not (k in RECORD_KEYS and isinstance(v, dict))}
    if isinstance(value, list):
        return [scrub_json(v, work) for v in value]
    if isinstance(value, str):
        return value.replace(str(work), "<work>").replace(str(ROOT), "<root>")
    return value


def hash_outputs(out: Path, work: Path) -> dict:
    hashes = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".json":
            data = json.dumps(scrub_json(json.loads(data), work), sort_keys=True).encode()
        hashes[str(path.relative_to(out))] = sha(data)
    return hashes


def run_entry(name, args, work: Path, env) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # no stale files from an earlier --workdir run
    out.mkdir(parents=True)
    argv = [a.replace("{work}", str(work)).replace("{out}", str(out)) for a in args]
    if argv[0] in CHILD_KINDS:  # a child of this script: the Python API, the CLI with a fake timer or on Ray
        command = [sys.executable, __file__, "--child", argv[0], str(out), str(work), "--", *argv[1:]]
    else:
        command = [sys.executable, "-m", "onnx_fwlr", *argv]
    proc = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    stdout = scrub_text(proc.stdout, work)
    (work / f"{name}.stdout").write_text(stdout)  # beside, not inside, the hashed folder: for reading diffs
    result = {"exit_code": str(proc.returncode), "stdout": sha(stdout.encode())}
    if proc.returncode != 0:
        result["stderr"] = sha(scrub_text(proc.stderr, work).encode())
    result.update(hash_outputs(out, work))
    return result


def compare(results: dict, other_path: Path) -> bool:
    other = json.loads(other_path.read_text())
    same_all = True
    print(f"\n{'command':<34} {'vs ' + other_path.name}")
    for name in sorted(set(results) | set(other)):
        mine, theirs = results.get(name, {}), other.get(name, {})
        if mine == theirs:
            verdict = "same"
        else:
            same_all = False
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            verdict = "DIFFERENT: " + (", ".join(keys) if mine and theirs else "missing on one side")
        print(f"{name:<34} {verdict}")
    return same_all


def child(argv: list[str]) -> int:
    """`--child KIND OUT WORK -- ARGS...`: one api, fake-timer or local-ray row (run_entry starts these)."""
    kind, out, work, _, *rest = argv
    if kind == "api":
        return api_child(json.loads(rest[0]), Path(out), Path(work))
    return local_ray_child(rest) if kind == "local-ray" else cli_child(rest)


def main():
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="hashes JSON to write")
    parser.add_argument("--compare", type=Path, help="hashes JSON to compare with; exit 1 if any differ")
    parser.add_argument("--workdir", type=Path, help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--rows", help="regex: only the rows whose name matches (for debugging a row)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="hash_matrix_") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        write_lstm(work)
        write_transformer(work)
        write_int8_digits(work)
        results, start = {}, time.perf_counter()
        print(f"checkout {ROOT}; work dir {work}")
        for name, entry_args in matrix():
            if args.rows and not re.search(args.rows, name):
                continue
            tick = time.perf_counter()
            results[name] = run_entry(name, entry_args, work, env)
            files = len(set(results[name]) - {"exit_code", "stdout", "stderr"})
            print(f"{name:<34} exit {results[name]['exit_code']:>2}  {files:>2} files  "
                  f"{time.perf_counter() - tick:6.1f} s", flush=True)
        print(f"total {time.perf_counter() - start:.1f} s")
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    ok = True
    pairs = MUST_MATCH + [(twin, api_row, ("out.onnx",) if api_row in ONNX_ONLY else ("out.onnx", "report.json"))
                          for api_row, twin in API_TWINS.items()]
    for first, second, files in pairs:
        if first not in results or second not in results:
            continue
        for file in files:
            if results[first].get(file) != results[second].get(file):
                print(f"MISMATCH: {first} and {second} differ in {file}")
                ok = False
    if args.compare is not None:
        ok = compare(results, args.compare) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
