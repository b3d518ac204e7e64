"""Every ONNX form of a doped structured site computes x @ W' (against numpy), and the form choice follows the
timer it is given (a fake one here: no timing in tests)."""

import itertools

import numpy as np
import onnx
import pytest
from builders import matmul_model, rel_error, run

from onnx_fwlr.cost.forms import DENSE, FormChoice, choose_form, kron_forms, site_model
from onnx_fwlr.methods.structured import Coo, KronSum, LowRank, Structured
from onnx_fwlr.rewrite.lowrank import apply_factors
from onnx_fwlr.rewrite.structured import DOPING_FORMS, ORDERS, Form, stored_structure
from onnx_fwlr.sites.find import find_sites

SHAPE = (4, 5, 3, 6)  # m1, m2, n1, n2: K = 20, N = 18
K, N = 20, 18


def doped_kron(terms=3, nnz=9, rows_touched=None, seed=0) -> Structured:
    rng = np.random.default_rng(seed)
    m1, m2, n1, n2 = SHAPE
    A, B = rng.normal(size=(terms, m1, n1)), rng.normal(size=(terms, m2, n2))
    return Structured(KronSum(A, B), _coo(rng, nnz, rows_touched))


def _coo(rng, nnz, rows_touched=None) -> Coo | None:
    if nnz == 0:
        return None
    rows = np.arange(K) if rows_touched is None else np.sort(rng.choice(K, rows_touched, replace=False))
    flat = rng.choice(len(rows) * N, nnz, replace=False)
    order = rng.permutation(nnz)  # unsorted on purpose: the builders sort
    return Coo(rows[flat // N][order], (flat % N)[order], rng.normal(size=nnz), (K, N))


def check_form(rep: Structured, form: Form, dtype=np.float32, tol=1e-5):
    model = site_model(rep, form, dtype)
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(1)
    for rows in (1, 7):
        x = rng.normal(size=(rows, K)).astype(dtype)
        (y,) = run(model, {"x": x})
        expected = x.astype(np.float64) @ rep.dense()
        assert y.shape == expected.shape
        assert rel_error(y, expected) <= tol, form


ALL_KRON = [Form(order, flat, stacked, doping) for order, flat, stacked, doping
            in itertools.product(ORDERS, (False, True), (True, False), DOPING_FORMS)]


@pytest.mark.parametrize("form", ALL_KRON, ids=lambda f: f.label())
def test_every_kron_form_matches_numpy(form):
    check_form(doped_kron(terms=3, nnz=9), form)


@pytest.mark.parametrize("form", [Form(o, f, s) for o, f, s in itertools.product(ORDERS, (False, True), (True, False))],
                         ids=lambda f: f.label(doped=False))
@pytest.mark.parametrize("terms", [1, 2])
def test_kron_forms_without_doping_and_with_one_term(form, terms):
    check_form(doped_kron(terms=terms, nnz=0), form)


@pytest.mark.parametrize("doping", DOPING_FORMS)
@pytest.mark.parametrize("rows_touched,nnz", [(None, 1), (None, 25), (3, 12), (1, 4)])
def test_doping_forms_on_low_rank_and_concentrated_supports(doping, rows_touched, nnz):
    rng = np.random.default_rng(2)
    rep = Structured(LowRank(rng.normal(size=(K, 2)), rng.normal(size=(2, N))), _coo(rng, nnz, rows_touched))
    check_form(rep, Form(doping=doping))


@pytest.mark.parametrize("doping", DOPING_FORMS)
def test_half_precision_forms_run(doping):
    rep = doped_kron(terms=2, nnz=6, seed=3)
    check_form(rep, Form(order="a_first", flat=True, doping=doping), dtype=np.float16, tol=5e-3)


def test_rewrite_with_a_form_per_site_and_stored_layout_reads_back():
    rep = doped_kron(terms=2, nnz=8, seed=4)
    rep.shift = np.linspace(-1, 1, N)
    model = matmul_model(rep.dense().astype(np.float32), x_shape=("b", "s", None))
    sites, _ = find_sites(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    form = Form(order="a_first", flat=True, stacked=False, doping="dense_rows")
    apply_factors(out, sites, {"W": rep}, forms={"W": form})
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(5).normal(size=(2, 3, K)).astype(np.float32)
    assert rel_error(run(out, {"x": x})[0], run(model, {"x": x})[0] + rep.shift) <= 1e-5
    arrays = {t.name.rsplit("/", 1)[1]: onnx.numpy_helper.to_array(t) for t in out.graph.initializer
              if t.name.startswith("W/kron/") and t.name.rsplit("/", 1)[1] in ("A", "B", "dope_rows", "dope_cols",
                                                                             "dope_vals")}
    structure, coo = stored_structure(arrays, K, N)
    np.testing.assert_allclose(structure.dense() + coo.dense(), rep.dense(), atol=1e-5)


def test_kron_forms_skip_huge_intermediates_and_separate_terms_when_many():
    many = doped_kron(terms=12, nnz=0)
    forms = kron_forms(many)
    assert all(f.stacked for f in forms) and {f.order for f in forms} == set(ORDERS)
    assert kron_forms(Structured(LowRank(np.ones((K, 1)), np.ones((1, N))))) == [Form()]
    assert any(not f.stacked for f in kron_forms(doped_kron(terms=3)))


class FakeTimer:
    """Times from a rule on the labels; records what it was asked to time."""

    def __init__(self, rule):
        self.rule, self.calls = rule, []

    def __call__(self, models, K_, tokens):
        self.calls.append((sorted(models), tokens))
        return {label: self.rule(label, tokens) for label in models}


def test_choose_form_picks_the_fastest_per_stage_and_compares_with_dense():
    rep = doped_kron(terms=3, nnz=9)

    def rule(label, tokens):
        if label == DENSE:
            return 10.0
        if "no doping" in label or "doping" not in label:
            return 1.0 if label.startswith("a_first, flat, per term") else 5.0
        return 2.0 if "dense_rows" in label else 9.0

    timer = FakeTimer(rule)
    choice = choose_form(rep, 64, timer)
    assert choice.form == Form(order="a_first", flat=True, stacked=False, doping="dense_rows")
    assert (choice.ms, choice.dense_ms, choice.tokens) == (2.0, 10.0, 64) and choice.faster
    assert len(timer.calls) == 2 and all(tokens == 64 for _, tokens in timer.calls)
    assert DENSE in timer.calls[0][0] and DENSE in timer.calls[1][0]
    described = choice.describe(True, True)
    assert described == "form a_first, flat, per term; doping dense_rows: 2 ms vs dense 10 ms at 64 rows"


def test_choose_form_reports_slower_than_dense():
    rep = doped_kron(terms=3, nnz=0)
    choice = choose_form(rep, 8, FakeTimer(lambda label, tokens: 1.0 if label == DENSE else 3.0))
    assert isinstance(choice, FormChoice) and not choice.faster and choice.dense_ms == 1.0
