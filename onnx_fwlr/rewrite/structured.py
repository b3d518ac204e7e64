"""ONNX node builders for doped structured matrices: y = x @ (Σ_s A_s⊗B_s + D) or y = x @ (A B + D).

Every builder takes the input name x (shape [..., K], any number of leading dims), the output name y
([..., N], same leading dims) and a name prefix; node and intermediate names are "{prefix}/<role>", and
initializer names "{weight_prefix}/<role>" (weight_prefix defaults to prefix). Initializers depend only on
the weight (and the form), never on x, so several uses of one weight built with one weight_prefix share them.
The same call always builds the same graph. Builders return (nodes, initializers)
for the caller to splice into its graph. Only standard ops are used; see `min_opset`.

Kronecker convention is numpy.kron: A [s, m1, n1], B [s, m2, n2], K = m1·m2, N = n1·n2, and with x read
as X [m1, m2] (row-major) the product is y = Σ_s A_sᵀ X B_s read row-major as [n1·n2].
Doping D is kept as COO (rows, cols, vals): ONNX Runtime densifies sparse initializers, which would
throw the saving away.

Storage is one canonical layout whatever the form (`stored_structure` reads it back): "A" and "B" as given
(Kronecker [s, m1, n1] / [s, m2, n2]; low rank [K, r] / [r, N]), "dope_rows" and "dope_cols" (int32 when the
shape allows) and "dope_vals", sorted row-major. Each form derives the layout its MatMuls want with Transpose /
Reshape / Gather nodes on those constants, which ONNX Runtime folds when it loads the model (so the run-time
cost is the form's, and refine trains the canonical tensors through the same nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.structured import Coo, KronSum, LowRank

# ScatterND / ScatterElements gained reduction="add" in opset 16; everything else here (Slice with tensor
# inputs, ConstantOfShape, Reshape with a shape input, Compress, CumSum) is available from opset 11, and the
# structure alone from opset 10.
_MIN_OPSET_STRUCTURE = 10
_MIN_OPSET_DOPING = 16
DOPING_FORMS = ("scatternd", "elements", "dense_rows")
ORDERS = ("b_first", "a_first")


@dataclass(frozen=True)
class Form:
    """How one structured site is realised in ONNX; every form computes the same x @ W' (tests).

    order: Kronecker contraction order, 'b_first' | 'a_first' | None (fewer multiply-adds, `kron_order`).
    flat: the Kronecker contraction that would broadcast a 2-D weight over the rows (one small GEMM per row)
          is done as one flat GEMM between two Transposes instead.
    stacked: all Kronecker terms in the two MatMuls (True), or one chain per term added with Sum.
    doping: 'scatternd' (rows of xᵀ gathered, scaled, ScatterND-added: copies whole rows of T values),
            'elements' (Gather / ScatterElements per entry, scattered straight into the structure's output),
            'dense_rows' (the rows D touches as a small dense matrix built at load time, and one GEMM).
    """

    order: str | None = None
    flat: bool = False
    stacked: bool = True
    doping: str = "scatternd"

    def label(self, kron: bool = True, doped: bool = True) -> str:
        parts = []
        if kron:
            parts.append(f"{self.order or 'auto'}{', flat' if self.flat else ''}{'' if self.stacked else ', per term'}")
        if doped:
            parts.append(f"doping {self.doping}")
        return "; ".join(parts) or "plain"


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


def kron_intermediate(shape: tuple[int, int, int, int], terms: int, order: str) -> int:
    """Floats per row of the intermediate between the two Kronecker MatMuls (its memory traffic)."""
    m1, m2, n1, n2 = shape
    return terms * (m1 * n2 if order == "b_first" else m2 * n1)


class _Nodes:
    """Collects nodes and initializers under one name prefix."""

    def __init__(self, prefix: str, float_dtype, weight_prefix: str | None = None):
        self.prefix = prefix
        self.weight_prefix = weight_prefix or prefix
        self.float_dtype = np.dtype(float_dtype)
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: set[str] = set()

    def const(self, role: str, array: np.ndarray) -> str:
        name = f"{self.weight_prefix}/{role}"
        if name not in self._constants:  # a constant asked for twice (per-term chains) is stored once
            self._constants.add(name)
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


def _kron_rows(b: _Nodes, x: str, A: np.ndarray, B: np.ndarray, form: Form) -> str:
    """[T, n1, n2] = Σ_s A_sᵀ X_t B_s for every row X_t of x viewed as [T, m1, m2].

    Stacked (the default), the s terms go through two MatMuls with the term index folded into the
    contracted axis: no extra multiply-adds over s separate chains, 2 MatMuls instead of 2s.
      b_first: [T,m1,m2] @ Bcat[m2, s·n2] -> [T, m1·s, n2]; then A contracts (i1, s) together
      a_first: AstkT[n1·s, m1] @ [T,m1,m2] -> [T, n1, s·m2]; then Bstk[s·m2, n2] contracts (s, i2)
    One of each pair is a flat GEMM; the other broadcasts a 2-D weight over T (T small GEMMs), unless
    form.flat, which makes it flat too at the price of two Transposes of the intermediate.
    """
    s, m1, n1 = A.shape
    _, m2, n2 = B.shape
    order = form.order or kron_order(m1, m2, n1, n2, s)
    if order not in ORDERS:
        raise FwlrError(f"Unknown Kronecker contraction order {order!r}; use 'b_first', 'a_first' or None.")
    contract = _b_first if order == "b_first" else _a_first
    a, bb = b.weight("A", A), b.weight("B", B)
    x3 = b.op("Reshape", [x, b.ints("x3_shape", [-1, m1, m2])], "x3")
    if form.stacked or s == 1:
        return contract(b, x3, a, bb, (s, m1, m2, n1, n2), form.flat, "")
    terms = []
    for i in range(s):
        index = b.ints(f"term{i}", [i])
        a_i = b.op("Gather", [a, index], f"term{i}/A", axis=0)
        b_i = b.op("Gather", [bb, index], f"term{i}/B", axis=0)
        terms.append(contract(b, x3, a_i, b_i, (1, m1, m2, n1, n2), form.flat, f"term{i}/"))
    return b.op("Sum", terms, "terms")


def _b_first(b: _Nodes, x3: str, a: str, bb: str, dims, flat: bool, tag: str) -> str:
    s, m1, m2, n1, n2 = dims
    b_cat = b.op("Reshape", [b.op("Transpose", [bb], f"{tag}B_T", perm=[1, 0, 2]), b.ints("B_cat_shape", [m2, s * n2])],
                 f"{tag}B_cat")  # [i2, (s, j2)]
    z = b.op("MatMul", [x3, b_cat], f"{tag}xB")  # [T, m1, s·n2]
    if s > 1:
        z = b.op("Reshape", [z, b.ints("xB_shape", [-1, m1 * s, n2])], f"{tag}xB_terms")  # [T, (i1, s), n2]
    if not flat:
        a_cat_t = b.op("Reshape", [b.op("Transpose", [a], f"{tag}A_T", perm=[2, 1, 0]),
                                   b.ints("A_cat_T_shape", [n1, m1 * s])], f"{tag}A_cat_T")  # [j1, (i1, s)]
        return b.op("MatMul", [a_cat_t, z], f"{tag}AxB")
    a_cat = b.op("Reshape", [b.op("Transpose", [a], f"{tag}A_T", perm=[1, 0, 2]), b.ints("A_cat_shape", [m1 * s, n1])],
                 f"{tag}A_cat")  # [(i1, s), j1]
    zt = b.op("Transpose", [z], f"{tag}xB_T", perm=[0, 2, 1])  # [T, n2, (i1, s)]
    w = b.op("MatMul", [zt, a_cat], f"{tag}AxB_T")  # [T, n2, n1]
    return b.op("Transpose", [w], f"{tag}AxB", perm=[0, 2, 1])


def _a_first(b: _Nodes, x3: str, a: str, bb: str, dims, flat: bool, tag: str) -> str:
    s, m1, m2, n1, n2 = dims
    if not flat:
        a_stk_t = b.op("Reshape", [b.op("Transpose", [a], f"{tag}A_T", perm=[2, 0, 1]),
                                   b.ints("A_stack_T_shape", [n1 * s, m1])], f"{tag}A_stack_T")  # [(j1, s), i1]
        q = b.op("MatMul", [a_stk_t, x3], f"{tag}Ax")  # [T, (j1, s), m2]
    else:
        a_stk = b.op("Reshape", [b.op("Transpose", [a], f"{tag}A_T", perm=[1, 2, 0]),
                                 b.ints("A_stack_shape", [m1, n1 * s])], f"{tag}A_stack")  # [i1, (j1, s)]
        x3t = b.op("Transpose", [x3], f"{tag}x3_T", perm=[0, 2, 1])  # [T, m2, m1]
        q = b.op("MatMul", [x3t, a_stk], f"{tag}Ax_T")  # [T, m2, (j1, s)]
        q = b.op("Reshape", [q, b.ints("Ax_4d_shape", [-1, m2, n1, s])], f"{tag}Ax_4d")
        q = b.op("Transpose", [q], f"{tag}Ax", perm=[0, 2, 3, 1])  # [T, n1, s, m2]
    if s > 1 or flat:
        q = b.op("Reshape", [q, b.ints("Ax_shape", [-1, n1, s * m2])], f"{tag}Ax_terms")  # [T, n1, (s, i2)]
    b_stk = b.op("Reshape", [bb, b.ints("B_stack_shape", [s * m2, n2])], f"{tag}B_stack")  # [(s, i2), j2]
    return b.op("MatMul", [q, b_stk], f"{tag}AxB")


class _Coo:
    """The doping term's stored tensors and what the forms derive from them."""

    def __init__(self, b: _Nodes, rows, cols, vals, K: int, index_dtype):
        self.rows_np, self.nnz, self.K = np.asarray(rows), len(rows), K
        self.rows = b.const("dope_rows", np.asarray(rows).astype(index_dtype))
        self.cols = b.const("dope_cols", np.asarray(cols).astype(index_dtype))
        self.vals = b.weight("dope_vals", np.asarray(vals))
        self.wide = index_dtype != np.int64  # ScatterND / ScatterElements take int64 only: widen (folded)


def _int64(b: _Nodes, name: str, role: str, wide: bool) -> str:
    return b.op("Cast", [name], role, to=TensorProto.INT64) if wide else name


def _doping(b: _Nodes, x2d: str, coo: _Coo, N: int, structured: str | None, form: Form) -> str:
    """[T, N] = structured + x2d @ D (or x2d @ D alone when structured is None), D in the form's way.

    Half-precision weights keep their values in half precision but the doping runs in float32 (ONNX Runtime's
    CPU ScatterND / ScatterElements have no float16 kernel for reduction="add").
    """
    half = b.float_dtype.itemsize < 4
    vals = coo.vals
    if half:
        vals = b.op("Cast", [vals], "dope_vals_f32", to=TensorProto.FLOAT)
        x2d = b.op("Cast", [x2d], "dope_x_f32", to=TensorProto.FLOAT)
        if structured is not None:
            structured = b.op("Cast", [structured], "structure_f32", to=TensorProto.FLOAT)
    if form.doping == "scatternd":
        y = _doping_scatternd(b, x2d, coo, vals, N, half)
        y = y if structured is None else b.op("Add", [structured, y], "sum")
    elif form.doping == "elements":
        y = _doping_elements(b, x2d, coo, vals, N, structured, half)
    elif form.doping == "dense_rows":
        y = _doping_dense_rows(b, x2d, coo, vals, N, half)
        y = y if structured is None else b.op("Add", [structured, y], "sum")
    else:
        raise FwlrError(f"Unknown doping form {form.doping!r}; use one of {', '.join(DOPING_FORMS)}.")
    if half:
        y = b.op("Cast", [y], "dope_y_half", to=helper.np_dtype_to_tensor_dtype(b.float_dtype))
    return y


def _zeros(b: _Nodes, shape: str, role: str, half: bool) -> str:
    value = numpy_helper.from_array(np.zeros(1, dtype=np.float32 if half else b.float_dtype))
    return b.op("ConstantOfShape", [shape], role, value=value)


def _rows_of(b: _Nodes, x2d: str, role: str) -> str:
    """x2d's row count T as a 1-D tensor."""
    bounds = [b.ints("dope_zero", [0]), b.ints("dope_one", [1]), b.ints("dope_axis", [0])]
    return b.op("Slice", [b.op("Shape", [x2d], f"{role}_shape"), *bounds], role)


def _doping_scatternd(b: _Nodes, x2d: str, coo: _Coo, vals: str, N: int, half: bool) -> str:
    """xᵀ [K, T] -Gather(rows)-> [nnz, T] -Mul(vals [nnz, 1])-> -ScatterND(cols, add)-> [N, T] -Transpose->.

    Every copy moves a whole row of T values: measured ~5x faster on ONNX Runtime CPU than the element-wise
    form at K = N = 1024, T = 256, 1 % doping; at T = 1 both are equal. reduction="add" because entries of D
    may share a column.
    """
    rows = coo.rows  # Gather takes int32 indices
    cols = b.op("Reshape", [_int64(b, coo.cols, "dope_cols_i64", coo.wide), b.ints("dope_column", [-1, 1])],
                "dope_cols_nd")
    column = b.op("Reshape", [vals, b.ints("dope_column", [-1, 1])], "dope_vals_column")
    x_t = b.op("Transpose", [x2d], "dope_x_T", perm=[1, 0])  # [K, T]
    picked = b.op("Gather", [x_t, rows], "dope_x", axis=0)  # [nnz, T]
    updates = b.op("Mul", [picked, column], "dope_xv")
    shape = b.op("Concat", [b.ints("dope_n", [N]), _rows_of(b, x2d, "dope_t")], "dope_zeros_shape", axis=0)
    y_t = b.op("ScatterND", [_zeros(b, shape, "dope_zeros", half), cols, updates], "dope_scatter", reduction="add")
    return b.op("Transpose", [y_t], "dope_y", perm=[1, 0])


def _doping_elements(b: _Nodes, x2d: str, coo: _Coo, vals: str, N: int, structured: str | None, half: bool) -> str:
    """Gather(x, rows, axis=1) [T, nnz] · vals, ScatterElements-added at the columns into the structure's
    output [T, N] (no separate Add). Copies one float at a time: cheap at few rows, slow at many."""
    picked = b.op("Gather", [x2d, coo.rows], "dope_x", axis=1)  # [T, nnz]
    updates = b.op("Mul", [picked, vals], "dope_xv")
    cols = b.op("Reshape", [_int64(b, coo.cols, "dope_cols_i64", coo.wide), b.ints("dope_row", [1, -1])],
                "dope_cols_row")
    indices = b.op("Expand", [cols, b.op("Shape", [picked], "dope_x_shape")], "dope_cols_expanded")
    if structured is None:
        shape = b.op("Concat", [_rows_of(b, x2d, "dope_t"), b.ints("dope_n", [N])], "dope_zeros_shape", axis=0)
        structured = _zeros(b, shape, "dope_zeros", half)
    return b.op("ScatterElements", [structured, indices, updates], "dope_scatter", axis=1, reduction="add")


def _doping_dense_rows(b: _Nodes, x2d: str, coo: _Coo, vals: str, N: int, half: bool) -> str:
    """x[:, R] @ D[R, :] with R the rows D touches: D[R, :] is built from the COO by nodes on constants only
    (unique rows by Compress, local row numbers by CumSum), which ONNX Runtime folds at load time, so the
    run-time cost is one Gather of |R| columns and one [T, |R|] x [|R|, N] GEMM. Needs rows sorted."""
    rows = _int64(b, coo.rows, "dope_rows_i64", coo.wide)
    cols = _int64(b, coo.cols, "dope_cols_i64", coo.wide)
    first = b.const("dope_first", np.array([True]))
    if coo.nnz > 1:
        later = b.op("Slice", [rows, b.ints("dope_one", [1]), b.ints("dope_nnz", [coo.nnz]), b.ints("dope_axis", [0])],
                     "dope_rows_later")
        earlier = b.op("Slice", [rows, b.ints("dope_zero", [0]), b.ints("dope_nnz_less", [coo.nnz - 1]),
                                 b.ints("dope_axis", [0])], "dope_rows_earlier")
        change = b.op("Not", [b.op("Equal", [later, earlier], "dope_same_row")], "dope_new_row")
        first = b.op("Concat", [first, change], "dope_row_starts", axis=0)
    starts = b.op("Cast", [first], "dope_row_starts_i64", to=TensorProto.INT64)
    local = b.op("Sub", [b.op("CumSum", [starts, b.const("dope_scalar_axis", np.array(0, np.int64))], "dope_row_count"),
                         b.ints("dope_one", [1])], "dope_local_rows")
    column = b.ints("dope_column", [-1, 1])
    local_column = b.op("Reshape", [local, column], "dope_local_column")
    # |R| = last local row + 1; R[local[i]] = rows[i] (entries of one row write the same value). Not Compress:
    # ONNX Runtime does not fold it, and then nothing after it would be folded either.
    count = b.op("Add", [b.op("Slice", [local, b.ints("dope_minus_one", [-1]), b.ints("dope_nnz", [coo.nnz]),
                                        b.ints("dope_axis", [0])], "dope_last_local"), b.ints("dope_one", [1])],
                 "dope_unique_count")
    unique = b.op("ScatterND", [b.op("ConstantOfShape", [count], "dope_unique_zeros",
                                     value=numpy_helper.from_array(np.zeros(1, np.int64))), local_column, rows],
                  "dope_unique_rows")
    index = b.op("Concat", [local_column, b.op("Reshape", [cols, column], "dope_cols_column")], "dope_index", axis=1)
    shape = b.op("Concat", [count, b.ints("dope_n", [N])], "dope_rows_shape", axis=0)
    dense = b.op("ScatterND", [_zeros(b, shape, "dope_rows_zeros", half), index, vals], "dope_dense_rows")
    picked = x2d
    if len(np.unique(coo.rows_np)) < coo.K:  # all rows touched: no Gather
        picked = b.op("Gather", [x2d, unique], "dope_x", axis=1)  # [T, |R|]
    return b.op("MatMul", [picked, dense], "dope_y")


def _index_dtype(K: int, N: int, index_dtype):
    if index_dtype is not None:
        return np.dtype(index_dtype)
    return np.dtype(np.int32) if max(K, N) < 2**31 else np.dtype(np.int64)


def _checked_coo(rows, cols, vals, K: int, N: int):
    """The COO sorted row-major (the stored order, which dense_rows needs), or None when empty."""
    if rows is None or len(rows) == 0:
        return None
    rows, cols, vals = np.asarray(rows), np.asarray(cols), np.asarray(vals)
    if not rows.shape == cols.shape == vals.shape or rows.ndim != 1:
        raise FwlrError("Doping rows, cols and vals must be 1-D arrays of one length; pass the COO from dope().")
    if rows.min() < 0 or rows.max() >= K or cols.min() < 0 or cols.max() >= N:
        raise FwlrError(f"Doping indices fall outside the [{K}, {N}] weight; pass the COO built for this weight.")
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    if len(rows) > 1 and np.any((np.diff(rows) == 0) & (np.diff(cols) == 0)):
        raise FwlrError("Doping entries repeat a (row, column) position; pass each entry of D once.")
    return rows, cols, vals


def _check_kron(A: np.ndarray, B: np.ndarray) -> None:
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0]:
        raise FwlrError(f"Expected A [s, m1, n1] and B [s, m2, n2] with the same s, got {A.shape} and {B.shape}.")


def _check_form(form: Form | None, order: str | None) -> Form:
    form = form or Form()
    if order is not None:
        form = replace(form, order=order)
    if form.doping not in DOPING_FORMS:
        raise FwlrError(f"Unknown doping form {form.doping!r}; use one of {', '.join(DOPING_FORMS)}.")
    return form


def build_doped_kron(
    x: str, y: str, prefix: str, A, B, rows=None, cols=None, vals=None,
    order: str | None = None, float_dtype=np.float32, index_dtype=None, weight_prefix: str | None = None,
    form: Form | None = None,
):
    """Nodes for y = x @ (Σ_s A_s⊗B_s + D); D as COO (rows into K, cols into N), omitted when empty.

    form: how to realise it (Form; default: contraction order by multiply-adds, stacked, batched, ScatterND
    doping); order: 'b_first' | 'a_first' overrides the form's order.
    """
    A, B = np.asarray(A), np.asarray(B)
    _check_kron(A, B)
    form = _check_form(form, order)
    K, N = A.shape[1] * B.shape[1], A.shape[2] * B.shape[2]
    coo = _checked_coo(rows, cols, vals, K, N)
    b = _Nodes(prefix, float_dtype, weight_prefix)
    structured = _kron_rows(b, x, A, B, form)  # [T, n1, n2]
    if coo is not None:
        flat = b.op("Reshape", [structured, b.ints("flat_shape", [-1, N])], "kron_2d")
        x2d = b.op("Reshape", [x, b.ints("x2d_shape", [-1, K])], "x2d")
        structured = _doping(b, x2d, _Coo(b, *coo, K, _index_dtype(K, N, index_dtype)), N, flat, form)
    _restore_leading_dims(b, x, structured, N, y)
    return b.result()


def build_kron_sum(
    x: str, y: str, prefix: str, A, B, order: str | None = None, float_dtype=np.float32,
    weight_prefix: str | None = None, form: Form | None = None,
):
    """Nodes for y = x @ Σ_s A_s⊗B_s (no doping)."""
    return build_doped_kron(x, y, prefix, A, B, order=order, float_dtype=float_dtype, weight_prefix=weight_prefix,
                            form=form)


def build_doping(
    x: str, y: str, prefix: str, rows, cols, vals, K: int, N: int, float_dtype=np.float32, index_dtype=None,
    weight_prefix: str | None = None, form: Form | None = None,
):
    """Nodes for y = x @ D alone, D [K, N] given as COO with at least one entry."""
    coo = _checked_coo(rows, cols, vals, K, N)
    if coo is None:
        raise FwlrError("The doping term has no entries; skip it instead of building an empty one.")
    form = _check_form(form, None)
    b = _Nodes(prefix, float_dtype, weight_prefix)
    x2d = b.op("Reshape", [x, b.ints("x2d_shape", [-1, K])], "x2d")
    doped = _doping(b, x2d, _Coo(b, *coo, K, _index_dtype(K, N, index_dtype)), N, None, form)
    _restore_leading_dims(b, x, doped, N, y)
    return b.result()


def build_doped_low_rank(
    x: str, y: str, prefix: str, A, B, rows=None, cols=None, vals=None, float_dtype=np.float32, index_dtype=None,
    weight_prefix: str | None = None, form: Form | None = None,
):
    """Nodes for y = (x @ A) @ B + x @ D with A [K, r], B [r, N]; D as COO, omitted when empty."""
    A, B = np.asarray(A), np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
        raise FwlrError(f"Expected A [K, r] and B [r, N], got {A.shape} and {B.shape}.")
    form = _check_form(form, None)
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
    total = _doping(b, x2d, _Coo(b, *coo, K, _index_dtype(K, N, index_dtype)), N, xab, form)
    _restore_leading_dims(b, x, total, N, y)
    return b.result()


# ---------------------------------------------------------------------------------------------- reading back

STORED_ROLES = ("A", "B", "dope_rows", "dope_cols", "dope_vals")


def stored_structure(arrays: dict[str, np.ndarray], K: int, N: int):
    """The structure a builder stored, from its initializers by role ("A", "B", and "dope_*" when doped):
    (KronSum or LowRank, Coo or None). Raises FwlrError when the arrays do not make a [K, N] structure."""
    A, B = np.asarray(arrays["A"], np.float64), np.asarray(arrays["B"], np.float64)
    if A.ndim == 3 and B.ndim == 3 and A.shape[1] * B.shape[1] == K and A.shape[2] * B.shape[2] == N:
        structure = KronSum(A, B)
    elif A.ndim == 2 and B.ndim == 2 and A.shape[0] == K and B.shape[1] == N and A.shape[1] == B.shape[0]:
        structure = LowRank(A, B)
    else:
        raise FwlrError(f"stored factors {A.shape} and {B.shape} do not make a [{K}, {N}] structure.")
    if "dope_vals" not in arrays:
        return structure, None
    coo = Coo(np.asarray(arrays["dope_rows"], np.int64), np.asarray(arrays["dope_cols"], np.int64),
              np.asarray(arrays["dope_vals"], np.float64), (K, N))
    return structure, coo
