"""The ONNX form of a structured site, chosen by measuring it in ONNX Runtime.

A doped Kronecker sum (or doped low rank) can be written in ONNX several ways that compute the same product
(rewrite.structured.Form: contraction order, flat or batched second contraction, terms stacked or not, and the
doping term by ScatterND, ScatterElements or a small dense correction). Which is fastest depends on the shapes,
the number of rows per run, the threads and the machine, and the wrong one is many times slower than dense
(docs/doped.md), so the form is picked by timing one-site models at the model's own row count:

  1. the Kronecker forms of the structure alone (no doping), and the dense weight;
  2. the doping forms on the fastest structure form, and the dense weight again.

`choose_form` takes the timer as a callable `timer(models: dict[label, ModelProto], K, tokens) -> {label: ms}`,
so tests run it with a fake one; `OrtFormTimer` is the real one (interleaved repeats, medians).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fwlr.methods.structured import KronSum, Structured
from onnx_fwlr.rewrite.structured import (
    DOPING_FORMS,
    ORDERS,
    Form,
    build_doped_kron,
    build_doped_low_rank,
    kron_intermediate,
    min_opset,
)

MAX_INTERMEDIATE = 16  # forms whose intermediate exceeds this many × (K + N) floats per row are not tried
MAX_SEPARATE_TERMS = 8  # one chain per term is tried up to this many terms
DENSE = "dense"


@dataclass
class FormChoice:
    """The fastest form measured for one site, its time and the dense weight's, and every timing taken."""

    form: Form
    ms: float
    dense_ms: float
    tokens: int
    timings: dict = field(default_factory=dict)  # label -> ms, both stages

    @property
    def faster(self) -> bool:
        return self.ms < self.dense_ms

    def describe(self, kron: bool, doped: bool) -> str:
        return (f"form {self.form.label(kron, doped)}: {self.ms:.3g} ms vs dense {self.dense_ms:.3g} ms at "
                f"{self.tokens} rows")


def _shape(rep: Structured) -> tuple[int, int]:
    s = rep.structure
    if isinstance(s, KronSum):
        m1, m2, n1, n2 = s.shape4
        return m1 * m2, n1 * n2
    return s.A.shape[0], s.B.shape[1]


def kron_forms(rep: Structured) -> list[Form]:
    """Kronecker forms worth timing: both orders (unless the intermediate is huge), batched and flat, and one
    chain per term for a few terms. Low rank has one structure form."""
    if not isinstance(rep.structure, KronSum):
        return [Form()]
    K, N = _shape(rep)
    terms = rep.structure.A.shape[0]
    forms = []
    for order in ORDERS:
        if kron_intermediate(rep.structure.shape4, terms, order) > MAX_INTERMEDIATE * (K + N):
            continue
        for flat in (False, True):
            for stacked in (True, False) if 1 < terms <= MAX_SEPARATE_TERMS else (True,):
                forms.append(Form(order=order, flat=flat, stacked=stacked))
    return forms or [Form()]


def site_model(rep: Structured, form: Form, dtype=np.float32) -> onnx.ModelProto:
    """A one-site model x [T, K] -> y = x @ W' [T, N] in this form (no shift: the same in every form)."""
    K, N = _shape(rep)
    coo = () if rep.nnz == 0 else (rep.doping.rows, rep.doping.cols, rep.doping.vals)
    build = build_doped_kron if isinstance(rep.structure, KronSum) else build_doped_low_rank
    nodes, inits = build("x", "y", "site", rep.structure.A, rep.structure.B, *coo, float_dtype=dtype, form=form)
    return _model(nodes, inits, K, N, dtype, min_opset(rep.nnz > 0))


def dense_model(W_or_shape, dtype=np.float32, seed: int = 0) -> onnx.ModelProto:
    """x [T, K] @ W: the given weight, or a seeded random one of shape (K, N)."""
    if isinstance(W_or_shape, tuple):
        W = np.random.default_rng(seed).standard_normal(W_or_shape)
    else:
        W = np.asarray(W_or_shape)
    K, N = W.shape
    init = numpy_helper.from_array(np.asarray(W, dtype=dtype), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="dense")], [init], K, N, dtype, 13)


def _model(nodes, inits, K, N, dtype, opset) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "site", [helper.make_tensor_value_info("x", elem, ["T", K])],
                              [helper.make_tensor_value_info("y", elem, ["T", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 17))], ir_version=9)


def choose_form(rep: Structured, tokens: int, timer, dtype=np.float32) -> FormChoice:
    """The fastest form of `rep` at `tokens` rows per run, measured with `timer` (see the module docstring),
    and the dense weight's time from the same round of measurements."""
    K, N = _shape(rep)
    dense = dense_model((K, N), dtype)
    undoped = Structured(rep.structure)
    is_kron = isinstance(rep.structure, KronSum)
    candidates = {f.label(is_kron, False): f for f in kron_forms(rep)}
    timings = {}
    if len(candidates) > 1 or rep.nnz == 0:
        models = {DENSE: dense, **{label: site_model(undoped, f, dtype) for label, f in candidates.items()}}
        first = timer(models, K, tokens)
        timings.update({f"{label} (no doping)" if rep.nnz else label: ms for label, ms in first.items()})
        best = min(candidates, key=lambda label: first[label])
        form, ms, dense_ms = candidates[best], first[best], first[DENSE]
    else:
        form = next(iter(candidates.values()))
    if rep.nnz:
        doped = {replace(form, doping=d).label(is_kron, True): replace(form, doping=d) for d in DOPING_FORMS}
        second = timer({DENSE: dense, **{label: site_model(rep, f, dtype) for label, f in doped.items()}}, K, tokens)
        timings.update({label: ms for label, ms in second.items() if label != DENSE})
        timings[DENSE] = second[DENSE]
        best = min(doped, key=lambda label: second[label])
        form, ms, dense_ms = doped[best], second[best], second[DENSE]
    return FormChoice(form, float(ms), float(dense_ms), tokens, timings)


class OrtFormTimer:
    """Times one-site models in ONNX Runtime: x [tokens, K] random, one warm-up run each, then rounds in which
    every model runs `runs` times in a rotating order (interleaved, so load changes hit all of them alike),
    until `rounds` rounds and `min_seconds` have passed. The dense model's time is its median over rounds; every
    other model's is the median of its ratios to the dense time of the same round times that median (a ratio of
    runs close together moves far less under a burst of load than a time: cost.latency.measure_table)."""

    def __init__(self, threads: int | None = None, providers=("CPUExecutionProvider",), runs: int = 3,
                 rounds: int = 7, min_seconds: float = 0.2, seed: int = 0):
        self.threads, self.providers = threads, tuple(providers)
        self.runs, self.rounds, self.min_seconds, self.seed = runs, rounds, min_seconds, seed

    def __call__(self, models: dict[str, onnx.ModelProto], K: int, tokens: int) -> dict[str, float]:
        from onnx_fwlr.io import runtime

        options = runtime.session_options(threads=self.threads)
        sessions = {label: runtime.make_session(m, options, self.providers) for label, m in models.items()}
        elem = next(iter(models.values())).graph.input[0].type.tensor_type.elem_type
        x = np.random.default_rng(self.seed).standard_normal((tokens, K))
        feed = {"x": x.astype(helper.tensor_dtype_to_np_dtype(elem))}
        for session in sessions.values():
            session.run(None, feed)
        labels = list(sessions)
        samples: dict[str, list[float]] = {label: [] for label in labels}
        started, round_index = time.perf_counter(), 0
        while round_index < self.rounds or time.perf_counter() - started < self.min_seconds:
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                tick = time.perf_counter()
                for _ in range(self.runs):
                    sessions[label].run(None, feed)
                samples[label].append((time.perf_counter() - tick) / self.runs * 1000.0)
            round_index += 1
        medians = {label: float(np.median(values)) for label, values in samples.items()}
        if DENSE not in samples:
            return medians
        dense = np.asarray(samples[DENSE])
        return {label: medians[DENSE] * float(np.median(np.asarray(values) / dense)) if label != DENSE
                else medians[DENSE] for label, values in samples.items()}
