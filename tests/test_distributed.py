"""Calibration shards and per-site decompositions on Ray (pipeline/distributed.py): the same bytes as one
process, a killed worker retried, and one-sentence failures. The Ray tests start a real local cluster (two
CPUs, in this process); they skip only when `ray` is not installed (pip install "onnx_fwlr[ray]")."""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from onnx_fwlr.cli.main import main
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.pipeline import compress as pipeline
from onnx_fwlr.pipeline import decompose, distributed
from onnx_fwlr.pipeline.distributed import Executor
from onnx_fwlr.stats.store import Statistics

SAMPLES = Path(__file__).parents[1] / "sample_models"
MODEL, CALIB = SAMPLES / "digits_mlp.onnx", SAMPLES / "digits_calib.npz"
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason='ray is not installed (pip install "onnx_fwlr[ray]")')


def compressed_bytes(method="whiten", **options) -> bytes:
    model, report = pipeline.compress(str(MODEL), ratio=0.5, method=method, calibration=str(CALIB), progress=False,
                                      **options)
    assert report.factorised >= 1
    return model.SerializeToString()


def same_sums(a: Statistics, b: Statistics) -> bool:
    return all(a.activations[k].keys() == b.activations[k].keys()
               and all(np.array_equal(a.activations[k][f], b.activations[k][f]) for f in a.activations[k])
               for k in a.activations) and a.activations.keys() == b.activations.keys()


# --- no cluster needed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("executor, words", [
    (Executor("spark"), "'spark' is unknown"),
    (Executor("local", "host:1"), "names a Ray cluster"),
    (Executor("local", None, 0), "`shards` 0 is out of range"),
    (Executor("local", shared_dir="/tmp"), "`ray_shared_dir` is a folder for a Ray cluster's tasks"),
    (Executor("ray", shared_dir=str(CALIB)), "is not a folder on this machine"),
])
def test_executor_checked_in_one_sentence(executor, words):
    with pytest.raises(FwlrError, match=words):
        executor.check()


def test_a_named_spill_file_travels_as_its_path_and_says_when_it_is_not_there(tmp_path):
    """What a Ray group task receives of the recorded pass: the path and size, reopened read-only on first read;
    on a node without the file, one sentence naming the shared folder."""
    import pickle

    from onnx_fwlr.io.spill import SpillFile

    spill = SpillFile(path=tmp_path / "pass")
    offset = spill.append(np.arange(6, dtype=np.float32).reshape(2, 3))
    spill.close()
    copy = pickle.loads(pickle.dumps(spill))
    assert np.array_equal(copy.read(offset, np.float32, (2, 3)), np.arange(6, dtype=np.float32).reshape(2, 3))
    elsewhere = pickle.loads(pickle.dumps(spill))
    (tmp_path / "pass").unlink()
    with pytest.raises(FwlrError, match="cannot be read here .*`ray_shared_dir`"):
        elsewhere.read(offset, np.float32, (2, 3))
    with pytest.raises(TypeError, match="anonymous"):
        pickle.dumps(SpillFile())


def test_an_adopted_spill_file_loses_its_name_and_stays_readable(tmp_path):
    """What a Ray driver does with a group task's spilled factors: the file's name goes at once (nothing left
    to clean up), its bytes stay readable through the object, which now refuses to travel."""
    import pickle

    from onnx_fwlr.io.spill import SpillFile

    written = SpillFile(path=tmp_path / "factors")
    offset = written.append(np.arange(12, dtype=np.float32).reshape(3, 4))
    written.close()
    received = pickle.loads(pickle.dumps(written))
    received.adopt()
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(received.read(offset, np.float32, (2, 4)), np.arange(8, dtype=np.float32).reshape(2, 4))
    with pytest.raises(TypeError, match="anonymous"):
        pickle.dumps(received)


def test_an_object_handed_over_through_a_file_comes_back_equal(tmp_path):
    """What a Ray group task hands back through a file (io.spill.hand_over): the same arrays bit for bit, in
    their order (C, Fortran, a transposed view), shared ones still shared, writable; the file's name gone once
    taken; the part that travels on its own small."""
    import pickle

    from onnx_fwlr.io.spill import hand_over, take_over

    rng = np.random.default_rng(0)
    big, shared = rng.standard_normal((300, 70)), rng.standard_normal(5)
    sent = {"c": big, "f": np.asfortranarray(big), "t": big.T, "shared": [shared, shared],
            "i8": np.arange(3, dtype=np.int8), "empty": np.zeros((0, 4)), "scalar": np.float32(1.5)}
    handed = hand_over(sent, str(tmp_path / "result"))
    assert len(pickle.dumps(handed)) < 2_000 < big.nbytes
    got = take_over(handed)
    assert list(tmp_path.iterdir()) == []
    for key in ("c", "f", "t", "i8", "empty"):
        assert np.array_equal(got[key], sent[key]) and got[key].dtype == sent[key].dtype
    assert got["f"].flags.f_contiguous and got["t"].flags.f_contiguous and got["scalar"] == np.float32(1.5)
    assert got["shared"][0] is got["shared"][1]
    got["c"][0, 0] = 7.0  # writable, as the local run's arrays are
    assert got["c"][0, 0] == 7.0


def test_local_shards_are_the_sum_of_calibrate_shard_files_merged_in_order(tmp_path):
    for i in range(3):
        assert main(["calibrate", str(MODEL), "--calib", str(CALIB), "--shard", f"{i}/3", "--quiet",
                     "-o", str(tmp_path / f"part{i}.npz")]) == 0
    assert main(["merge-stats", *(str(tmp_path / f"part{i}.npz") for i in range(3)),
                 "-o", str(tmp_path / "merged.npz")]) == 0
    assert main(["calibrate", str(MODEL), "--calib", str(CALIB), "--calib-shards", "3", "--quiet",
                 "-o", str(tmp_path / "sharded.npz")]) == 0
    merged, sharded = Statistics.load(tmp_path / "merged.npz"), Statistics.load(tmp_path / "sharded.npz")
    assert same_sums(merged, sharded)
    assert sharded.meta["samples"] == merged.meta["samples"] == 512 and sharded.meta["shards"] == 3


def test_more_shards_than_batches_fails_in_one_sentence():
    with pytest.raises(FwlrError, match="`shards` 3 is more than the 2 batch"):
        pipeline.calibrate(str(MODEL), str(CALIB), batch_size=256, executor=Executor(shards=3), progress=False)


def test_ray_missing_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["compress", str(MODEL), "-o", str(tmp_path / "out.onnx"), "--calib", str(CALIB), "--executor", "ray",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and 'pip install "onnx_fwlr[ray]"' in err


def test_cli_start_up_does_not_import_ray():
    check = ("import sys\nfrom onnx_fwlr.cli.main import main\ntry:\n    main(['compress', '--help'])\n"
             "except SystemExit:\n    pass\nprint('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout
    assert out.strip().endswith("False")


# --- a real local cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():  # module-wide: the cluster's processes are gone before the rest of the suite runs
    import ray

    environment, on_sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 << 20)
    yield ray
    ray.shutdown()
    os.environ.clear()  # ray.init sets RAY_AUTH_MODE, PYTHONBREAKPOINT, ... and a SIGTERM handler: the rest of
    os.environ.update(environment)  # the suite (and its child processes) runs as it would without this module
    signal.signal(signal.SIGTERM, on_sigterm)


@needs_ray
def test_unreachable_address_fails_before_any_work(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens at
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out.onnx"
    code = main(["compress", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--ratio", "0.5", "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}", "--quiet"])  # a valid budget: the address is what fails
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"no Ray cluster answers at '127.0.0.1:{port}'" in err
    assert not out.exists()


def _stale_ray_folder() -> Path:
    """A Ray temporary folder (RAY_TMPDIR) whose `ray start` record names a cluster that is gone: what a bare
    ray.init() waited ten minutes for on the development machine. Short: Ray's socket paths must stay short."""
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (folder / "ray").mkdir()
    (folder / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    return folder


def _cli(arguments, timeout, **env):
    """`onnx-fwlr ARGS` in a child process (its own Ray state), stopped after `timeout` s: a hang fails the test."""
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled", **env}
    return subprocess.run([sys.executable, "-m", "onnx_fwlr", *arguments], capture_output=True, text=True,
                          timeout=timeout, env=environment)


DIGITS_RAY = ["compress", str(MODEL), "--calib", str(CALIB), "--ratio", "0.5", "--quiet", "--executor", "ray"]


@needs_ray
def test_auto_address_recorded_by_a_gone_cluster_fails_in_one_sentence(tmp_path):
    folder = _stale_ray_folder()
    try:
        port = (folder / "ray" / "ray_current_cluster").read_text().rpartition(":")[2]
        done = _cli([*DIGITS_RAY, "--ray-address", "auto", "-o", str(tmp_path / "out.onnx")], 120,
                    RAY_TMPDIR=str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.count("\n") == 0, err
    assert "no Ray cluster answers at '" in err  # Ray's lookup names this machine by its address, not 127.0.0.1
    assert f":{port}' (the address `ray start` last recorded on this machine: Connection refused)" in err
    assert not (tmp_path / "out.onnx").exists()


@needs_ray
def test_ray_address_from_the_environment_is_used_and_checked(tmp_path):
    """No --ray-address: RAY_ADDRESS (what `ray job submit` sets for its entrypoint) names the cluster."""
    port = _free_port()
    done = _cli([*DIGITS_RAY, "-o", str(tmp_path / "out.onnx")], 120, RAY_ADDRESS=f"127.0.0.1:{port}")
    err = done.stderr.strip()
    assert done.returncode == 2 and err.count("\n") == 0, err
    assert f"no Ray cluster answers at '127.0.0.1:{port}'" in err and "came from RAY_ADDRESS" in err
    assert not (tmp_path / "out.onnx").exists()


@needs_ray
def test_a_server_that_is_not_a_ray_cluster_fails_within_the_answer_timeout(tmp_path):
    """Something listens at the address but never answers as Ray (ray.init alone would wait without end)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        run = ("import sys\nfrom onnx_fwlr.pipeline import distributed\ndistributed.ANSWER_TIMEOUT = 5\n"
               "from onnx_fwlr.cli.main import main\nsys.exit(main(sys.argv[1:]))")
        done = subprocess.run([sys.executable, "-c", run, *DIGITS_RAY, "--ray-address", address, "-o",
                               str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    err = done.stderr.strip()
    assert done.returncode == 2 and err.count("\n") == 0, err
    assert f"the server at '{address}' did not answer as a Ray cluster within 5 s" in err
    assert not (tmp_path / "out.onnx").exists()


@needs_ray
@pytest.mark.slow
def test_no_address_starts_a_local_cluster_and_gives_the_local_bytes(tmp_path):
    """Without --ray-address the run starts its own cluster, even where a gone cluster's record would send a bare
    ray.init() to wait for it."""
    folder = _stale_ray_folder()
    try:
        on_ray = _cli([*DIGITS_RAY, "-o", str(tmp_path / "ray.onnx")], 300, RAY_TMPDIR=str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert on_ray.returncode == 0, on_ray.stderr
    local = _cli([*DIGITS_RAY[:-2], "-o", str(tmp_path / "local.onnx")], 300)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()


@needs_ray
def test_ray_compress_is_byte_identical_to_one_process(ray_cluster):
    local = compressed_bytes()
    assert compressed_bytes(executor=Executor("ray")) == local  # one shard: today's single pass
    assert compressed_bytes(executor=Executor("ray", shards=2)) == compressed_bytes(executor=Executor(shards=2))


@needs_ray
def test_ray_gradient_statistics_match_local_shards(ray_cluster):
    ray_stats = pipeline.calibrate(str(MODEL), str(CALIB), fisher=True, executor=Executor("ray", shards=2),
                                   progress=False, loss="ce")
    local_stats = pipeline.calibrate(str(MODEL), str(CALIB), fisher=True, executor=Executor(shards=2),
                                     progress=False, loss="ce")
    assert same_sums(ray_stats, local_stats) and ray_stats.gradients.keys() == local_stats.gradients.keys()
    for weight, sums in local_stats.gradients.items():
        assert all(np.array_equal(sums[f], ray_stats.gradients[weight][f]) for f in sums)
    assert compressed_bytes("kfac", executor=Executor("ray", shards=2), fisher_options={"loss": "ce"}) == \
        compressed_bytes("kfac", executor=Executor(shards=2), fisher_options={"loss": "ce"})


@needs_ray
def test_ray_sweep_gives_the_rows_of_local_shards(ray_cluster, tmp_path):
    from onnx_fwlr.workflows.sweep import sweep

    def rows(executor, folder):
        return sweep(str(MODEL), str(CALIB), str(SAMPLES / "digits_test.npz"), ratios=[0.5, 0.3], methods=["whiten"],
                     out_dir=tmp_path / folder, progress=False, executor=executor).rows

    on_ray = rows(Executor("ray", shards=2), "ray")
    assert on_ray == rows(Executor(shards=2), "local") and len(on_ray) == 3


def _dying_once(fn, marker: Path):
    """fn, except that the first call anywhere kills its own process (SIGKILL, as an OOM killer would)."""
    def run(job):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return fn(job)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return run


@needs_ray
def test_killed_workers_are_retried_and_the_output_is_unchanged(ray_cluster, tmp_path, monkeypatch):
    expected = compressed_bytes(executor=Executor(shards=2))
    shard_marker, site_marker = tmp_path / "shard_killed", tmp_path / "site_killed"
    monkeypatch.setattr(distributed, "measure_shard", _dying_once(distributed.measure_shard, shard_marker))
    monkeypatch.setattr(decompose, "decompose_one", _dying_once(decompose.decompose_one, site_marker))
    assert compressed_bytes(executor=Executor("ray", shards=2)) == expected
    assert shard_marker.exists() and site_marker.exists()  # a worker of each kind really died


DECODER, DECODER_CALIB = SAMPLES / "decoder" / "decoder.onnx", SAMPLES / "decoder" / "calib.npz"


def _decoder_options(**more):
    return dict(ratio=0.8, method="kfac", calibration=str(DECODER_CALIB), stats_memory=1 << 20, progress=False,
                **more)


def _passes(tmp_path) -> list[str]:
    return [p.name for p in Path(tmp_path).iterdir() if p.name.startswith("onnx-fwlr-pass-")]


def _group_files(tmp_path) -> list[str]:
    return [p.name for p in Path(tmp_path).iterdir() if p.name.startswith("onnx-fwlr-factors-")]


@needs_ray
@pytest.mark.parametrize("spill, recorded, allocation", [(False, True, "global"), (True, True, "global"),
                                                        (False, False, "global"), (True, True, "uniform")],
                         ids=["recorded-kept", "recorded-spilled", "pass-per-group", "recorded-handed-over"])
def test_ray_per_group_units_give_the_local_grouped_model(ray_cluster, monkeypatch, tmp_path, spill, recorded,
                                                          allocation):
    """Statistics that do not fit `stats_memory` together: on Ray one task records the Fisher pass in the shared
    folder and each group task folds its group's sums from it and decomposes the group (fold_unit); without a
    recording (recurrent sites) each group task runs its own pass (group_unit). Only decompositions and small
    sums come back; the bytes equal the local run's (one pass set aside and folded per group), decompositions
    kept in memory or spilled (by the group tasks, each into a file this process adopts), or, with ranks known
    before the decompositions (uniform allocation) on a large model, handed back whole through a file each; the
    recording is removed at the end."""
    from onnx_fwlr.io import spill as spill_module
    from onnx_fwlr.io.spill import SpillFile
    from onnx_fwlr.pipeline.distributed import RayGroupStatistics

    if spill:  # in this process, which decides for both runs whether decompositions are spilled
        monkeypatch.setattr(decompose, "SPILL_BYTES", 0)
    adopted, adopt = [], SpillFile.adopt
    monkeypatch.setattr(SpillFile, "adopt", lambda self: (adopted.append(self.path), adopt(self))[1])
    taken, take_over = [], spill_module.take_over
    monkeypatch.setattr(spill_module, "take_over", lambda handed: (taken.append(handed.path), take_over(handed))[1])
    local, local_report = pipeline.compress(str(DECODER), **_decoder_options(allocation=allocation))
    assert local_report.calibration["groups"] > 2 and local_report.calibration["passes"] == 1
    made = []
    original = distributed.ray_grouped_statistics

    def kept(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(distributed, "ray_grouped_statistics", kept)
    if not recorded:  # what a model with recurrent sites does
        monkeypatch.setattr(RayGroupStatistics, "record", lambda self, executor: None)
    shared = None if spill else str(tmp_path)  # None: this machine's temporary folder, tasks on this node
    on_ray, report = pipeline.compress(str(DECODER), executor=Executor("ray", shared_dir=shared),
                                       **_decoder_options(allocation=allocation))
    assert isinstance(made[0], RayGroupStatistics) and not made[0].sums.activations.get("gram")
    assert all("gram" not in sums for sums in made[0].sums.activations.values())  # no Gram reached the driver
    assert all("grad_gram" not in sums for sums in made[0].sums.gradients.values())
    assert report.calibration["groups"] == local_report.calibration["groups"]
    assert report.calibration["passes"] == (1 if recorded else report.calibration["groups"])
    assert on_ray.SerializeToString() == local.SerializeToString()
    groups = report.calibration["groups"]
    assert (len(adopted), len(taken)) == {(True, "global"): (groups, 0), (True, "uniform"): (0, groups)}.get(
        (spill, allocation), (0, 0))  # one file per group task
    assert all(Path(path).parent == Path(tempfile.gettempdir()) and not Path(path).exists()
               for path in adopted + taken)
    made[0].close()
    assert _passes(tmp_path) == [] and (made[0].path is None) == (not recorded)
    assert made[0].path is None or (Path(made[0].path).parent == Path(shared or tempfile.gettempdir())
                                    and not Path(made[0].path).exists())


@needs_ray
def test_recorded_pass_survives_killed_workers_and_is_removed(ray_cluster, monkeypatch, tmp_path):
    """The recording task and the first group task each kill their own worker: the recording is written again
    from the start (the file is emptied), the group folded again from it; the bytes are unchanged, and the
    recording is gone afterwards. A group task's own error removes it too."""
    monkeypatch.setattr(decompose, "SPILL_BYTES", 0)  # each group task spills its factors into the shared folder
    expected, _ = pipeline.compress(str(DECODER), **_decoder_options())
    record_marker, fold_marker = tmp_path / "record_killed", tmp_path / "fold_killed"
    shared = tmp_path / "shared"
    shared.mkdir()

    def part_written(job):  # what a killed attempt leaves behind: the retry starts the file afresh
        Path(job.path).write_bytes(b"partial" * 100_000)
        return distributed.record_unit(job)

    def part_folded(job):
        Path(job.result_file).write_bytes(b"partial" * 100_000)
        return distributed.fold_unit(job)

    monkeypatch.setattr(distributed, "record_unit", _dying_once(part_written, record_marker))
    monkeypatch.setattr(distributed, "fold_unit", _dying_once(part_folded, fold_marker))
    on_ray, report = pipeline.compress(str(DECODER), executor=Executor("ray", shared_dir=str(shared)),
                                       **_decoder_options())
    assert on_ray.SerializeToString() == expected.SerializeToString() and report.calibration["passes"] == 1
    assert record_marker.exists() and fold_marker.exists()  # a worker of each kind really died
    del on_ray, report
    import gc

    gc.collect()
    assert _passes(shared) == [] and _group_files(shared) == []

    def failing(job):  # the first group spills and comes back; the second writes part of its file and fails
        if job.sites[0].weight != first_group[0]:
            Path(job.result_file).write_bytes(b"partial" * 100_000)
            raise FwlrError("a group failed.")
        return distributed.fold_unit(job)

    first_group = []
    original = distributed.RayGroupStatistics.decompose_groups

    def noting_first_group(self, *args, **kwargs):
        first_group.append(self.groups[0][0].weight)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(distributed.RayGroupStatistics, "decompose_groups", noting_first_group)
    monkeypatch.setattr(distributed, "fold_unit", failing)
    with pytest.raises(FwlrError, match="a group failed"):
        pipeline.compress(str(DECODER), executor=Executor("ray", shared_dir=str(shared)), **_decoder_options())
    assert _passes(shared) == [] and _group_files(shared) == []


@needs_ray
def test_ray_refuses_workers_and_structured_methods(ray_cluster):
    with pytest.raises(FwlrError, match="cluster's CPUs decide"):
        compressed_bytes(executor=Executor("ray"), workers=2)
    with pytest.raises(FwlrError, match="plain low-rank"):
        pipeline.compress(str(MODEL), ratio=0.5, method="kron", calibration=str(CALIB), progress=False,
                          executor=Executor("ray"))


def test_structured_methods_refuse_shards():
    with pytest.raises(FwlrError, match="plain low-rank"):
        pipeline.compress(str(MODEL), ratio=0.5, method="kron", calibration=str(CALIB), progress=False,
                          executor=Executor(shards=2))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


WAIT_FOR_NODES = """
import sys, time, ray
for _ in range(120):
    try:
        ray.init(address=sys.argv[1], log_to_driver=False, logging_level="error")
        break
    except ConnectionError:
        time.sleep(1)
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    time.sleep(0.5)
"""


@needs_ray
@pytest.mark.slow
def test_two_node_cluster_compresses_the_sample_model_end_to_end(tmp_path):
    """`ray start --head` and a second `ray start --address` node, as on two machines; the CLI connects to it."""
    address = f"127.0.0.1:{_free_port()}"
    # a throwaway cluster on this machine: no token to share, and its files (sessions, the address `ray start`
    # records for a bare ray.init()) in a folder of its own, removed afterwards, never in the shared /tmp/ray
    ray_folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay short
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_folder)
    ray_cli = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus", "1", "--object-store-memory", str(100 << 20), "--disable-usage-stats", "--block"]
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = [subprocess.Popen([ray_cli, "start", "--head", "--port", address.split(":")[1],
                               "--include-dashboard=false", *common], **quiet)]
    try:
        nodes.append(subprocess.Popen([ray_cli, "start", "--address", address, *common], **quiet))
        subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, address], timeout=180, check=True, **quiet)
        arguments = [sys.executable, "-m", "onnx_fwlr", "compress", str(MODEL), "--calib", str(CALIB), "--method",
                     "whiten", "--ratio", "0.5", "--calib-shards", "2", "--quiet"]
        on_cluster = subprocess.run([*arguments, "-o", str(tmp_path / "ray.onnx"), "--executor", "ray",
                                     "--ray-address", address], env=env, capture_output=True, text=True, timeout=300)
        assert on_cluster.returncode == 0, on_cluster.stderr
        local = subprocess.run([*arguments, "-o", str(tmp_path / "local.onnx")], capture_output=True, text=True)
        assert local.returncode == 0, local.stderr
        assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "local.onnx").read_bytes()
        # the decoder's per-group units: the recorded pass in a folder both nodes share, then without one
        shared = tmp_path / "shared"
        shared.mkdir()
        grouped = [sys.executable, "-m", "onnx_fwlr", "compress", str(DECODER), "--calib", str(DECODER_CALIB),
                   "--method", "kfac", "--ratio", "0.8", "--stats-memory", "1MB"]
        runs = {}
        for name, extra in (("shared", ["--ray-shared-dir", str(shared)]), ("here", [])):
            runs[name] = subprocess.run([*grouped, "-o", str(tmp_path / f"{name}.onnx"), "--executor", "ray",
                                         "--ray-address", address, *extra], env=env, capture_output=True, text=True,
                                        timeout=300)
            assert runs[name].returncode == 0, runs[name].stderr
        local = subprocess.run([*grouped, "-o", str(tmp_path / "grouped.onnx"), "--quiet"], capture_output=True,
                               text=True)
        assert local.returncode == 0, local.stderr
        expected = (tmp_path / "grouped.onnx").read_bytes()
        assert (tmp_path / "shared.onnx").read_bytes() == (tmp_path / "here.onnx").read_bytes() == expected
        assert "--ray-shared-dir" not in runs["shared"].stdout + runs["shared"].stderr and not any(shared.iterdir())
        printed = runs["here"].stdout + runs["here"].stderr
        assert "ran on this machine's node, not on the cluster's 2 nodes; give --ray-shared-dir" in printed
    finally:  # --block: each `ray start` stops the processes it started when it is terminated
        for process in reversed(nodes):
            process.terminate()
        for process in nodes:
            process.wait(timeout=60)
        shutil.rmtree(ray_folder, ignore_errors=True)
