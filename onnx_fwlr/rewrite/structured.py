"""ONNX node builders for doped structured matrices: y = x @ (Σ_s A_s⊗B_s + D) or y = x @ (A B + D).

Every builder takes the input name x (shape [..., K], any number of leading dims), the output name y
([..., N], same leading dims) and a name prefix; node and intermediate names are "{prefix}/<role>", and
initializer names "{weight_prefix}/<role>" (weight_prefix defaults to prefix). Initializers depend only on
the weight, never on x, so several uses of one weight built with one weight_prefix share them. The same
call always builds the same graph. Builders return (nodes, initializers)
for the caller to splice into its graph. Only standard ops are used; see `min_opset`.

Kronecker convention is numpy.kron: A [s, m1, n1], B [s, m2, n2], K = m1·m2, N = n1·n2, and with x read
as X [m1, m2] (row-major) the product is y = Σ_s A_sᵀ X B_s read row-major as [n1·n2].
Doping D is kept as COO (rows, cols, vals): ONNX Runtime densifies sparse initializers, which would
throw the saving away.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from onnx_fwlr.errors import FwlrError

# ScatterND gained reduction="add" in opset 16; everything else here (Slice with tensor inputs,
# ConstantOfShape, Reshape with a shape input) is available from opset 10.
_MIN_OPSET_STRUCTURE = 10
_MIN_OPSET_DOPING = 16


def min_opset(doping: bool) -> int:
    """Lowest default-domain opset the built nodes need: 16 with a doping term, else 10."""
    return _MIN_OPSET_DOPING if doping else _MIN_OPSET_STRUCTURE


def kron_order(m1: int, m2: int, n1: int, n2: int, terms: int) -> str:
    """'b_first' or 'a_first', whichever needs fewer multiply-adds per row (ties: 'b_first').

    b_first: s·m1·n2·(m2 + n1)   a_first: s·m2·n1·(m1 + n2)
    """
    b_first = terms * m1 * n2 * (m2 + n1)
    a_first = terms * m2 * n1 * (m1 + n2)
    return "a_first" if a_first < b_first else "b_first"


class _Nodes:
    """Collects nodes and initializers under one name prefix."""

    def __init__(self, prefix: str, float_dtype, weight_prefix: str | None = None):
        self.prefix = prefix
        self.weight_prefix = weight_prefix or prefix
        self.float_dtype = np.dtype(float_dtype)
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []

    def const(self, role: str, array: np.ndarray) -> str:
        name = f"{self.weight_prefix}/{role}"
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, role: str, array: np.ndarray) -> str:
        return self.const(role, np.asarray(array).astype(self.float_dtype))

    def ints(self, role: str, values) -> str:
        return self.const(role, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], role: str, output: str | None = None, **attrs) -> str:
        name = f"{self.prefix}/{role}"
        out = output or name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def result(self) -> tuple[list[NodeProto], list[TensorProto]]:
        return self.nodes, self.initializers


def _restore_leading_dims(b: _Nodes, x: str, flat: str, N: int, y: str) -> str:
    """Reshape `flat` ([T, N] or [T, n1, n2]) to x's leading dims + [N], written to y."""
    shape = b.op("Shape", [x], "x_shape")
    lead = b.op("Slice", [shape, b.ints("zero", [0]), b.ints("minus_one", [-1]), b.ints("zero_axis", [0])], "lead_dims")
    out_shape = b.op("Concat", [lead, b.ints("n", [N])], "out_shape", axis=0)
    return b.op("Reshape", [flat, out_shape], "restore", output=y)


def _kron_rows(b: _Nodes, x: str, A: np.ndarray, B: np.ndarray, order: str | None) -> str:
    """[T, n1, n2] = Σ_s A_sᵀ X_t B_s for every row X_t of x viewed as [T, m1, m2].

    The s terms are stacked so both contractions are single MatMuls with the term index folded into
    the contracted axis, and every step is a Reshape (no Transpose):
      b_first: [T,m1,m2] @ Bcat[m2, s·n2] -> [T,m1,s·n2] =reshape=> [T, m1·s, n2];
               AcatT[n1, m1·s] @ that -> [T, n1, n2]      (contracts i1 and s together)
      a_first: AstkT[n1·s, m1] @ [T,m1,m2] -> [T, n1·s, m2] =reshape=> [T, n1, s·m2];
               that @ Bstk[s·m2, n2] -> [T, n1, n2]       (contracts s and i2 together)
    Stacking costs no extra multiply-adds over s separate chains and keeps the node count at 2 MatMuls.
    b_first's first MatMul is one flat GEMM; the other MatMul broadcasts a 2-D weight over T.
    """
    s, m1, n1 = A.shape
    _, m2, n2 = B.shape
    order = order or kron_order(m1, m2, n1, n2, s)
    x3 = b.op("Reshape", [x, b.ints("x3_shape", [-1, m1, m2])], "x3")
    if order == "b_first":
        b_cat = b.weight("B_cat", B.transpose(1, 0, 2).reshape(m2, s * n2))  # [i2, (s, j2)]
        a_cat_t = b.weight("A_cat_T", A.transpose(2, 1, 0).reshape(n1, m1 * s))  # [j1, (i1, s)]
        z = b.op("MatMul", [x3, b_cat], "xB")
        if s > 1:
            z = b.op("Reshape", [z, b.ints("xB_shape", [-1, m1 * s, n2])], "xB_terms")
        return b.op("MatMul", [a_cat_t, z], "AxB")
    if order == "a_first":
        a_stk_t = b.weight("A_stack_T", A.transpose(2, 0, 1).reshape(n1 * s, m1))  # [(j1, s), i1]
        b_stk = b.weight("B_stack", B.reshape(s * m2, n2))  # [(s, i2), j2]
        q = b.op("MatMul", [a_stk_t, x3], "Ax")
        if s > 1:
            q = b.op("Reshape", [q, b.ints("Ax_shape", [-1, n1, s * m2])], "Ax_terms")
        return b.op("MatMul", [q, b_stk], "AxB")
    raise FwlrError(f"Unknown Kronecker contraction order {order!r}; use 'b_first', 'a_first' or None.")


def _doping_rows(b: _Nodes, x2d: str, rows, cols, vals, N: int, index_dtype) -> str:
    """[T, N] = x2d @ D for D in COO, working on x transposed so every copy moves whole rows of T values.

    xᵀ [K, T] -Gather(rows)-> [nnz, T] -Mul(vals [nnz, 1])-> -ScatterND(cols, add)-> [N, T] -Transpose->.
    Measured on ONNX Runtime CPU (K = N = 1024, T = 256, 1 % doping), this is ~5x faster than the
    element-wise form Gather(x, rows, axis=1) -> ScatterElements(axis=1), whose Gather and Scatter copy
    one float at a time; at T = 1 both are equal. reduction="add" because entries of D may share a column.
    Half-precision weights keep their values in half precision but scatter in float32 (ONNX Runtime's CPU
    ScatterND has no float16 kernel for reduction="add").
    """
    half = b.float_dtype.itemsize < 4
    r = b.const("dope_rows", np.asarray(rows).astype(index_dtype))
    # ScatterND takes int64 indices only; store the narrow type and widen at run time (ORT folds this Cast).
    c_stored = b.const("dope_cols", np.asarray(cols).astype(index_dtype).reshape(-1, 1))
    c = b.op("Cast", [c_stored], "dope_cols_i64", to=TensorProto.INT64) if index_dtype != np.int64 else c_stored
    v = b.weight("dope_vals", np.asarray(vals).reshape(-1, 1))
    if half:
        v = b.op("Cast", [v], "dope_vals_f32", to=TensorProto.FLOAT)
        x2d = b.op("Cast", [x2d], "dope_x_f32", to=TensorProto.FLOAT)
    x_t = b.op("Transpose", [x2d], "dope_x_T", perm=[1, 0])  # [K, T]
    picked = b.op("Gather", [x_t, r], "dope_x", axis=0)  # [nnz, T]
    updates = b.op("Mul", [picked, v], "dope_xv")
    t_bounds = [b.ints("dope_zero", [0]), b.ints("dope_one", [1]), b.ints("dope_axis", [0])]
    t = b.op("Slice", [b.op("Shape", [x2d], "dope_x_shape"), *t_bounds], "dope_t")
    zeros = b.op(
        "ConstantOfShape",
        [b.op("Concat", [b.ints("dope_n", [N]), t], "dope_zeros_shape", axis=0)],
        "dope_zeros",
        value=numpy_helper.from_array(np.zeros(1, dtype=np.float32 if half else b.float_dtype)),
    )  # [N, T]
    y_t = b.op("ScatterND", [zeros, c, updates], "dope_scatter", reduction="add")
    y = b.op("Transpose", [y_t], "dope_y", perm=[1, 0])
    if half:
        y = b.op("Cast", [y], "dope_y_half", to=helper.np_dtype_to_tensor_dtype(b.float_dtype))
    return y


def _index_dtype(K: int, N: int, index_dtype):
    if index_dtype is not None:
        return np.dtype(index_dtype)
    return np.dtype(np.int32) if max(K, N) < 2**31 else np.dtype(np.int64)


def _checked_coo(rows, cols, vals, K: int, N: int):
    if rows is None or len(rows) == 0:
        return None
    rows, cols, vals = np.asarray(rows), np.asarray(cols), np.asarray(vals)
    if not rows.shape == cols.shape == vals.shape or rows.ndim != 1:
        raise FwlrError("Doping rows, cols and vals must be 1-D arrays of one length; pass the COO from dope().")
    if rows.min() < 0 or rows.max() >= K or cols.min() < 0 or cols.max() >= N:
        raise FwlrError(f"Doping indices fall outside the [{K}, {N}] weight; pass the COO built for this weight.")
    return rows, cols, vals


def _check_kron(A: np.ndarray, B: np.ndarray) -> None:
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0]:
        raise FwlrError(f"Expected A [s, m1, n1] and B [s, m2, n2] with the same s, got {A.shape} and {B.shape}.")


def build_doped_kron(
    x: str, y: str, prefix: str, A, B, rows=None, cols=None, vals=None,
    order: str | None = None, float_dtype=np.float32, index_dtype=None, weight_prefix: str | None = None,
):
    """Nodes for y = x @ (Σ_s A_s⊗B_s + D); D as COO (rows into K, cols into N), omitted when empty.

    order: 'b_first' | 'a_first' | None (cheaper by multiply-adds, see kron_order).
    """
    A, B = np.asarray(A), np.asarray(B)
    _check_kron(A, B)
    K, N = A.shape[1] * B.shape[1], A.shape[2] * B.shape[2]
    coo = _checked_coo(rows, cols, vals, K, N)
    b = _Nodes(prefix, float_dtype, weight_prefix)
    structured = _kron_rows(b, x, A, B, order)  # [T, n1, n2]
    if coo is not None:
        flat = b.op("Reshape", [structured, b.ints("flat_shape", [-1, N])], "kron_2d")
        x2d = b.op("Reshape", [x, b.ints("x2d_shape", [-1, K])], "x2d")
        structured = b.op("Add", [flat, _doping_rows(b, x2d, *coo, N, _index_dtype(K, N, index_dtype))], "sum")
    _restore_leading_dims(b, x, structured, N, y)
    return b.result()


def build_kron_sum(
    x: str, y: str, prefix: str, A, B, order: str | None = None, float_dtype=np.float32,
    weight_prefix: str | None = None,
):
    """Nodes for y = x @ Σ_s A_s⊗B_s (no doping)."""
    return build_doped_kron(x, y, prefix, A, B, order=order, float_dtype=float_dtype, weight_prefix=weight_prefix)


def build_doping(
    x: str, y: str, prefix: str, rows, cols, vals, K: int, N: int, float_dtype=np.float32, index_dtype=None,
    weight_prefix: str | None = None,
):
    """Nodes for y = x @ D alone, D [K, N] given as COO with at least one entry."""
    coo = _checked_coo(rows, cols, vals, K, N)
    if coo is None:
        raise FwlrError("The doping term has no entries; skip it instead of building an empty one.")
    b = _Nodes(prefix, float_dtype, weight_prefix)
    x2d = b.op("Reshape", [x, b.ints("x2d_shape", [-1, K])], "x2d")
    _restore_leading_dims(b, x, _doping_rows(b, x2d, *coo, N, _index_dtype(K, N, index_dtype)), N, y)
    return b.result()


def build_doped_low_rank(
    x: str, y: str, prefix: str, A, B, rows=None, cols=None, vals=None, float_dtype=np.float32, index_dtype=None,
    weight_prefix: str | None = None,
):
    """Nodes for y = (x @ A) @ B + x @ D with A [K, r], B [r, N]; D as COO, omitted when empty."""
    A, B = np.asarray(A), np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
        raise FwlrError(f"Expected A [K, r] and B [r, N], got {A.shape} and {B.shape}.")
    K, N = A.shape[0], B.shape[1]
    coo = _checked_coo(rows, cols, vals, K, N)
    b = _Nodes(prefix, float_dtype, weight_prefix)
    if coo is None:
        xa = b.op("MatMul", [x, b.weight("A", A)], "xA")
        b.op("MatMul", [xa, b.weight("B", B)], "xAB", output=y)
        return b.result()
    x2d = b.op("Reshape", [x, b.ints("x2d_shape", [-1, K])], "x2d")
    xa = b.op("MatMul", [x2d, b.weight("A", A)], "xA")
    xab = b.op("MatMul", [xa, b.weight("B", B)], "xAB")
    total = b.op("Add", [xab, _doping_rows(b, x2d, *coo, N, _index_dtype(K, N, index_dtype))], "sum")
    _restore_leading_dims(b, x, total, N, y)
    return b.result()
