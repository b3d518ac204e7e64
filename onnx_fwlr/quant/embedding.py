"""Embedding tables (Gather on a constant) and what an error in them costs, in the units of the sites' loss.

A lookup Gather(T, ids) is onehot(ids) @ T, so the K-FAC loss of the sites (DESIGN §3) carries over:
input Gram diag(token frequency), output Gram E[g gᵀ] of the gradient at the lookup's output. The predicted
loss of a table error ΔT is Σ_v f_v Δt_vᵀ G Δt_v, normalised like the sites' statistics (frequencies per
position, gradient Gram per sample), so tables and MatMul weights share one currency in the byte budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.data import Batches, find_mask_input
from onnx_fwlr.io.model import tensor_array


@dataclass
class Table:
    """A 2-D float32 initializer read only by main-graph Gathers along axis 0 (an embedding table)."""

    name: str
    V: int
    D: int
    nodes: list[int]  # indices of the Gather nodes in the main graph
    ids: list[str]  # their index tensors
    outputs: list[str]  # their outputs

    @property
    def params(self) -> int:
        return self.V * self.D


def find_tables(model: onnx.ModelProto, exclude: set[str] = frozenset()) -> list[Table]:
    """Every embedding table of the main graph, in initializer order (tied weights in `exclude` are left out:
    a table also read as a MatMul weight must keep its dense copy)."""
    graph = model.graph
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    outputs = {o.name for o in graph.output}
    tables = []
    for tensor in graph.initializer:
        nodes = readers.get(tensor.name, [])
        if (tensor.name in exclude or tensor.name in outputs or not nodes or len(tensor.dims) != 2
                or tensor.data_type != onnx.TensorProto.FLOAT):
            continue
        if all(_is_lookup(graph.node[i], tensor.name) for i in nodes):
            tables.append(Table(tensor.name, int(tensor.dims[0]), int(tensor.dims[1]), nodes,
                                [graph.node[i].input[1] for i in nodes], [graph.node[i].output[0] for i in nodes]))
    return tables


def _is_lookup(node: onnx.NodeProto, table: str) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] == table and axis == 0


def table_array(model: onnx.ModelProto, table: Table) -> np.ndarray:
    tensor = next(t for t in model.graph.initializer if t.name == table.name)
    return tensor_array(model, tensor).astype(np.float64)


@dataclass
class TableStats:
    """Running sums for one table: token counts (mask-weighted positions), Σ g gᵀ at the lookup output,
    positions, and samples × seeds."""

    counts: np.ndarray
    grad_gram: np.ndarray
    positions: float = 0.0
    grad_count: float = 0.0

    def frequencies(self) -> np.ndarray:
        return self.counts / max(self.positions, 1.0)

    def output_gram(self) -> np.ndarray:
        return self.grad_gram / max(self.grad_count, 1.0)

    def loss(self, error: np.ndarray) -> float:
        """Predicted loss of a table error ΔT [V, D]: Σ_v f_v Δt_vᵀ G Δt_v."""
        used = np.flatnonzero(self.counts)
        rows = error[used]
        return float(np.sum(self.frequencies()[used] * np.einsum("vd,de,ve->v", rows, self.output_gram(), rows)))


def collect_table_stats(model: onnx.ModelProto, tables: list[Table], batches: Batches, *, loss: str,
                        output: str | None = None, mask_input=None, samples=1, seed=0,
                        progress=True) -> dict[str, TableStats]:
    """Token counts and output-gradient Grams of every table in one pass over the calibration data, seeded
    like the sites' Fisher pass (give its `loss` and `output`: stats.meta["loss"], ["fisher_output"])."""
    from onnx_fwlr.autodiff import losses as fisher
    from onnx_fwlr.autodiff.backward import GradientRunner
    from onnx_fwlr.io.data import find_token_input
    from onnx_fwlr.stats.fisher import default_output

    target = fisher.find_seed_target(model, default_output(model, output))
    fed = {i.name for i in model.graph.input}
    computed_ids = sorted({i for t in tables for i in t.ids if i not in fed})
    runner = GradientRunner(model, target.tensor, sorted({o for t in tables for o in t.outputs}),
                            extra_outputs=computed_ids)
    mask_name = find_mask_input(batches.specs, mask_input)
    token_name = find_token_input(batches.specs)
    rng = np.random.default_rng(seed)
    stats = {t.name: TableStats(np.zeros(t.V), np.zeros((t.D, t.D))) for t in tables}
    for feed, labels in tqdm(batches, desc="calibrate (embeddings)", unit="batch", disable=not progress, leave=False):
        values = runner.forward(feed)
        z = values[target.tensor]
        mask = feed.get(mask_name) if mask_name else None
        weight = mask if (mask is not None and z.ndim >= 3 and z.shape[:2] == mask.shape) else None
        seeds = fisher.make_seeds(loss, z, target=target, labels=labels, draws=samples, rng=rng, weight=weight,
                                  tokens=feed.get(token_name) if token_name else None)
        cotangents = [runner.backward(values, s) for s in seeds]
        for table in tables:
            for ids_name, out in zip(table.ids, table.outputs):
                ids = np.asarray(feed[ids_name] if ids_name in feed else values[ids_name])
                _fold(stats[table.name], ids, [c[out] for c in cotangents], mask, table.V, len(z) if z.ndim else 1)
    if not any(s.positions for s in stats.values()):
        raise FwlrError(f"{batches.description}: holds no samples; give at least one batch of calibration data.")
    return stats


def _fold(acc: TableStats, ids: np.ndarray, grads: list[np.ndarray], mask, V: int, batch: int) -> None:
    """Add one batch: ids [..., positions] and per-seed gradients [..., positions, D] at the lookup output.

    A lookup shared by the whole batch (position ids [1, S]) has its gradient summed over the samples; with
    zero-mean seeds (Gaussian, Monte Carlo) the Gram of that sum is, in expectation, the sum of the samples'
    Grams, so it is folded as it is, counting `batch` samples, and each position once per unmasked sample.
    """
    ids = np.asarray(ids)
    keep = np.ones(ids.shape, dtype=bool)
    if mask is not None and ids.ndim == mask.ndim and all(a in (1, b) for a, b in zip(ids.shape, mask.shape)):
        keep = mask != 0
    flat_ids = np.broadcast_to(ids, keep.shape)[keep].astype(np.int64) % V  # negative ids index from the end
    acc.counts += np.bincount(flat_ids, minlength=V)
    acc.positions += float(flat_ids.size)
    for g in grads:
        rows = g[keep] if g.shape[:-1] == keep.shape else g.reshape(-1, g.shape[-1])
        rows = rows.astype(np.float64)
        acc.grad_gram += rows.T @ rows
        acc.grad_count += float(batch)
