"""SVD time with 1 and 2 BLAS threads at growing sizes, as the machine is, then with busy processes added.

Backs pipeline.decompose.blas_threads (docs/defaults.md). Run without OPENBLAS_NUM_THREADS set:

    python tools/bench_blas_threads.py --busy 2
"""

import argparse
import multiprocessing as mp
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits


def spin(stop):
    while not stop.is_set():
        pass


def timings(sizes, reps):
    rng = np.random.default_rng(0)
    for n in sizes:
        matrix = rng.standard_normal((n, n))
        row = []
        for threads in (1, 2):
            with threadpool_limits(threads, user_api="blas"):
                times = []
                for _ in range(reps if n <= 256 else max(2, reps // 6)):
                    start = time.perf_counter()
                    np.linalg.svd(matrix, full_matrices=False)
                    times.append(time.perf_counter() - start)
            row.append(f"{threads} thread(s) {1e3 * min(times):9.2f} ms")
        print(f"  n={n:5d}: " + " | ".join(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,256,384,512,768,1024")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--busy", type=int, default=2, help="busy-looping processes for the loaded run")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: as the machine is")
    timings(sizes, args.reps)
    stop = mp.Event()
    busy = [mp.Process(target=spin, args=(stop,)) for _ in range(args.busy)]
    for process in busy:
        process.start()
    try:
        print(f"with {args.busy} busy process(es) added")
        timings(sizes, args.reps)
    finally:
        stop.set()
        for process in busy:
            process.join()


if __name__ == "__main__":
    main()
