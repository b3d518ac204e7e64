"""Backpropagation through time for the ONNX LSTM and GRU ops, in numpy.

The op's outputs hold only the hidden states, not the per-step gates, so the rules recompute the forward
recurrence from the op's inputs (as ONNX defines it: gate orders iofc / zrh, ``sequence_lens``, initial
states, peepholes, ``layout`` 0/1, ``linear_before_reset``) and walk it backwards. Every direction runs
as a forward recurrence: a reverse direction reads each batch entry's first ``sequence_lens[b]`` steps
backwards (the same index permutation maps results back); steps past a sequence's length leave the state
unchanged and give zero output, as ONNX Runtime does.

``input_projection_grads`` returns the cotangent of the input projection ``X_t W_dᵀ`` at every step:
the output gradient of an LSTM/GRU input weight seen as a site (Fisher statistics, kfac).

Default activations only (Sigmoid/Tanh); ``clip``, other activations and LSTM ``input_forget`` are
refused with the attribute named. Pure numpy/scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

GATES = {"LSTM": 4, "GRU": 3}
_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh")}


def unsupported_reason(op_type: str, attrs: dict) -> str | None:
    """Why the rule cannot differentiate this node (an attribute it does not implement), else None."""
    if attrs.get("clip") is not None:
        return f"attribute clip={attrs['clip']} (cell clipping) is not supported by the {op_type} gradient rule"
    activations = attrs.get("activations")
    if activations:
        default = _DEFAULT_ACTIVATIONS[op_type]
        names = tuple((a.decode() if isinstance(a, bytes) else str(a)).lower() for a in activations)
        if len(names) % len(default) or names != default * (len(names) // len(default)):
            return (f"attribute activations={list(activations)} is not supported by the {op_type} gradient rule "
                    f"(only the default {[a.capitalize() for a in default]})")
    if op_type == "LSTM" and attrs.get("input_forget", 0):
        return "attribute input_forget=1 (coupled input and forget gates) is not supported by the LSTM gradient rule"
    return None


def _opt(ins, i):
    return ins[i] if len(ins) > i and ins[i] is not None else None


@dataclass
class _Problem:
    """The op's inputs in time-major form ([seq, batch, ...]) with defaults filled in."""

    op: str
    x: np.ndarray        # [S, B, I]
    W: np.ndarray        # [D, G·H, I]
    R: np.ndarray        # [D, G·H, H]
    bias: np.ndarray     # [D, 2·G·H]
    lengths: np.ndarray  # [B]
    h0: np.ndarray       # [D, B, H]
    c0: np.ndarray | None    # [D, B, H] (LSTM)
    peep: np.ndarray | None  # [D, 3·H] (LSTM)
    reverse: tuple[bool, ...]
    layout: int
    linear_before_reset: bool


def _problem(op: str, ins, attrs, dtype) -> _Problem:
    reason = unsupported_reason(op, attrs)
    if reason is not None:
        raise ValueError(reason)
    layout = int(attrs.get("layout", 0))
    x = np.asarray(ins[0], dtype=dtype)
    x = np.swapaxes(x, 0, 1) if layout else x
    W, R = np.asarray(ins[1], dtype=dtype), np.asarray(ins[2], dtype=dtype)
    S, B = x.shape[:2]
    D, GH, H = W.shape[0], W.shape[1], R.shape[-1]

    def state(i):
        s = _opt(ins, i)
        if s is None:
            return np.zeros((D, B, H), dtype=dtype)
        s = np.asarray(s, dtype=dtype)
        return np.swapaxes(s, 0, 1) if layout else s

    bias = _opt(ins, 3)
    lengths = _opt(ins, 4)
    direction = attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    reverse = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}[direction]
    lstm = op == "LSTM"
    peep = _opt(ins, 7) if lstm else None
    return _Problem(
        op=op, x=x, W=W, R=R,
        bias=np.zeros((D, 2 * GH), dtype=dtype) if bias is None else np.asarray(bias, dtype=dtype),
        lengths=np.full(B, S, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64).reshape(B),
        h0=state(5), c0=state(6) if lstm else None,
        peep=(np.zeros((D, 3 * H), dtype=dtype) if peep is None else np.asarray(peep, dtype=dtype)) if lstm else None,
        reverse=reverse, layout=layout, linear_before_reset=bool(attrs.get("linear_before_reset", 0)))


def _step_order(lengths: np.ndarray, S: int, reverse: bool) -> np.ndarray:
    """[S, B] time index read at each recurrence step: identity, or the first lengths[b] steps reversed.

    The permutation is its own inverse, so it also maps per-step results back to time order.
    """
    steps = np.arange(S)[:, None]
    if not reverse:
        return np.broadcast_to(steps, (S, lengths.size)).copy()
    return np.where(steps < lengths[None, :], lengths[None, :] - 1 - steps, steps)


def _reorder(a: np.ndarray, order: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, order[:, :, None], axis=0)


# ---------------------------------------------------------------- LSTM (gates i, o, f, c)

def _lstm_forward(x, W, R, bias, h0, c0, peep, mask):
    """One direction; returns the per-step cache and the outputs Y [S, B, H], Y_h, Y_c."""
    S, B, _ = x.shape
    H = R.shape[-1]
    xw = x @ W.T + (bias[: 4 * H] + bias[4 * H:])
    p_i, p_o, p_f = peep.reshape(3, H)
    cache = {k: np.empty((S, B, H), dtype=x.dtype) for k in ("i", "o", "f", "g", "c", "c_prev", "h_prev")}
    y = np.zeros((S, B, H), dtype=x.dtype)
    h, c = h0, c0
    for s in range(S):
        a = xw[s] + h @ R.T
        i = expit(a[:, :H] + p_i * c)
        f = expit(a[:, 2 * H:3 * H] + p_f * c)
        g = np.tanh(a[:, 3 * H:])
        c_new = f * c + i * g
        o = expit(a[:, H:2 * H] + p_o * c_new)
        h_new = o * np.tanh(c_new)
        for key, value in (("i", i), ("o", o), ("f", f), ("g", g), ("c", c_new), ("c_prev", c), ("h_prev", h)):
            cache[key][s] = value
        m = mask[s][:, None]
        y[s] = np.where(m, h_new, 0)
        h, c = np.where(m, h_new, h), np.where(m, c_new, c)
    return cache, (y, h, c)


def _lstm_backward(cache, R, peep, mask, gy, gh, gc):
    """Cotangents of the gate pre-activations [S, B, 4H] (iofc), of h0 and of c0."""
    S, B, H = cache["c"].shape
    p_i, p_o, p_f = peep.reshape(3, H)
    da_all = np.zeros((S, B, 4 * H), dtype=gh.dtype)
    dh, dc = gh, gc
    for s in reversed(range(S)):
        m = mask[s][:, None]
        i, o, f, g, c, c_prev = (cache[k][s] for k in ("i", "o", "f", "g", "c", "c_prev"))
        dh_new = np.where(m, dh + gy[s], 0)
        tc = np.tanh(c)
        da_o = dh_new * tc * o * (1 - o)
        dc_new = np.where(m, dc, 0) + dh_new * o * (1 - tc * tc) + da_o * p_o
        da_i = dc_new * g * i * (1 - i)
        da_f = dc_new * c_prev * f * (1 - f)
        da_c = dc_new * i * (1 - g * g)
        da = np.concatenate([da_i, da_o, da_f, da_c], axis=-1)
        da_all[s] = da
        dh = da @ R + np.where(m, 0, dh)
        dc = dc_new * f + da_i * p_i + da_f * p_f + np.where(m, 0, dc)
    return da_all, dh, dc


def _lstm_param_grads(cache, da, x):
    """dW, dR, dB, dP of one direction from the gate cotangents."""
    H = cache["c"].shape[-1]
    flat = da.reshape(-1, 4 * H)
    db = flat.sum(axis=0)
    dp = np.concatenate([(da[..., :H] * cache["c_prev"]).sum(axis=(0, 1)),
                         (da[..., H:2 * H] * cache["c"]).sum(axis=(0, 1)),
                         (da[..., 2 * H:3 * H] * cache["c_prev"]).sum(axis=(0, 1))])
    return {"W": flat.T @ x.reshape(-1, x.shape[-1]), "R": flat.T @ cache["h_prev"].reshape(-1, H),
            "B": np.concatenate([db, db]), "P": dp}


# ---------------------------------------------------------------- GRU (gates z, r, h)

def _gru_forward(x, W, R, bias, h0, mask, linear_before_reset):
    S, B, _ = x.shape
    H = R.shape[-1]
    xw = x @ W.T + bias[: 3 * H]
    rb = bias[3 * H:]
    R_zr, R_h = R[: 2 * H], R[2 * H:]
    cache = {k: np.empty((S, B, H), dtype=x.dtype) for k in ("z", "r", "hh", "h_prev", "rh")}
    y = np.zeros((S, B, H), dtype=x.dtype)
    h = h0
    for s in range(S):
        zr = expit(xw[s, :, : 2 * H] + h @ R_zr.T + rb[: 2 * H])
        z, r = zr[:, :H], zr[:, H:]
        if linear_before_reset:
            rh = h @ R_h.T + rb[2 * H:]
            hh = np.tanh(xw[s, :, 2 * H:] + r * rh)
            cache["rh"][s] = rh
        else:
            hh = np.tanh(xw[s, :, 2 * H:] + (r * h) @ R_h.T + rb[2 * H:])
        h_new = (1 - z) * hh + z * h
        for key, value in (("z", z), ("r", r), ("hh", hh), ("h_prev", h)):
            cache[key][s] = value
        m = mask[s][:, None]
        y[s] = np.where(m, h_new, 0)
        h = np.where(m, h_new, h)
    return cache, (y, h)


def _gru_backward(cache, R, mask, gy, gh, linear_before_reset):
    """Cotangents of the input-side pre-activations [S, B, 3H] (zrh), of the R_h product rows, and of h0."""
    S, B, H = cache["z"].shape
    R_zr, R_h = R[: 2 * H], R[2 * H:]
    da_all = np.zeros((S, B, 3 * H), dtype=gh.dtype)
    d_rh_rows = np.zeros((S, B, H), dtype=gh.dtype)  # cotangent of the product that R_h multiplies
    dh = gh
    for s in reversed(range(S)):
        m = mask[s][:, None]
        z, r, hh, h_prev = (cache[k][s] for k in ("z", "r", "hh", "h_prev"))
        dh_new = np.where(m, dh + gy[s], 0)
        da_h = dh_new * (1 - z) * (1 - hh * hh)
        if linear_before_reset:
            d_rows = da_h * r
            dr = da_h * cache["rh"][s]
            dh_prev = d_rows @ R_h
        else:
            d_rows = da_h
            d_rh = da_h @ R_h
            dr = d_rh * h_prev
            dh_prev = d_rh * r
        da_zr = np.concatenate([dh_new * (h_prev - hh) * z * (1 - z), dr * r * (1 - r)], axis=-1)
        da_all[s] = np.concatenate([da_zr, da_h], axis=-1)
        d_rh_rows[s] = d_rows
        dh = dh_prev + da_zr @ R_zr + dh_new * z + np.where(m, 0, dh)
    return da_all, d_rh_rows, dh


def _gru_param_grads(cache, da, d_rows, x, linear_before_reset):
    H = cache["z"].shape[-1]
    flat = da.reshape(-1, 3 * H)
    h_prev = cache["h_prev"].reshape(-1, H)
    rows_in = h_prev if linear_before_reset else (cache["r"] * cache["h_prev"]).reshape(-1, H)
    rows = d_rows.reshape(-1, H)
    dR = np.concatenate([flat[:, : 2 * H].T @ h_prev, rows.T @ rows_in])
    dB = np.concatenate([flat.sum(axis=0), flat[:, : 2 * H].sum(axis=0), rows.sum(axis=0)])
    return {"W": flat.T @ x.reshape(-1, x.shape[-1]), "R": dR, "B": dB}


# ---------------------------------------------------------------- both ops, all directions

def _direction_forward(p: _Problem, d: int, order, mask):
    x_d = _reorder(p.x, order)
    if p.op == "LSTM":
        return _lstm_forward(x_d, p.W[d], p.R[d], p.bias[d], p.h0[d], p.c0[d], p.peep[d], mask)
    return _gru_forward(x_d, p.W[d], p.R[d], p.bias[d], p.h0[d], mask, p.linear_before_reset)


def _output_grads(p: _Problem, grads, dtype):
    """Output cotangents in time-major form (zeros for outputs without one): gY [S, D, B, H], gY_h, gY_c."""
    S, B = p.x.shape[:2]
    D, H = p.W.shape[0], p.R.shape[-1]
    shapes = [(S, D, B, H), (D, B, H), (D, B, H)]
    out = []
    for k, shape in enumerate(shapes[: 3 if p.op == "LSTM" else 2]):
        g = grads[k] if len(grads) > k else None
        if g is None:
            out.append(np.zeros(shape, dtype=dtype))
            continue
        g = np.asarray(g, dtype=dtype)
        if p.layout:
            g = g.transpose(1, 2, 0, 3) if k == 0 else np.swapaxes(g, 0, 1)
        out.append(g)
    return out


def _backward(op: str, ins, grads, attrs):
    """(problem, per-input cotangents as a dict, gate cotangents [S, B, D·G·H] in time order)."""
    dtype = np.result_type(*[np.asarray(a).dtype for a in [*ins[:3], *grads] if a is not None], np.float32)
    p = _problem(op, ins, attrs, dtype)
    S, B = p.x.shape[:2]
    g_y, g_h, *g_c = _output_grads(p, grads, dtype)
    mask = np.arange(S)[:, None] < p.lengths[None, :]
    result = {"X": np.zeros_like(p.x), "W": np.zeros_like(p.W), "R": np.zeros_like(p.R), "B": np.zeros_like(p.bias),
              "h0": np.zeros_like(p.h0)}
    if op == "LSTM":
        result.update(c0=np.zeros_like(p.c0), P=np.zeros_like(p.peep))
    gates = []
    for d, reverse in enumerate(p.reverse):
        order = _step_order(p.lengths, S, reverse)
        cache, _ = _direction_forward(p, d, order, mask)
        x_d, gy_d = _reorder(p.x, order), _reorder(g_y[:, d], order)
        if op == "LSTM":
            da, result["h0"][d], result["c0"][d] = _lstm_backward(cache, p.R[d], p.peep[d], mask, gy_d, g_h[d],
                                                                  g_c[0][d])
            params = _lstm_param_grads(cache, da, x_d)
        else:
            da, d_rows, result["h0"][d] = _gru_backward(cache, p.R[d], mask, gy_d, g_h[d], p.linear_before_reset)
            params = _gru_param_grads(cache, da, d_rows, x_d, p.linear_before_reset)
        for key, value in params.items():
            result[key][d] = value
        da = _reorder(da, order)
        result["X"] += da @ p.W[d]
        gates.append(da)
    return p, result, np.concatenate(gates, axis=-1)


def _batch_axis_back(p: _Problem, a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, 0, 1) if p.layout else a


def recurrent_vjp(op: str):
    """The VJP rule of LSTM or GRU (inputs X, W, R, B, sequence_lens, initial_h[, initial_c, P])."""
    names = ["X", "W", "R", "B", None, "h0", "c0", "P"] if op == "LSTM" else ["X", "W", "R", "B", None, "h0"]

    def rule(ins, outs, attrs, grads, opset, wanted):
        p, result, _ = _backward(op, ins, grads, attrs)
        out = [None] * len(ins)
        for i in wanted:
            name = names[i] if i < len(names) else None
            if name is None or ins[i] is None:
                continue
            value = result[name]
            out[i] = _batch_axis_back(p, value) if name in ("X", "h0", "c0") else value
        return out
    return rule


def recurrent_forward(op: str, ins, attrs) -> list[np.ndarray]:
    """The op's outputs (Y, Y_h[, Y_c]) as the rules recompute them, in the op's layout (for checking)."""
    dtype = np.result_type(*[np.asarray(a).dtype for a in ins[:3]], np.float32)
    p = _problem(op, ins, attrs, dtype)
    S = p.x.shape[0]
    mask = np.arange(S)[:, None] < p.lengths[None, :]
    per_direction = []
    for d, reverse in enumerate(p.reverse):
        order = _step_order(p.lengths, S, reverse)
        _, (y, *states) = _direction_forward(p, d, order, mask)
        per_direction.append((_reorder(y, order), *states))
    y = np.stack([r[0] for r in per_direction], axis=1)  # [S, D, B, H]
    states = [np.stack([r[k] for r in per_direction]) for k in range(1, len(per_direction[0]))]
    if p.layout:
        return [y.transpose(2, 0, 1, 3)] + [np.swapaxes(s, 0, 1) for s in states]
    return [y] + states


def input_projection_grads(op: str, ins, attrs, grads) -> np.ndarray:
    """Cotangent of the input projection X_t W_dᵀ, [batch, seq, dirs·gates·hidden] (batch first, any layout).

    Column order is the stacked view of W (sites.recurrent.stacked_view): direction-major, then the op's
    gate order. Steps past a sequence's length get zeros.
    """
    _, _, gates = _backward(op, ins, grads, attrs)
    return np.swapaxes(gates, 0, 1)
