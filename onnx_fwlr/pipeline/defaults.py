"""What `compress` does when the caller names no method or allocation: the best the data allows, and the
checks that run before any work (argument types, data that can be read only once, every input sample).

Defaults, measured in docs/defaults.md:
- calibration data (or statistics with gradients): kfac, with loss-unit global allocation. Its loss seeds
  need no labels (mc for classifiers, gaussian for embeddings), so any calibration data will do. When the
  backward pass cannot run on the model (an op without a gradient rule) or its gradient Grams would not fit
  the memory limit, whiten (activations only), with uniform allocation.
- statistics without gradients: whiten, uniform.
- no data: svd, uniform, and the report says the result is data-free and what --calib buys.
- Kronecker or doped structures (--method kron, --dope): whiten weighting with data, svd without; uniform.
"""

from __future__ import annotations

import os

import onnx

from onnx_fwlr.methods.registry import METHODS

GRADIENT_DEFAULT = "kfac"
ACTIVATION_DEFAULT = "whiten"

# Measured with `onnx-fwlr compress sample_models/digits_mlp.onnx --ratio 0.3 --val sample_models/digits_test.npz`,
# without and with `--calib sample_models/digits_calib.npz` (docs/defaults.md).
DATA_FREE_NOTE = ("no calibration data, so the result is data-free (plain svd, uniform ranks); with `calibration` the "
                  "default is kfac with loss-unit global allocation, which weights each layer by what it does to "
                  "the outputs and usually keeps far more accuracy at the same budget (docs/defaults.md).")


def default_method(calibration, stats, structured: bool = False) -> str:
    """The weighting the data allows: kfac with gradients to be had, whiten with activations only, else svd."""
    if calibration is None and stats is None:
        return "svd"
    if structured:
        return ACTIVATION_DEFAULT  # kfac has no structured fit; whiten's metric serves Kronecker and doping
    if stats is not None:
        from onnx_fwlr.stats.store import holds_gradients

        return GRADIENT_DEFAULT if holds_gradients(stats) else ACTIVATION_DEFAULT
    return GRADIENT_DEFAULT


def default_allocation(prepared) -> tuple[str, str | None]:
    """global when every site has the method's loss-unit statistics, else uniform (with the reason)."""
    if not METHODS[prepared.method].loss_units:
        return "uniform", None
    missing = [s.name for s in prepared.sites if prepared.site_methods.get(s.weight) != prepared.method]
    if missing:
        return "uniform", (f"{len(missing)} site(s) have no gradient statistics (inside subgraphs?), so the default "
                           "allocation is uniform rather than global.")
    return "global", None


def gradient_obstacle(model: onnx.ModelProto, sites, fisher_options: dict, stats_memory: int | None) -> str | None:
    """Why the default gradient method cannot run here (None: it can): one site's statistics alone would not
    fit the memory limit, or the backward pass cannot reach the sites. Reads no data. Statistics of many sites
    that do not fit together are measured a group at a time (stats.fisher.GroupedFisherStatistics), and an
    output side as wide as a vocabulary keeps a low-rank + diagonal estimate, so neither is an obstacle."""
    from onnx_fwlr.stats.activations import default_memory_limit
    from onnx_fwlr.stats.fisher import fisher_stats_bytes
    from onnx_fwlr.stats.fisher import gradient_obstacle as backward_obstacle

    sketch = {k: v for k, v in (fisher_options or {}).items() if k in ("sketch_min_dim", "sketch_rank")}
    needed = max((fisher_stats_bytes([s], **sketch) for s in sites), default=0)
    limit = default_memory_limit() if stats_memory is None else stats_memory
    if needed > limit:
        return (f"the gradient statistics of one of its weights would take about {needed / 2**30:.1f} GiB, over "
                f"the memory limit of {limit / 2**30:.1f} GiB (`stats_memory`)")
    return backward_obstacle(model, sites, (fisher_options or {}).get("output"))


def one_shot(source) -> bool:
    """A generator, iterator or CalibrationDataReader: gone once read."""
    if source is None or isinstance(source, (str, os.PathLike, list, tuple)):
        return False
    if hasattr(source, "get_next"):
        return True
    try:
        return iter(source) is source
    except TypeError:
        return False


def check_data_first(model, sources, batch_size: int, shapes: dict | None) -> None:
    """Read every sample of the data that can be read again (files, folders, lists) and check it against the
    model's inputs (names, dtypes, shapes, NaN/Inf) before any work, so a bad validation sample cannot
    surface after calibration and decomposition."""
    from onnx_fwlr.io.data import open_data

    readable = [s for s in sources if s is not None and not one_shot(s) and not (isinstance(s, str) and s == "random")]
    if not readable:
        return
    structure = _structure(model)
    if structure is None:
        return  # loading it later names the problem
    for source in readable:
        for _batch in open_data(source, structure, batch_size=batch_size, shapes=shapes):
            pass


def _structure(model) -> onnx.ModelProto | None:
    """The model's graph without external weights (inputs are all the check needs); None if unreadable."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(os.fspath(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - any failure: load_model reports it properly later
        return None
