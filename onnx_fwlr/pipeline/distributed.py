"""The independent units of work (one site's decomposition, one calibration shard) on a Ray cluster.

Ray (PyPI `ray`, the optional extra `onnx_fwlr[ray]`) is imported only when `executor` "ray" is chosen; the
local process pool (pipeline/decompose.py) stays the default and needs nothing more. Every unit is a plain
module-level function and a picklable job; results come back and are used in job order, so the output bytes
do not depend on where, or in what order, the work ran. A task whose worker process dies is run again
(MAX_RETRIES times): the same function on the same job gives the same result.

Calibration shards are io.data's interleaved shards (shard i of n: batches i, i+n, ...), each measured in its
own ONNX Runtime session and added up in shard order. Floating-point sums depend on that order, so the
statistics depend on the shard count, never on the executor: `shards` n measured locally, one shard after
the other, gives the same bytes as on a cluster.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from onnx_fwlr.errors import FwlrError

KINDS = ("local", "ray")
MAX_RETRIES = 3  # runs of a task after its worker process died, before the run fails
CONNECT_TIMEOUT = 5.0  # seconds to wait for a cluster's address to accept a connection before any work
ANSWER_TIMEOUT = 60.0  # seconds for a Ray driver in a child process to connect to the cluster and leave again
INSTALL = 'pip install "onnx_fwlr[ray]"'


@dataclass(frozen=True)
class Executor:
    """Where the work runs: `kind` "local" (this machine's process pool, `workers`) or "ray" (a Ray cluster at
    `address`: host:port, or "auto" for the one `ray start` began on this machine; None: $RAY_ADDRESS, else a
    fresh cluster on this machine for this run); `shards`: calibration shards; `shared_dir`: a folder every node
    of the cluster mounts at the same path, where a recorded Fisher pass is written for the group tasks to fold
    (None: this machine's temporary folder, and the group tasks run on this machine's node)."""

    kind: str = "local"
    address: str | None = None
    shards: int = 1
    shared_dir: str | None = None

    def check(self) -> None:
        if self.kind not in KINDS:
            raise FwlrError(f"`executor` '{self.kind}' is unknown; choose local or ray.")
        if self.address is not None and self.kind != "ray":
            raise FwlrError("`ray_address` names a Ray cluster; add `executor` ray, or drop the address.")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise FwlrError(f"`shards` {self.shards} is out of range; give 1 or more calibration shards.")
        if self.shared_dir is not None:
            self._check_shared_dir()

    def _check_shared_dir(self) -> None:
        folder = self.shared_dir
        if self.kind != "ray":
            raise FwlrError("`ray_shared_dir` is a folder for a Ray cluster's tasks; add `executor` ray, or drop it.")
        if not os.path.isdir(folder):
            raise FwlrError(f"`ray_shared_dir` '{folder}' is not a folder on this machine; give a folder that every "
                            "node of the cluster, this one included, mounts at the same path.")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FwlrError(f"`ray_shared_dir` '{folder}' is not writable here; give a folder the run may write to.")

    @property
    def sharded(self) -> bool:
        """Whether calibration is measured shard by shard (and reduced in shard order)."""
        return self.kind == "ray" or self.shards > 1


LOCAL = Executor()


def ready_executor(executor: Executor | None, workers: int = 1) -> Executor | None:
    """The executor checked and, for Ray, connected: a missing Ray or an unreachable cluster fails here,
    before any work."""
    if executor is None:
        return None
    executor.check()
    if executor.kind == "ray":
        if workers != 1:
            raise FwlrError("`workers` sizes the local process pool; with `executor` ray the cluster's CPUs decide, "
                            "so drop it.")
        connect(executor)
    return executor


def ray_module():
    """The `ray` module, or one sentence naming the extra that installs it (checked with the options, before the
    budget or any data: pipeline.config.MethodOptions)."""
    try:
        import ray
    except ImportError:
        raise FwlrError(f"`executor` ray needs Ray, which is not installed; install it with {INSTALL}.") from None
    return ray


def connect(executor: Executor):
    """The `ray` module, connected to the executor's cluster (a process already connected keeps its cluster).

    Without an address (and without RAY_ADDRESS, which `ray job submit` sets) a fresh local cluster is started for
    this run: never the one a bare ray.init() would look up, whose address `ray start` left in Ray's temporary
    folder and which may be long gone (ray.init then retries for about ten minutes). With an address, a cluster
    that does not answer fails in one sentence within CONNECT_TIMEOUT (+ ANSWER_TIMEOUT), before any work."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    address = executor.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        try:
            _check_reachable(address)
            _check_answers(address)
        except FwlrError as exc:
            if executor.address is not None:
                raise
            raise FwlrError(f"{str(exc).rstrip('.')}; the address came from RAY_ADDRESS (unset it to start a "
                            "cluster for this run).") from None
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"at '{address}'" if address else "on this machine"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FwlrError(f"could not connect to a Ray cluster {where} ({first}).") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at host:port (ray.init would retry for about ten minutes). "auto" is the
    address `ray start` recorded on this machine (Ray's own lookup), which may be stale."""
    target = _recorded_address() if address == "auto" else address.removeprefix("ray://")
    if target is None:
        raise FwlrError("`ray_address` auto found no Ray cluster started on this machine; start one with `ray start "
                        "--head`, give its HOST:PORT, or drop the address to start one for this run.")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise FwlrError(f"`ray_address` '{address}' is not of the form HOST:PORT (or auto).")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if address == "auto":
            reason = f"the address `ray start` last recorded on this machine: {reason}"
        raise FwlrError(f"no Ray cluster answers at '{target}' ({reason}); start one with `ray start --head`, check "
                        "the address, or drop it to start a cluster for this run.") from None


def _recorded_address() -> str | None:
    """The address a bare ray.init() or "auto" would connect to (RAY_ADDRESS, else what `ray start` last wrote on
    this machine), as Ray itself finds it; None when there is none."""
    from ray._private import services  # Ray's lookup, so that the probe checks what ray.init would use

    try:
        return services.canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError:
        return None


_ANSWER = ("import logging, sys, ray\n"
           "ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR)\n"
           "ray.shutdown()\n")


def _check_answers(address: str) -> None:
    """Something listening at the address need not be a Ray cluster (a dashboard's port, a hung head): ray.init
    would wait for it without end, so a child process tries first and is stopped after ANSWER_TIMEOUT."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _ANSWER, address], capture_output=True, text=True,
                              timeout=ANSWER_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise FwlrError(f"the server at '{address}' did not answer as a Ray cluster within {ANSWER_TIMEOUT:.0f} s; "
                        "check that it is the head's GCS port (`ray start --head` prints it, 6379 by default) and "
                        "that the cluster is up.") from None
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise FwlrError(f"could not connect to a Ray cluster at '{address}' ({reason}).")


_TASKS: dict = {}


def _call(fn: Callable, job):
    return fn(job)


def _task(ray):
    """The one remote function every job runs through (made once per process)."""
    if "call" not in _TASKS:
        _TASKS["call"] = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_call)
    return _TASKS["call"]


def ray_map(fn: Callable, jobs: Iterable, executor: Executor, window: int | None = None,
            options: dict | None = None) -> Iterator:
    """fn(job) for every job, as Ray tasks, yielded in job order. Jobs are made as they are submitted and at
    most `window` (default twice the cluster's CPUs) are submitted and not yet handed back: memory stays
    bounded, and the driver holds one result at a time. `options`: Ray's task options (where tasks may run)."""
    ray = connect(executor)
    task = _task(ray)
    if options:
        task = task.options(**options)
    if window is None:
        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    jobs = iter(jobs)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < window:
                job = next(jobs, _END)
                if job is _END:
                    exhausted = True
                else:
                    pending.append(task.remote(fn, job))
            if not pending:
                return
            yield _result(ray, pending.popleft())
    finally:  # an error, Ctrl-C or a caller that stopped early: the cluster stops the rest
        for ref in pending:
            ray.cancel(ref, force=True)
        _settle(ray, pending)


def _settle(ray, refs) -> None:
    """Read the outcome of tasks that already ended (failed ones too), so that Ray does not report their errors
    as unhandled on stderr after the run's own sentence; tasks still running are not waited for."""
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # an outcome nobody needs: the run has already failed or stopped
            pass


_END = object()


def _result(ray, ref):
    """The task's result; the library's own errors come back as themselves, a worker that kept dying as one
    sentence."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, FwlrError):
            raise FwlrError(str(exc.cause)) from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as exc:
        raise FwlrError(f"a Ray task failed {MAX_RETRIES + 1} times ({type(exc).__name__}): its worker or node kept "
                        "dying; check the cluster's memory and logs.") from None


# --- calibration shards --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassData:
    """What a pass over the calibration data on a worker reads: the model (a path every node can read, or the
    ModelProto itself), the data (a path every node can read), how it is batched, and the Fisher options."""

    model: object
    calibration: object
    batch_size: int = 32
    shapes: dict | None = None
    mask_input: str | None = None
    fisher_options: dict | None = None

    def open(self, shard: tuple[int, int] | None = None):
        """(the model, its batches: all of them, or shard (i, n)'s)."""
        from onnx_fwlr.io.data import open_data
        from onnx_fwlr.io.model import load_model

        model = load_model(self.model, copy=False)
        return model, open_data(self.calibration, model, batch_size=self.batch_size, shapes=self.shapes, shard=shard)


@dataclass(frozen=True)
class ShardJob:
    """One calibration shard (i, n): the sums of its batches for every site."""

    data: PassData
    sites: list
    shard: tuple[int, int]
    gradients: bool


def measure_shard(job: ShardJob):
    """One shard's statistics (sums), measured in this process's own ONNX Runtime session."""
    from onnx_fwlr.stats.activations import collect_activation_stats

    model, batches = job.data.open(job.shard)
    if job.gradients:
        from onnx_fwlr.stats.fisher import collect_fisher_stats

        return collect_fisher_stats(model, job.sites, batches, mask_input=job.data.mask_input, progress=False,
                                    **(job.data.fisher_options or {}))
    return collect_activation_stats(model, job.sites, batches, mask_input=job.data.mask_input, progress=False,
                                    memory_limit=2**62)  # the caller checked the sums fit (check_one_pass)


def sharded_statistics(source, model, sites, calibration, executor: Executor, *, gradients: bool,
                       batch_size: int = 32, shapes=None, mask_input=None, fisher_options=None, memory_limit=None):
    """The statistics of `executor.shards` shards, measured where the executor says and added up in shard
    order. `source`: what each shard loads the model from (a path on a cluster); `model`: the loaded one."""
    from onnx_fwlr.stats.store import Statistics

    check_one_pass(model, sites, gradients, memory_limit, fisher_options)
    count = executor.shards
    _check_shard_count(calibration, model, batch_size, shapes, count)
    source, calibration = _absolute(source), _absolute(calibration)  # a worker's directory is not ours
    data = PassData(source, calibration, batch_size, shapes, mask_input, fisher_options)
    jobs = (ShardJob(data, sites, (i, count), gradients) for i in range(count))
    start = time.perf_counter()
    results = ray_map(measure_shard, jobs, executor) if executor.kind == "ray" else map(measure_shard, jobs)
    total = None
    for stats in results:  # one shard's sums at a time, in shard order: the same bytes wherever they ran
        if total is None:  # a fresh, writable copy (Ray hands back read-only arrays), with nothing counted yet
            total = Statistics(stats.fingerprint, meta={**stats.meta, "samples": 0, "batches": 0})
        total.merge(stats)
    total.meta.update(seconds=time.perf_counter() - start, shards=count, executor=executor.kind)
    return total


def _check_shard_count(calibration, model, batch_size, shapes, count: int) -> None:
    """Every shard needs a batch (an empty one is an error of its own): say so before any work."""
    from onnx_fwlr.io.data import open_data

    total = getattr(open_data(calibration, model, batch_size=batch_size, shapes=shapes), "total", None)
    if total is not None and count > total:
        raise FwlrError(f"`shards` {count} is more than the {total} batch(es) of the calibration data; give at most "
                        f"{total} (or a smaller `batch_size`).")


def _absolute(source):
    """An existing file or folder as an absolute path; anything else (a ModelProto, "random") as it is."""
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        return os.path.abspath(source)
    return source


def check_one_pass(model, sites, gradients: bool, memory_limit, fisher_options) -> None:
    """Shards measure every site in one pass (statistics measured group by group cannot be added up): say so
    when they would not fit `stats_memory`."""
    from onnx_fwlr.stats.activations import activation_plan, default_memory_limit, gram_bytes

    limit = default_memory_limit() if memory_limit is None else memory_limit
    if gradients:
        from onnx_fwlr.stats.fisher import fisher_stats_bytes

        sketch = {k: v for k, v in (fisher_options or {}).items() if k in ("sketch_min_dim", "sketch_rank")}
        need = fisher_stats_bytes(sites, **sketch)
    else:
        need = gram_bytes(activation_plan(model, sites))
    if need > limit:
        raise FwlrError(f"calibration shards measure every site in one pass, and these statistics take "
                        f"{need / 2**30:.1f} GiB, over `stats_memory` ({limit / 2**30:.1f} GiB); raise it, or "
                        "calibrate with `executor` local and one shard.")


# --- per-group units: a group's statistics and its decompositions in one task -----------------------------
#
# With one recorded pass (the default): one task runs the Fisher pass over every site and sets it aside in a
# named file (stats.fisher.PassRecording), and each group task folds its group's sums from that file and
# decomposes the group: the local grouped run's functions on the same arrays in the same order, so its bytes,
# with one pass in all. Models with recurrent sites (which the recording does not hold) run a pass per group.


@dataclass(frozen=True)
class RecordJob:
    """The one Fisher pass over every site, set aside at `path` (emptied first: a task run again starts afresh)."""

    data: PassData
    sites: list
    path: str


def record_unit(job: RecordJob):
    """(the recording, closed and ready to be reopened by path; the pass's metadata)."""
    from onnx_fwlr.stats.fisher import PassRecording, collect_fisher_stats

    model, batches = job.data.open()
    recording = PassRecording(job.path)
    try:
        measured = collect_fisher_stats(model, job.sites, batches, mask_input=job.data.mask_input, progress=False,
                                        recording=recording, description="calibrate (fisher), one pass recorded",
                                        **(job.data.fisher_options or {}))
    finally:
        recording.file.close()
    return recording, measured.meta


@dataclass(frozen=True)
class FoldJob:
    """One group of sites folded from the recorded pass, then decomposed. `model`: where the weights are read;
    `fingerprint`: the model's (stats.store.model_fingerprint hashes every weight: 4.4 GB at 1.1 B, done once
    on the driver rather than in every task)."""

    model: object
    fingerprint: str
    recording: object
    sites: list
    site_methods: dict
    result_file: str | None = None  # see group_result
    spill: bool = False


def fold_unit(job: FoldJob):
    """(the group's small sums, its sites' decompositions, in site order), with no ONNX Runtime session: the
    group's sums come from the recording, the weights from the model's file."""
    from onnx_fwlr.io.model import load_model
    from onnx_fwlr.stats.store import Statistics

    model = load_model(job.model, copy=False)
    return group_result(model, job, job.recording.fold(job.sites, Statistics(job.fingerprint)))


def group_result(model, job, stats):
    """(the group's small sums, its sites' decompositions) as they travel back to the driver. Without
    `job.result_file`: whole decompositions with their scalings, through Ray's object store. With it, on a
    large model: `job.spill` — each decomposition spilled into that file as the local run spills a large
    model's (pipeline.decompose.SpilledDecomposition: float32 factors), which the driver then adopts, so only
    spectra travel; else (ranks known before the decompositions: whole ones, cut by the driver, where a cut at
    the rank in the task would not give the local bytes) the result's arrays written to that file as they are
    (io.spill.hand_over) and only the rest through the store. Through the object store, the 1.1 B model's
    float64 factors and Cholesky scalings filled Ray's store and then the disk it spilled to (OutOfDiskError)."""
    from onnx_fwlr.io.spill import SpillFile, hand_over
    from onnx_fwlr.pipeline.decompose import decompose_with_stats
    from onnx_fwlr.pipeline.prepare import WEIGHTING
    from onnx_fwlr.stats.fisher import small_sums

    if job.spill:
        spill = SpillFile(path=job.result_file)
        try:
            decompositions = decompose_with_stats(model, job.sites, job.site_methods, stats, WEIGHTING, spill=spill)
        finally:
            spill.close()  # what was written is visible to the driver, on any node (NFS: close-to-open)
        return small_sums(stats), decompositions
    result = (small_sums(stats), decompose_with_stats(model, job.sites, job.site_methods, stats, WEIGHTING))
    return result if job.result_file is None else hand_over(result, job.result_file)


@dataclass(frozen=True)
class GroupJob:
    """One group of sites for one task: a Fisher pass over all the calibration data in the session of every site
    (`all_sites`: ONNX Runtime's forward values depend on which tensors a session exposes, so only that session
    gives one local pass's numbers) folding the group's sums only, then the group's exact decompositions."""

    data: PassData
    all_sites: list
    sites: list
    site_methods: dict
    result_file: str | None = None  # see group_result
    spill: bool = False


def group_unit(job: GroupJob):
    """(the group's small sums, its sites' decompositions, in site order): the Grams never leave the task."""
    from onnx_fwlr.stats.fisher import collect_fisher_stats

    model, batches = job.data.open()
    stats = collect_fisher_stats(model, job.all_sites, batches, mask_input=job.data.mask_input, progress=False,
                                 fold_sites=job.sites, **(job.data.fisher_options or {}))
    return group_result(model, job, stats)


class RayGroupStatistics:
    """Gradient statistics measured group by group on a Ray cluster, where each group's sites are decomposed
    too (fold_unit, or group_unit without a recording): this process keeps the plan and, as each group comes
    back, its small sums (means, counts, Fisher diagonals) for bias correction and the report, never a Gram;
    the decompositions arrive one group at a time, kept exactly as the local run's would be: on a large model
    (pipeline.decompose.spill_needed) each group task spills its factors into a file of its own beside the
    recording, and this process adopts the file (opens it and removes its name), or, when ranks are known
    before the decompositions, hands them back whole through such a file (group_result); on small models whole,
    with their Cholesky scalings, through Ray's object store. They come from `decompose_groups`
    (pipeline.decompose.iter_decompositions asks for them). The recording's file, and any group's not yet
    adopted, are removed when these statistics go (`close`, or at exit) and when a group task fails."""

    def __init__(self, model, sites, groups, data: PassData):
        from onnx_fwlr.stats.fisher import reachable_uses
        from onnx_fwlr.stats.store import Statistics, activation_key, model_fingerprint

        self.sums = Statistics(model_fingerprint(model))
        self.all_sites, self.groups, self.data = list(sites), groups, data
        self.group_of = {site.weight: g for g, group in enumerate(groups) for site in group}
        reachable = reachable_uses(model, sites)
        self._with_gradients = {site.weight for site, _ in reachable}
        self._with_activations = {activation_key(use) for _, use in reachable}
        self.meta = {"passes": 0, "groups": len(groups), "executor": "ray", "samples": 0, "batches": 0}
        self.later_seconds = 0.0
        self.warnings: list[str] = []
        self.recording = None
        self.path = None  # the recorded pass's file
        self.placement = None  # Ray's task options for the recording's readers: its node, without a shared folder
        self._files: set[str] = set()  # the recording's and group tasks' files not yet removed or adopted
        self._remove = weakref.finalize(self, _remove_files, self._files)  # also at exit, and after a failure

    def record(self, executor: Executor) -> None:
        """Run the one recorded pass as a task, into `executor.shared_dir` (every node reads it there) or else this
        machine's temporary folder (the pass and every group task then run on this machine's node)."""
        ray = connect(executor)
        folder = os.path.abspath(executor.shared_dir) if executor.shared_dir else tempfile.gettempdir()
        self.path = path = os.path.join(folder, f"onnx-fwlr-pass-{uuid.uuid4().hex}")
        self._files.add(path)
        if executor.shared_dir is None:
            self.placement = this_node(ray)
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            if nodes > 1:
                self.warnings.append(f"the recorded Fisher pass is in this machine's temporary folder, so it and all "
                                     f"{len(self.groups)} group tasks ran on this machine's node, not on the cluster's "
                                     f"{nodes} nodes; give `ray_shared_dir` (a folder every node mounts) to spread "
                                     "them.")
        try:
            recording, meta = next(ray_map(record_unit, [RecordJob(self.data, self.all_sites, path)], executor,
                                           options=self.placement))
        except BaseException:
            self.close()
            raise
        self.recording = recording
        self.meta.update({**meta, "passes": 1, "groups": len(self.groups), "executor": "ray",
                          "set_aside_bytes": recording.file.size})

    def close(self) -> None:
        """Remove the recorded pass's file and any group's not yet adopted (nothing to do when they are gone)."""
        _remove_files(self._files)

    def decompose_groups(self, sites, site_methods: dict, executor: Executor, ranks: dict | None = None):
        """(site, decomposition) for `sites` in their order, one task per group that holds any of them. `ranks`
        (weight -> rank or None, as iter_decompositions has them): on a large model, when only whole spectra are
        asked for (what is kept for later budgets) the tasks spill the factors as the local run would, and
        otherwise hand the decompositions back through a file."""
        from onnx_fwlr.io.spill import HandedOver, take_over
        from onnx_fwlr.pipeline.decompose import spill_needed

        wanted = {site.weight for site in sites}
        indices = sorted({self.group_of[w] for w in wanted})
        chosen = {g: [s for s in self.groups[g] if s.weight in wanted] for g in indices}
        methods = {g: {s.weight: site_methods[s.weight] for s in chosen[g]} for g in indices}
        folder = self._group_folder(executor)
        large = folder is not None and spill_needed(self.all_sites)
        spill = large and not any((ranks or {}).values())
        paths = {g: self._group_file(folder, g) if large else None for g in indices}
        if self.recording is not None:
            fingerprint = self.sums.fingerprint
            fn, jobs = fold_unit, (FoldJob(self.data.model, fingerprint, self.recording, chosen[g], methods[g],
                                           paths[g], spill) for g in indices)
        else:
            fn, jobs = group_unit, (GroupJob(self.data, self.all_sites, chosen[g], methods[g], paths[g], spill)
                                    for g in indices)
        try:
            for g, result in zip(indices, ray_map(fn, jobs, executor, options=self.placement)):
                if isinstance(result, HandedOver):
                    result = take_over(result)
                sums, decompositions = result
                self._add(sums)
                if spill:
                    self._adopt(decompositions)
                self._files.discard(paths[g])
                yield from zip(chosen[g], decompositions)
        except BaseException:
            self.close()
            raise

    def _group_folder(self, executor: Executor) -> str | None:
        """Where group tasks spill factors: the shared folder, or this machine's temporary folder when the tasks
        run on this node (the recording's readers); None (Ray's object store) when tasks may run on any node
        and there is no shared folder."""
        if executor.shared_dir:
            return os.path.abspath(executor.shared_dir)
        return tempfile.gettempdir() if self.placement is not None else None

    def _group_file(self, folder: str, group: int) -> str:
        path = os.path.join(folder, f"onnx-fwlr-factors-{group}-{uuid.uuid4().hex}")
        self._files.add(path)
        return path

    @staticmethod
    def _adopt(decompositions) -> None:
        """Make the group's spill file this process's own (one SpillFile object, shared by the group's
        decompositions as they were pickled together)."""
        spills = {id(dec.spill): dec.spill for dec in decompositions}
        for spill in spills.values():
            spill.adopt()

    def _add(self, sums) -> None:
        import numpy as np

        for table, theirs in ((self.sums.activations, sums.activations), (self.sums.gradients, sums.gradients)):
            for key, arrays in theirs.items():
                table[key] = {name: np.array(value) for name, value in arrays.items()}  # Ray's are read-only
        if self.recording is not None:
            return  # the pass's metadata came with the recording
        self.meta["passes"] += 1
        for key in ("loss", "fisher_output", "mask_input", "seed_tensor", "smoke_test", "data", "fisher_samples"):
            if key in sums.meta:
                self.meta[key] = sums.meta[key]
        if self.meta["passes"] == 1:
            self.meta.update(samples=sums.meta.get("samples", 0), batches=sums.meta.get("batches", 0))

    # what the pipeline reads besides decompositions
    def has_activations(self, site) -> bool:
        from onnx_fwlr.stats.store import activation_key

        return all(activation_key(u) in self._with_activations for u in site.uses)

    def has_gradients(self, site) -> bool:
        return site.weight in self._with_gradients

    def require(self, sites, needs, method) -> None:
        pass  # the plan above found the reachable sites; a group's own pass checks its data

    def mean_input(self, site):
        return self.sums.mean_input(site)

    def mean_abs_input(self, site):
        return self.sums.mean_abs_input(site)

    def fisher_row(self, site):
        return self.sums.fisher_row(site)

    def save(self, path) -> None:
        raise FwlrError("gradient statistics measured group by group on Ray stay on the cluster and cannot be "
                        "saved; calibrate with `executor` local to save them.")


def this_node(ray) -> dict:
    """Ray's task options that keep a task on the node this process runs on."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def _remove_files(paths: set) -> None:
    for path in list(paths):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        paths.discard(path)


def ray_grouped_statistics(source, model, sites, calibration, executor: Executor, groups, *, batch_size=32,
                           shapes=None, mask_input=None, fisher_options=None) -> RayGroupStatistics:
    """Per-group units on the cluster: the one recorded pass is run now (the group tasks fold it when
    decompositions are asked for); with recurrent sites, which a recording does not hold, nothing is measured
    until then, and each group task runs its own pass."""
    from onnx_fwlr.autodiff.recurrent_vjp import GATES
    from onnx_fwlr.stats.fisher import reachable_uses

    data = PassData(_absolute(source), _absolute(calibration), batch_size, shapes, mask_input,
                    dict(fisher_options or {}))
    stats = RayGroupStatistics(model, sites, groups, data)
    if not any(use.op_type in GATES for _, use in reachable_uses(model, sites)):
        stats.record(executor)
    return stats
