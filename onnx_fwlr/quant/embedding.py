"""Embedding tables (Gather on a constant) and what an error in them costs, in the units of the sites' loss.

A lookup Gather(T, ids) is onehot(ids) @ T, so the K-FAC loss of the sites (stats.fisher) carries over:
input Gram diag(row frequency), output Gram of the gradient at the lookup's output, summed per sample over
the positions that read one row. The predicted loss of a table error ΔT is Σ_v f_v Δt_vᵀ G Δt_v, normalised
like the sites' statistics (frequencies per (sample, row) occurrence, gradient Gram per sample), so tables
and MatMul weights share one currency in the byte budget (measured on the synthetic transformer: predicted /
actual 1.04 for the word table, 0.89 for positions; sites 0.2-1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

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
        return self._rows_loss(used, error[used])

    def head_loss(self, W: np.ndarray, approx: np.ndarray) -> float:
        """loss((W − approx)ᵀ) for a table read as the head W [D, V] and stored as `approx` [D, V], from the
        columns of the rows the data read only (the same numbers, C-ordered as loss's rows: no [V, D] residual
        of a vocabulary-wide table)."""
        used = np.flatnonzero(self.counts)
        return self._rows_loss(used, np.ascontiguousarray(np.subtract(W[:, used], approx[:, used], dtype=np.float64).T))

    def _rows_loss(self, used: np.ndarray, rows: np.ndarray) -> float:
        return float(np.sum(self.frequencies()[used] * np.einsum("vd,de,ve->v", rows, self.output_gram(), rows)))


def fold_lookup(acc: TableStats, ids: np.ndarray, grads: list[np.ndarray], mask, V: int, batch: int) -> None:
    """Add one batch: ids [..., positions] and per-seed gradients [..., positions, D] at the lookup output.

    Per sample, the gradients of the positions that read one row are summed before squaring (a row read at
    every position, like a token type, adds its error coherently); each (sample, row) pair counts once.
    A lookup shared by the whole batch (position ids [1, S]) has its gradient summed over the samples
    already; with zero-mean seeds (Gaussian, Monte Carlo) the Gram of that sum is, in expectation, the sum of
    the samples' Grams, so it is folded as it is, each position counted once per unmasked sample.
    """
    ids = np.asarray(ids).astype(np.int64) % V  # negative ids index from the end
    if ids.ndim >= 1 and ids.shape[0] == batch and all(g.shape[:-1] == ids.shape for g in grads):
        _fold_per_sample(acc, ids, grads, mask, V, batch)
        return
    keep = np.ones(ids.shape, dtype=bool)
    if mask is not None and ids.ndim == mask.ndim and all(a in (1, b) for a, b in zip(ids.shape, mask.shape)):
        keep = mask != 0
    flat_ids = np.broadcast_to(ids, keep.shape)[keep]
    acc.counts += np.bincount(flat_ids, minlength=V)
    acc.positions += float(flat_ids.size)
    for g in grads:
        rows = g.reshape(-1, g.shape[-1]).astype(np.float64)
        acc.grad_gram += rows.T @ rows
        acc.grad_count += float(batch)


def _fold_per_sample(acc: TableStats, ids: np.ndarray, grads, mask, V: int, batch: int) -> None:
    keep = (mask != 0) if mask is not None and np.shape(mask) == ids.shape else np.ones(ids.shape, dtype=bool)
    acc.grad_count += float(batch) * len(grads)
    if not keep.any():
        return
    sample = np.broadcast_to(np.arange(batch).reshape((batch,) + (1,) * (ids.ndim - 1)), ids.shape)[keep]
    pairs, which = np.unique(sample * V + ids[keep], return_inverse=True)  # one entry per (sample, row)
    acc.counts += np.bincount(pairs % V, minlength=V)
    acc.positions += float(len(pairs))
    order = np.argsort(which, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(which[order]) != 0])
    for g in grads:
        sums = np.add.reduceat(g[keep].astype(np.float64)[order], starts, axis=0)
        acc.grad_gram += sums.T @ sums
