"""Decomposing every site once: the expensive, budget-independent step, optionally in a process pool.

Each job carries only what one decomposition needs: where the weight is (a WeightRef, which a worker
memory-maps itself when the model was loaded lazily), the two scalings, and the rank when a randomised SVD
is used. Results do not depend on the number of workers: every job runs the same function on the same
inputs, and the randomised sketch is seeded from the weight's name, not from the order of work.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor

from tqdm.auto import tqdm

from . import factorize
from .errors import FwlrError
from .sites import Site, weight_ref


def decompose_sites(model, sites: list[Site], site_methods: dict[str, str], stats, scalings, progress: bool = True,
                    ranks: dict | None = None, svd: str = "exact", workers: int = 1) -> dict:
    """weight name -> Decomposition for every site, in site order.

    `scalings(method, site, stats)` gives the input/output weighting of the site's method. `ranks` (weight
    name -> rank, None = the whole spectrum) lets `svd` "auto" or "randomized" compute only the leading
    components (factorize.use_randomized says when).
    """
    if workers < 1:
        raise FwlrError(f"--workers {workers} is out of range; give 1 or more worker processes.")
    ranks = ranks or {}
    jobs = []
    for site in sites:
        left, right = scalings(site_methods[site.weight], site, stats)
        rank = ranks.get(site.weight)
        randomized = factorize.use_randomized(site.K, site.N, rank, svd)
        jobs.append((weight_ref(model, site), left, right, rank if randomized else None, _seed(site.weight)))
    bar = tqdm(total=len(jobs), desc="decompose", unit="site", disable=not progress, leave=False)
    try:
        if workers == 1 or len(jobs) < 2:
            results = []
            for job in jobs:
                results.append(decompose_one(job))
                bar.update()
        else:
            results = _in_pool(jobs, workers, bar)
    finally:
        bar.close()
    return {site.weight: dec for site, dec in zip(sites, results)}


def decompose_one(job) -> factorize.Decomposition:
    """One site's decomposition (runs in a worker process too, so it takes and returns plain data)."""
    ref, left, right, rank, seed = job
    W = ref.load()
    if rank is None:
        return factorize.weighted_svd(W, left, right)
    return factorize.randomized_weighted_svd(W, rank, left, right, seed=seed)


def _in_pool(jobs, workers: int, bar) -> list:
    """Run jobs in `workers` spawned processes, at most two per worker in flight (bounded memory)."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with BLAS/ORT threads; spawn works everywhere
    results = [None] * len(jobs)
    with _blas_threads_for_children(max(1, (os.cpu_count() or 1) // workers)), \
            ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        pending = {}
        next_job = 0
        while next_job < len(jobs) or pending:
            while next_job < len(jobs) and len(pending) < 2 * workers:
                pending[pool.submit(decompose_one, jobs[next_job])] = next_job
                next_job += 1
            done = next(iter(_wait_first(pending)))
            results[pending.pop(done)] = done.result()
            bar.update()
    return results


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


def _wait_first(pending: dict):
    from concurrent.futures import FIRST_COMPLETED, wait

    finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
    return finished


def _seed(name: str) -> int:
    """A fixed seed per weight: the same bytes whatever the order, the worker or the run."""
    return zlib.crc32(name.encode())
