"""Decomposing every site once: the expensive, budget-independent step, optionally in a process pool.

Each job carries only what one decomposition needs: where the weight is (a WeightRef, which a worker
memory-maps itself when the model was loaded lazily), the two scalings, and the rank when a randomised SVD
is used. Results do not depend on the number of workers: every job runs the same function on the same
inputs, and the randomised sketch is seeded from the weight's name, not from the order of work.

Memory: jobs are made only when they are about to run, at most two per worker are in flight, results come
back in site order one at a time (the caller may turn each into factors and drop it), one scaling is shared
by every site that reads the same input and dropped after its last site, and an exact decomposition keeps
only the components a rank that saves parameters can use (alloc.break_even_rank).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.spill import SpillFile
from onnx_fwlr.methods import lowrank
from onnx_fwlr.methods.allocation import break_even_rank
from onnx_fwlr.sites.find import Site, weight_ref


@dataclass(frozen=True)
class Weighting:
    """How a site's two sides are weighted: `left` and `right` map (method, site, stats) to a Scaling or
    None; sites with the same non-None `left_key(method, site)` share one left scaling."""

    left: Callable
    right: Callable
    left_key: Callable


def iter_decompositions(model, sites: list[Site], site_methods: dict[str, str], stats, weighting: Weighting,
                        progress: bool = True, ranks: dict | None = None, svd: str = "exact",
                        workers: int = 1, executor=None) -> Iterator[tuple[Site, lowrank.Decomposition]]:
    """(site, decomposition) for every site, in site order, computed as the iteration asks for them.

    `ranks` (weight name -> rank, None = the whole spectrum) lets `svd` "auto" or "randomized" compute only
    the leading components (lowrank.use_randomized says when). `executor` (pipeline.distributed.Executor)
    of kind "ray" runs the same jobs as Ray tasks instead of `workers` local processes.
    """
    if workers < 1:
        raise FwlrError(f"`workers` {workers} is out of range; give 1 or more worker processes.")
    if executor is not None and executor.kind == "ray" and hasattr(stats, "decompose_groups"):
        # statistics measured per group on the cluster (pipeline.distributed.RayGroupStatistics): each group's
        # pass and its decompositions are one task, so no Gram ever reaches this process
        with tqdm(total=len(sites), desc="decompose (groups on Ray)", unit="site", disable=not progress,
                  leave=False) as bar:
            for site, dec in stats.decompose_groups(sites, site_methods, executor, ranks):
                bar.update()
                yield site, dec
        return
    planner = _JobPlanner(model, sites, site_methods, stats, weighting, ranks or {}, svd)
    bar = tqdm(total=len(sites), desc="decompose", unit="site", disable=not progress, leave=False)
    try:
        if executor is not None and executor.kind == "ray":
            from onnx_fwlr.pipeline.distributed import ray_map

            results = ray_map(decompose_one, (planner.job(i) for i in range(len(sites))), executor)
        elif workers == 1 or len(sites) < 2:
            results = (decompose_one(planner.job(i)) for i in range(len(sites)))
        else:
            results = _in_pool(planner, len(sites), workers)
        for i, dec in enumerate(results):
            dec.left, dec.right = planner.scalings_of(i)  # the parent's objects: shared, and never pickled back
            bar.update()
            yield sites[i], dec
    finally:
        bar.close()


class _JobPlanner:
    """Makes job i when it is needed; holds each shared left scaling until its last site's job is made."""

    def __init__(self, model, sites, site_methods, stats, weighting: Weighting, ranks, svd):
        self.model, self.sites, self.site_methods, self.stats = model, sites, site_methods, stats
        self.weighting, self.ranks, self.svd = weighting, ranks, svd
        self.keys = [self._left_key(site) for site in sites]
        self.remaining = Counter(self.keys)  # jobs still to make per shared scaling
        self.shared: dict = {}
        self.given: dict = {}  # site index -> its scalings, until the result is handed back

    def _left_key(self, site):
        method = self.site_methods[site.weight]
        key = self.weighting.left_key(method, site)
        return (method, key) if key is not None else ("site", site.weight)

    def job(self, i: int):
        site, key = self.sites[i], self.keys[i]
        method = self.site_methods[site.weight]
        with _blas_limit(1):  # the Cholesky factors: cheap next to the SVD, and on one thread the same bytes
            # whatever the load (OpenBLAS's spinning threads made them 3-4x slower on a loaded 2-core machine)
            if key not in self.shared:
                self.shared[key] = self.weighting.left(method, site, self.stats)
            right = self.weighting.right(method, site, self.stats)
        left = self.shared[key]
        self.remaining[key] -= 1
        if not self.remaining[key]:
            del self.shared[key]
        self.given[i] = (left, right)
        rank = self.ranks.get(site.weight)
        randomized = lowrank.use_randomized(site.K, site.N, rank, self.svd)
        return (weight_ref(self.model, site), left, right, rank if randomized else None, _seed(site.weight),
                site.weight)

    def scalings_of(self, i: int):
        return self.given.pop(i)


def decompose_one(job) -> lowrank.Decomposition:
    """One site's decomposition (runs in a worker process too, so it takes and returns plain data; the
    scalings are left off the result, the parent puts its own back)."""
    ref, left, right, rank, seed, name = job
    W = ref.load()
    try:
        with _blas_limit(blas_threads(*W.shape)):
            if rank is None:
                dec = lowrank.weighted_svd(W, left, right)
                dec = dec.keep_components(max(1, break_even_rank(*W.shape)))
            else:
                dec = lowrank.randomized_weighted_svd(W, rank, left, right, seed=seed)
    except FwlrError as exc:  # the maths knows no names: say which weight
        raise FwlrError(f"weight '{name}': {exc}") from None
    dec.left = dec.right = None
    return dec


# BLAS threads per decomposition, measured (docs/defaults.md, tools/bench_blas_threads.py): below this size one
# thread was never slower, and on a loaded machine a second thread made SVDs 5-11x slower (512: 0.33 s -> 1.8 s).
PARALLEL_MIN_DIM = 1024


def blas_threads(K: int, N: int, cores: int | None = None, load: float | None = None) -> int:
    """Threads worth giving one SVD of a K x N matrix: 1 below PARALLEL_MIN_DIM; above, one per 512 of
    min(K, N), but never more than the cores the machine's load average leaves idle."""
    cores = cores if cores is not None else os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average (Windows): assume an idle machine
            load = 0.0
    if min(K, N) < PARALLEL_MIN_DIM:
        return 1
    idle = max(1, int(cores - load))
    return max(1, min(idle, cores, min(K, N) // 512))


@contextlib.contextmanager
def _blas_limit(threads: int):
    """At most `threads` BLAS threads inside (never more than the user or the pool set)."""
    controller = ThreadpoolController()
    current = max((lib.num_threads for lib in controller.select(user_api="blas").lib_controllers), default=1)
    if threads >= current:
        yield
        return
    with controller.limit(limits=threads, user_api="blas"):
        yield


def _in_pool(planner: _JobPlanner, count: int, workers: int) -> Iterator[lowrank.Decomposition]:
    """Results in job order from `workers` spawned processes; at most two jobs per worker are submitted or
    waiting to be handed back, so memory stays bounded."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with BLAS/ORT threads; spawn works everywhere
    with _blas_threads_for_children(max(1, (os.cpu_count() or 1) // workers)):  # workers start on demand
        pool = ProcessPoolExecutor(max_workers=min(workers, count), mp_context=context)
        try:
            futures = {}
            next_job = 0
            for i in range(count):
                while next_job < count and next_job - i < 2 * workers:
                    job = planner.job(next_job)
                    with _children_ignore_interrupt():  # workers start inside submit
                        futures[next_job] = pool.submit(decompose_one, job)
                    next_job += 1
                yield futures.pop(i).result()
        except BaseException:  # Ctrl-C (or an error): stop the workers now rather than finish their queue
            _stop(pool)
            raise
        pool.shutdown()


@contextlib.contextmanager
def _children_ignore_interrupt():
    """Processes started here ignore Ctrl-C from their first instruction (an ignored signal stays ignored
    across exec): the parent stops them, so the user sees one line, not a traceback per worker."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(pool: ProcessPoolExecutor) -> None:
    processes = list(getattr(pool, "_processes", {}).values())  # the executor offers no public terminate
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


@contextlib.contextmanager
def _blas_threads_for_children(threads: int):
    """Share the cores between workers: N processes each running a BLAS with every core's threads
    oversubscribe the machine (measured: small SVDs ten times slower). Spawned children read these
    variables when they start; the user's own settings win, and the parent's are restored afterwards."""
    names = [n for n in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if n not in os.environ]
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)


def _seed(name: str) -> int:
    """A fixed seed per weight: the same bytes whatever the order, the worker or the run."""
    return zlib.crc32(name.encode())


# --- decompositions kept for later budgets, on disk -------------------------------------------------------

# A model whose site decompositions would take more than this in float64 keeps them on disk as factors
# (SpilledDecomposition): global allocation needs every site's spectrum before any rank is known, and holding
# every U and Vᵀ costs twice the model in float64 (1 GB for a 135 M-parameter decoder).
SPILL_BYTES = 512 << 20


def spill_needed(sites: list[Site]) -> bool:
    """Whether these sites' decompositions are spilled to disk when kept (SPILL_BYTES)."""
    return 8 * sum(s.K * s.N for s in sites) > SPILL_BYTES


class SpilledDecomposition(lowrank.Decomposition):
    """A decomposition whose spectrum stays in memory (what allocation reads) while its factors for every rank
    it serves, A = P⁻¹ U Σ^½ [K, p] and B = Σ^½ Vᵀ Q⁻¹ [p, N], wait in a SpillFile in float32 (the dtype the
    model stores them in), Aᵀ and B by rows so a rank r reads only its first r rows of each; factors(r) reads
    them back. Made from a Decomposition, which can then go: the scalings (Cholesky factors) are not kept."""

    def __init__(self, dec: lowrank.Decomposition, spill: SpillFile):
        super().__init__(U=None, s=dec.s, Vt=None, left=None, right=None, total_energy=dec.total_energy,
                         exact=dec.exact)
        rank = dec.max_rank
        A, B = dec.factors(rank)
        self._shapes = (A.shape[0], B.shape[1])
        self._spill = spill
        self._offsets = (spill.append(np.asarray(A.T, dtype=np.float32)), spill.append(np.asarray(B, dtype=np.float32)))
        self._rank = rank

    @property
    def max_rank(self) -> int:
        return self._rank

    @property
    def spill(self) -> SpillFile:
        """The file its factors are in."""
        return self._spill

    def keep_components(self, rank: int) -> "SpilledDecomposition":
        return self

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_rank(rank)
        K, N = self._shapes
        At = self._spill.read(self._offsets[0], np.float32, (rank, K))
        B = self._spill.read(self._offsets[1], np.float32, (rank, N))
        return np.ascontiguousarray(At.T, dtype=np.float64), np.array(B, dtype=np.float64)


def decompose_with_stats(model, sites: list[Site], site_methods: dict, stats, weighting: Weighting,
                         spill: SpillFile | None = None) -> list:
    """Every site's exact decomposition from statistics held here, with its scalings, in site order: the jobs and
    function the local path runs (_JobPlanner, decompose_one), so a per-group task on a cluster hands back the
    numbers the local run has. `spill`: each is made a SpilledDecomposition there as soon as it is computed, as
    the local run keeps a large model's (then only spectra stay in memory, and only they travel back)."""
    planner = _JobPlanner(model, sites, site_methods, stats, weighting, {}, "exact")
    results = []
    for i in range(len(sites)):
        dec = decompose_one(planner.job(i))
        dec.left, dec.right = planner.scalings_of(i)
        results.append(dec if spill is None else SpilledDecomposition(dec, spill))
    return results
