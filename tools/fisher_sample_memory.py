"""One sample of the recorded Fisher pass, piece by piece, with resident memory after each piece: where the
pass's floor is (docs/llm.md, "The Fisher pass's floor"), and what an ONNX Runtime option changes.

    python tools/fisher_sample_memory.py /work/cache/smollm2/model.onnx --calib /work/cache/smollm2/calib.npz
    python tools/fisher_sample_memory.py MODEL --calib C --change disable-prepacking --change default-order

Runs what stats.fisher's recorded pass runs for the first calibration row (its session options, forward,
site inputs dropped, values parked, seeds, the backward walk with consume/emit) and prints VmRSS, VmHWM and
the file-backed part (RssFile) after each, ONNX Runtime's run sampled every 3 ms, and a checksum of the
cotangents the walk hands over: a change that alters a number shows there. `--change` (repeatable):
disable-prepacking, no-mem-pattern, basic-optimization, default-order (ORT's default node order instead of
shapes first), eager (exact products fetched from ORT), no-park (nothing parked, site inputs kept).
"""

import argparse
import threading
import time

import numpy as np


def status() -> dict:
    with open("/proc/self/status") as handle:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in handle)
                if k in ("VmRSS", "VmHWM", "RssFile")}


def show(label: str, extra: str = "") -> None:
    now = status()
    print(f"{label:28s} RSS {now['VmRSS']:6d} MiB  HWM {now['VmHWM']:6d} MiB  file-backed {now['RssFile']:5d} MiB"
          f"  {extra}", flush=True)


def run_sampled(runner, feed, lazy: bool) -> tuple[dict, int]:
    """runner.forward with resident memory sampled every 3 ms; (values, peak MiB during the run)."""
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], status()["VmRSS"])
            time.sleep(0.003)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        values = runner.forward(feed, lazy=lazy)
    finally:
        stop.set()
        thread.join()
    return values, peak[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--change", action="append", default=[],
                        choices=["disable-prepacking", "no-mem-pattern", "basic-optimization", "default-order",
                                 "eager", "no-park"])
    args = parser.parse_args()
    show("start")
    import onnxruntime as ort

    from onnx_fwlr.autodiff import losses
    from onnx_fwlr.io import runtime
    from onnx_fwlr.io.model import load_model
    from onnx_fwlr.sites.recurrent import find_all_sites
    from onnx_fwlr.sites.tied import find_ties
    from onnx_fwlr.stats import fisher

    model = load_model(args.model)
    sites, _ = find_all_sites(model, None, None, fisher=True)
    heads = {tie.head for tie in find_ties(model, sites)}  # a head repeating its table is no site (as compress)
    sites = [site for site in sites if site.weight not in heads]
    _, target, uses, _, runner = fisher._gradient_setup(model, sites, None)
    options = runner.session_options
    if "disable-prepacking" in args.change:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if "no-mem-pattern" in args.change:
        options.enable_mem_pattern = False
    if "basic-optimization" in args.change:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if "default-order" in args.change:
        options.execution_order = ort.ExecutionOrder.DEFAULT
    runtime.return_large_blocks_promptly()
    show("model and sites")
    runner._session = runner._make_session()
    runtime.release_free_memory()
    show("ONNX Runtime session")
    data = np.load(args.calib)
    feed = {k: data[k][:1] for k in data.files}
    values, peak = run_sampled(runner, feed, lazy="eager" not in args.change)
    show("forward", f"(run peak {peak} MiB; {runner.value_bytes(values) / 2**20:.0f} MiB of values, "
                    f"{sum(np.asarray(v).nbytes for v in values.values()) / 2**20:.0f} MiB from ORT)")
    parked = None
    if "no-park" not in args.change:
        for _, use in uses:  # the recording writes them here; nothing else reads them
            runner.value(values, use.input)
        runner.drop_unread(values, keep=[target.tensor])
        parked = runner.park(values, fisher.PARK_RESIDENT)
        show("site inputs dropped, parked")
    z = values[target.tensor]
    loss = losses.default_seed_loss(target, z.shape, False, next_token=True, class_scores=None)
    seeds = losses.make_seeds(loss, z, target=target, labels=None, draws=1, rng=np.random.default_rng(0),
                              weight=feed.get("attention_mask"), tokens=feed.get("input_ids"))
    del z
    if "no-park" not in args.change:
        runner.drop_unread(values)
    show("seeds")
    checksum = []
    start = time.perf_counter()
    runner.backward(values, seeds[0], consume=True,
                    emit=lambda name, g: checksum.append(float(np.asarray(g, dtype=np.float64).sum())))
    if parked is not None:
        parked.close()
    show("backward walk", f"({time.perf_counter() - start:.1f} s; cotangent checksum {sum(checksum)!r})")


if __name__ == "__main__":
    main()
