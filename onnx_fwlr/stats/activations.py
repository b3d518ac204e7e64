"""Activation statistics from one ONNX Runtime pass, reduced inside the graph.

For every distinct site input X we append nodes that reduce X [..., K] to Xᵀ X [K, K], Σ x, Σ |x| and the
position count, and ask ORT for those outputs only: memory does not grow with the data, and each batch is
folded into float64 running sums at once. With an attention mask, only positions where it is non-zero are
summed (inputs of rank 3, [batch, seq, K], the layout of transformer exports): padding rows are gathered
away before the Gram, so they neither pollute the statistics nor cost its K² work.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io import runtime
from onnx_fwlr.io.batching import seq_first_inputs  # the mask [batch, seq] needs them transposed
from onnx_fwlr.io.data import Batches, find_mask_input
from onnx_fwlr.io.onnx_utils import default_opset
from onnx_fwlr.sites.find import Site
from onnx_fwlr.stats.store import Statistics, activation_key, model_fingerprint

PREFIX = "fwlr_stats"


def main_graph_tensors(model: onnx.ModelProto) -> set[str]:
    """Names the main graph can expose as outputs."""
    graph = model.graph
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def activation_plan(model: onnx.ModelProto, sites: list[Site]) -> dict[str, tuple[str, bool, int]]:
    """key -> (tensor, transposed, K) for every site input visible from the main graph."""
    visible = main_graph_tensors(model)
    plan = {}
    for site in sites:
        for use in site.uses:
            if use.input in visible:
                plan[activation_key(use)] = (use.input, use.trans_a, site.K)
    return dict(sorted(plan.items()))


def _tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - shape inference is a hint here, never a requirement
        inferred = model
    ranks = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks


# Long: builds the in-graph reductions node by node; each block is one statistic.
def build_stats_model(model: onnx.ModelProto, plan: dict, mask: str | None) -> tuple[onnx.ModelProto, dict]:
    """A copy of the model whose only outputs are the per-key reductions; returns it and key -> field -> output."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    ranks = _tensor_ranks(model)
    seq_first = seq_first_inputs(model)
    opset = default_opset(model)
    nodes, inits, outputs = [], [], {}

    def reduce_sum(x, out):
        if opset >= 13:
            nodes.append(helper.make_node("ReduceSum", [x, f"{PREFIX}/axis0"], [out], keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceSum", [x], [out], axes=[0], keepdims=0))

    inits.append(numpy_helper.from_array(np.array([0], np.int64), f"{PREFIX}/axis0"))
    real_rows = None
    if mask is not None:  # indices of the real (unpadded) positions, in [batch, seq] order
        real_rows = f"{PREFIX}/real_rows"
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"{PREFIX}/flat"))
        nodes.append(helper.make_node("Reshape", [mask, f"{PREFIX}/flat"], [f"{PREFIX}/mask_flat"]))
        nodes.append(helper.make_node("NonZero", [f"{PREFIX}/mask_flat"], [f"{PREFIX}/nonzero"]))
        nodes.append(helper.make_node("Reshape", [f"{PREFIX}/nonzero", f"{PREFIX}/flat"], [real_rows]))

    for i, (key, (tensor, transposed, K)) in enumerate(plan.items()):
        p = f"{PREFIX}/{i}"
        x = tensor
        nodes.append(helper.make_node("Cast", [x], [f"{p}/x32"], to=TensorProto.FLOAT))
        x = f"{p}/x32"
        if transposed:
            nodes.append(helper.make_node("Transpose", [x], [f"{p}/xt"], perm=[1, 0]))
            x = f"{p}/xt"
        masked = real_rows is not None and not transposed and ranks.get(tensor) == 3
        if masked and tensor in seq_first:  # rows in [batch, seq] order, like the mask
            nodes.append(helper.make_node("Transpose", [x], [f"{p}/batch_first"], perm=[1, 0, 2]))
            x = f"{p}/batch_first"
        inits.append(numpy_helper.from_array(np.array([-1, K], np.int64), f"{p}/shape"))
        nodes.append(helper.make_node("Reshape", [x, f"{p}/shape"], [f"{p}/rows"]))
        rows = f"{p}/rows"
        if masked:  # padding rows are dropped before the Gram, not zeroed: they would cost as much as real ones
            nodes.append(helper.make_node("Gather", [rows, real_rows], [f"{p}/rows_real"], axis=0))
            rows = f"{p}/rows_real"
        nodes.append(helper.make_node("Shape", [rows], [f"{p}/rows_shape"]))
        nodes.append(helper.make_node("Gather", [f"{p}/rows_shape", f"{PREFIX}/zero"], [f"{p}/n"], axis=0))
        nodes.append(helper.make_node("Cast", [f"{p}/n"], [f"{p}/count"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Transpose", [rows], [f"{p}/rows_t"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [f"{p}/rows_t", rows], [f"{p}/gram"]))
        reduce_sum(rows, f"{p}/sum")
        nodes.append(helper.make_node("Abs", [rows], [f"{p}/abs"]))
        reduce_sum(f"{p}/abs", f"{p}/abs_sum")
        outputs[key] = {name: f"{p}/{name}" for name in ("gram", "sum", "abs_sum", "count")}
    inits.append(numpy_helper.from_array(np.array(0, np.int64), f"{PREFIX}/zero"))

    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    for key, fields in outputs.items():
        for name in fields.values():
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return augmented, outputs


def make_session(model: onnx.ModelProto, providers=runtime.CPU, threads: int | None = None, arena: bool = True):
    """The session calibration runs in. numpy folds the sums between runs: spinning ORT threads would steal
    its cores. arena: runtime.session_options."""
    options = runtime.session_options(threads=threads, spinning=False, arena=arena)
    return runtime.make_session(model, options, providers, role="model for calibration")


def collect_activation_stats(
    model: onnx.ModelProto,
    sites: list[Site],
    batches: Batches,
    mask_input: str | None = None,
    progress: bool = True,
    providers=("CPUExecutionProvider",),
    memory_limit: int | None = None,
) -> Statistics:
    """Additive float64 statistics for every reachable site input, from one ORT pass over the data.

    When the Grams would together take more than `memory_limit` bytes (None: default_memory_limit()), they
    are measured in several passes instead, one group of site inputs at a time (GroupedStatistics).
    """
    plan = activation_plan(model, sites)
    limit = default_memory_limit() if memory_limit is None else memory_limit
    if gram_bytes(plan) > limit:
        return GroupedStatistics(model, gram_groups(sites, plan, limit), plan, batches, mask_input, progress,
                                 providers)
    return _measure_pass(model, plan, batches, mask_input, progress, providers)


def _measure_pass(model, plan, batches, mask_input, progress, providers, fingerprint=None) -> Statistics:
    from onnxruntime import OrtValue
    mask = find_mask_input(batches.specs, mask_input)
    stats = Statistics(fingerprint or model_fingerprint(model),
                       meta={"samples": 0, "batches": 0, "smoke_test": batches.smoke_test,
                             "data": batches.description, "mask_input": mask})
    if not plan:
        return stats
    augmented, outputs = build_stats_model(model, plan, mask)
    session = make_session(augmented, providers)
    slots = [(key, field, name) for key, fields in outputs.items() for field, name in fields.items()]
    names = [name for _key, _field, name in slots]
    start = time.perf_counter()
    bar = tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False)
    for index, (feed, _labels) in enumerate(bar):
        try:
            values = session.run_with_ort_values(names, {k: OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()})
        except Exception as exc:  # noqa: BLE001
            raise FwlrError(f"ONNX Runtime failed on calibration batch {index} ({runtime.error_text(exc)}); check "
                            "the data's shapes.") from None
        for i, (key, field, _name) in enumerate(slots):  # one output at a time, each released once folded:
            Statistics.fold(stats.activations.setdefault(key, {}), {field: values[i].numpy()})
            values[i] = None  # a batch's Grams are never all copied out at once
        stats.meta["samples"] += len(next(iter(feed.values()))) if feed else 0
        stats.meta["batches"] += 1
    if stats.meta["batches"] == 0:
        raise FwlrError(f"{batches.description}: holds no samples; give at least one batch of calibration data.")
    stats.meta["seconds"] = time.perf_counter() - start
    return stats


# --- Grams larger than memory: several passes -----------------------------------------------------------


GRAM_BYTES_PER_ENTRY = 12  # a float64 running sum, and the float32 output of the batch being folded


def gram_bytes(plan: dict) -> int:
    """What the Grams of these site inputs take during calibration (GRAM_BYTES_PER_ENTRY per entry)."""
    return sum(GRAM_BYTES_PER_ENTRY * K * K for _tensor, _transposed, K in plan.values())


def default_memory_limit() -> int:
    """A third of physical memory: the Grams share it with the model, ORT and the decompositions."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): measure in one pass
        return 2**62


def gram_groups(sites: list[Site], plan: dict, limit: int) -> list[list[str]]:
    """Activation keys in site order, cut into consecutive groups whose Grams fit in `limit` bytes.

    A site's keys all go to one group (its Gram sums over them), so one input larger than the limit, or a
    site reading inputs placed earlier, makes a group over the limit: the limit is a target, not a promise.
    """
    groups: list[list[str]] = []
    group_of: dict[str, int] = {}
    size = 0
    for site in sites:
        keys = list(dict.fromkeys(k for k in (activation_key(u) for u in site.uses) if k in plan))
        new = [k for k in keys if k not in group_of]
        if not new:
            continue
        placed = {group_of[k] for k in keys if k in group_of}
        if placed:
            target = min(placed)
        else:
            need = gram_bytes({k: plan[k] for k in new})
            if not groups or size + need > limit:
                groups.append([])
                size = 0
            target = len(groups) - 1
            size += need
        groups[target].extend(new)
        group_of.update({k: target for k in new})
    return groups


class GroupedStatistics(Statistics):
    """Activation statistics measured one group of site inputs at a time, for models whose Grams together do
    not fit in memory (LLM-sized layers: K = 11008 is 0.97 GB per Gram).

    The first group is measured at once. The small sums (mean, mean |x|, count) of every group measured
    stay; Grams stay for the last group measured only. Asking for a Gram of another group measures that
    group: one more pass over the data. Decomposing in site order therefore reads the data once per group.
    """

    def __init__(self, model, groups: list[list[str]], plan: dict, batches: Batches, mask_input, progress,
                 providers=("CPUExecutionProvider",)):
        super().__init__(model_fingerprint(model))
        self._measure_keys = lambda keys: _measure_pass(model, {k: plan[k] for k in keys}, batches, mask_input,
                                                        progress, providers, self.fingerprint)
        self.groups = groups
        self.group_of = {key: g for g, keys in enumerate(groups) for key in keys}
        self.later_seconds = 0.0  # wall time of the passes after the first (they run during decomposition)
        self._measure(groups[0])

    def _measure(self, keys: list[str]) -> None:
        start = time.perf_counter()
        for sums in self.activations.values():
            sums.pop("gram", None)  # the previous group's Grams go before this group's arrive
        measured = self._measure_keys(keys)
        self.activations.update(measured.activations)
        record_pass(self, measured.meta, start)

    def _ensure(self, site: Site, gram: bool) -> None:
        """Measure the site's groups if it needs sums not measured yet (or Grams since dropped)."""
        keys = [activation_key(u) for u in site.uses]
        if all(k in self.activations and (not gram or "gram" in self.activations[k]) for k in keys):
            return
        groups = sorted({self.group_of[k] for k in keys})  # one, unless the site reads inputs of two groups
        self._measure([k for g in groups for k in self.groups[g]])

    def _activation_sums(self, site: Site) -> tuple[dict, float]:
        self._ensure(site, gram=False)
        return super()._activation_sums(site)

    def input_gram(self, site: Site) -> np.ndarray:
        self._ensure(site, gram=True)
        return super().input_gram(site)

    def has_activations(self, site: Site) -> bool:
        return all(activation_key(u) in self.group_of for u in site.uses)

    def save(self, path) -> None:
        raise FwlrError("statistics measured in groups hold one group's Grams at a time and cannot be saved; "
                        "raise `stats_memory` to measure them in one pass.")


def record_pass(grouped, meta: dict, start: float) -> None:
    """Fold one grouped pass's metadata into `grouped.meta` (passes, seconds); the wall time of passes after
    the first goes to `grouped.later_seconds` (they run during decomposition)."""
    if not grouped.meta:
        grouped.meta = dict(meta, passes=1, groups=len(grouped.groups))
    else:
        grouped.meta["passes"] += 1
        grouped.meta["seconds"] += meta["seconds"]
        grouped.later_seconds += time.perf_counter() - start
