"""VJP rules of the ops that move data without arithmetic: reshapes, transposes, concatenation, slicing,
gathers and scatters, Where. Pure numpy (see vjp.py for the rule contract)."""

from __future__ import annotations

import numpy as np

from onnx_fwlr.autodiff.vjp_base import each_wanted, optional_input, unbroadcast

# ---------------------------------------------------------------- shape manipulation

def _reshape_back(ins, outs, attrs, grads, opset, wanted):
    return [grads[0].reshape(ins[0].shape)] + [None] * (len(ins) - 1)


def _transpose(ins, outs, attrs, grads, opset, wanted):
    g = grads[0]
    perm = attrs.get("perm") or list(range(g.ndim))[::-1]
    return [g.transpose(np.argsort(perm))]


def _expand(ins, outs, attrs, grads, opset, wanted):
    return [unbroadcast(grads[0], ins[0].shape), None]


def _concat(ins, outs, attrs, grads, opset, wanted):
    g = grads[0]
    axis = attrs["axis"] % g.ndim
    edges = np.cumsum([x.shape[axis] for x in ins])[:-1]
    parts = np.split(g, edges, axis=axis)
    return each_wanted(ins, wanted, lambda i: parts[i])


def _split(ins, outs, attrs, grads, opset, wanted):
    x = ins[0]
    axis = attrs.get("axis", 0) % x.ndim
    dim, n = x.shape[axis], len(grads)
    sizes = optional_input(ins, 1)
    if sizes is None:
        sizes = attrs.get("split")
    if sizes is None:  # equal parts, the last one smaller (num_outputs semantics)
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    dtype = next(g.dtype for g in grads if g is not None)
    parts = []
    for size, g in zip(np.ravel(sizes), grads):
        if g is None:
            shape = list(x.shape)
            shape[axis] = int(size)
            g = np.zeros(shape, dtype=dtype)
        parts.append(g)
    return [np.concatenate(parts, axis=axis)] + [None] * (len(ins) - 1)


def _slice_index(shape, starts, ends, axes, steps):
    """ONNX Slice parameters as a tuple of Python slices (clamping per the ONNX spec)."""
    rank = len(shape)
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in np.ravel(axes)]
    steps = [1] * len(axes) if steps is None else [int(s) for s in np.ravel(steps)]
    index = [slice(None)] * rank
    for start, end, axis, step in zip(np.ravel(starts), np.ravel(ends), axes, steps):
        dim, start, end = shape[axis], int(start), int(end)
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index[axis] = slice(start, None if end < 0 else end, step)
    return tuple(index)


def _slice(ins, outs, attrs, grads, opset, wanted):
    x, g = ins[0], grads[0]
    if opset < 10:
        index = _slice_index(x.shape, attrs["starts"], attrs["ends"], attrs.get("axes"), None)
    else:
        index = _slice_index(x.shape, ins[1], ins[2], optional_input(ins, 3), optional_input(ins, 4))
    gx = np.zeros(x.shape, dtype=g.dtype)
    gx[index] = g
    return [gx] + [None] * (len(ins) - 1)


def _gather(ins, outs, attrs, grads, opset, wanted):
    """Scatter-add the cotangent back to the gathered rows (repeated indices accumulate)."""
    data, indices, g = ins[0], np.asarray(ins[1]), grads[0]
    axis = attrs.get("axis", 0) % data.ndim
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    gd = np.zeros(data.shape, dtype=g.dtype)
    if axis == 0:
        np.add.at(gd, indices.reshape(-1), g.reshape((indices.size,) + data.shape[1:]))
    else:
        np.add.at(gd, (slice(None),) * axis + (indices,), g)
    return [gd, None]


def _scatter_reduction(op: str, attrs) -> str | None:
    """Why a Scatter* node has no rule (None when it has one): only reduction none and add are linear."""
    reduction = attrs.get("reduction", "none")
    return None if reduction in ("none", "add") else f"{op} with reduction='{reduction}' has no gradient rule"


def _nd_index(indices: np.ndarray, shape) -> tuple:
    """ScatterND indices [..., q] as a numpy index tuple into the first q axes (negative indices wrapped)."""
    q = indices.shape[-1]
    return tuple(np.where(indices[..., i] < 0, indices[..., i] + shape[i], indices[..., i]) for i in range(q))


def _scatter_nd(ins, outs, attrs, grads, opset, wanted):
    """data: the cotangent, zero where reduction 'none' overwrote it; updates: the cotangent at their indices
    (repeated indices under 'add' each get it)."""
    g, index = grads[0], _nd_index(np.asarray(ins[1]), ins[0].shape)
    out = [None, None, None]
    if 0 in wanted:
        out[0] = g.copy()
        if attrs.get("reduction", "none") == "none":
            out[0][index] = 0
    if 2 in wanted:
        out[2] = g[index].reshape(ins[2].shape)
    return out


def _scatter_elements(ins, outs, attrs, grads, opset, wanted):
    """As ScatterND, with indices along one axis (take_along_axis)."""
    g, indices = grads[0], np.asarray(ins[1])
    axis = attrs.get("axis", 0) % g.ndim
    indices = np.where(indices < 0, indices + g.shape[axis], indices)
    window = tuple(slice(None) if a == axis else slice(0, d) for a, d in enumerate(indices.shape))  # indices may
    out = [None, None, None]                                                  # be narrower than data off the axis
    if 0 in wanted:
        out[0] = g.copy()
        if attrs.get("reduction", "none") == "none":
            np.put_along_axis(out[0][window], indices, 0, axis=axis)  # a view: writes through
    if 2 in wanted:
        out[2] = np.take_along_axis(g[window], indices, axis=axis)
    return out


def _where(ins, outs, attrs, grads, opset, wanted):
    cond, g = ins[0], grads[0]
    out = [None, None, None]
    if 1 in wanted:
        out[1] = unbroadcast(np.where(cond, g, 0), ins[1].shape)
    if 2 in wanted:
        out[2] = unbroadcast(np.where(cond, 0, g), ins[2].shape)
    return out
