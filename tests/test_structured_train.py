"""Training structured factors by distillation: the scatter VJP rules (finite differences), what refine trains in
a structured model, gradients through every ONNX form, co-matrix dropout, support re-selection and the doping
share; the CLI accepts structured models."""

import numpy as np
import onnx
import pytest
from builders import make_model, rel_error, run, vinfo
from gradcheck import check, rand
from onnx import helper, numpy_helper

from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.autodiff.vjp import RULES
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.structured import Coo, KronSum, LowRank, Structured
from onnx_fwlr.rewrite.lowrank import apply_factors
from onnx_fwlr.rewrite.structured import DOPING_FORMS, Form
from onnx_fwlr.sites.find import find_sites

# ---------------------------------------------------------------- VJP rules of the doping ops


@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd(reduction):
    indices = np.array([[0, 2], [1, 0], [2, 3]] if reduction == "none" else [[0, 2], [1, 0], [0, 2]], dtype=np.int64)
    check("ScatterND", [rand(3, 4, 2), indices, rand(3, 2)], {"reduction": reduction}, opset=16)


def test_scatter_nd_rows():
    check("ScatterND", [rand(5, 3), np.array([[4], [1], [4]], dtype=np.int64), rand(3, 3)], {"reduction": "add"},
          opset=16)


@pytest.mark.parametrize("axis,reduction", [(1, "add"), (0, "none"), (-1, "none")])
def test_scatter_elements(axis, reduction):
    indices = np.array([[1, 0, 3], [2, 2, 0]] if reduction == "add" else [[1, 0, 3], [2, 1, 0]], dtype=np.int64)
    if axis == 0:  # narrower than the data off the axis
        indices = np.array([[1, 0, 2], [2, 1, 0]], dtype=np.int64)
    check("ScatterElements", [rand(3, 4), indices, rand(*indices.shape)], {"axis": axis, "reduction": reduction},
          opset=16)


def test_scatter_with_other_reductions_has_no_rule():
    assert RULES["ScatterND"].unsupported({"reduction": "mul"})
    assert RULES["ScatterElements"].unsupported({"reduction": "add"}) is None


# ---------------------------------------------------------------- gradients through every structured form

K, N = 12, 10
SHAPE = (3, 4, 2, 5)  # m1, m2, n1, n2


def structured_site(kind="kron", nnz=7, seed=0) -> Structured:
    rng = np.random.default_rng(seed)
    if kind == "kron":
        m1, m2, n1, n2 = SHAPE
        structure = KronSum(rng.normal(size=(2, m1, n1)), rng.normal(size=(2, m2, n2)))
    else:
        structure = LowRank(rng.normal(size=(K, 3)), rng.normal(size=(3, N)))
    flat = rng.choice(K * N, nnz, replace=False)
    return Structured(structure, Coo(flat // N, flat % N, rng.normal(size=nnz), (K, N)))


def structured_model(rep: Structured, form: Form | None = None):
    W = np.random.default_rng(9).normal(size=(K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Tanh", ["h"], ["y"])]
    original = make_model(nodes, [vinfo("x", ["b", K])], [vinfo("y", ["b", N])], [numpy_helper.from_array(W, "W")])
    compressed = onnx.ModelProto()
    compressed.CopyFrom(original)
    sites, _ = find_sites(original)
    apply_factors(compressed, sites, {"W": rep}, forms={"W": form} if form else None)
    return original, compressed


@pytest.mark.parametrize("form", [Form(doping=d) for d in DOPING_FORMS]
                         + [Form(order="a_first", flat=True, stacked=False), Form(order="b_first", flat=True)],
                         ids=lambda f: f.label())
def test_gradients_of_stored_factors_match_finite_differences(form):
    from onnx_fwlr.refine.trainable import trainable_factors, training_model

    rep = structured_site()
    original, compressed = structured_model(rep, form)
    names = trainable_factors(original, compressed)
    assert {n.rsplit("/", 1)[1] for n in names} == {"A", "B", "dope_vals"}
    model = training_model(compressed, names)
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    runner = GradientRunner(model, "y", names)
    x = np.random.default_rng(1).normal(size=(4, K)).astype(np.float32)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in compressed.graph.initializer
               if t.name in names}
    seed = np.random.default_rng(2).normal(size=(4, N)).astype(np.float32)
    values = runner.forward({"x": x, **weights})
    grads = runner.backward(values, seed)
    for name in names:
        w = weights[name].astype(np.float64)
        probe = np.random.default_rng(3).normal(size=w.shape)
        h = 1e-2

        def loss(v):
            return float(np.sum(seed * run(model, {"x": x, **weights, name: v.astype(np.float32)})[0]))

        fd = (loss(w + h * probe) - loss(w - h * probe)) / (2 * h)
        assert abs(float(np.sum(grads[name] * probe)) - fd) <= 2e-3 * max(abs(fd), 1.0), name


# ---------------------------------------------------------------- refine on structured models (digits MLP)

from pathlib import Path  # noqa: E402

from onnx_fwlr import compress  # noqa: E402
from onnx_fwlr.cli.main import main  # noqa: E402
from onnx_fwlr.refine.loop import refine  # noqa: E402
from onnx_fwlr.refine.structured import CoMatrixDropout, reselect_support, stored_sites  # noqa: E402
from onnx_fwlr.refine.trainable import trainable_factors  # noqa: E402

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "sample_models" / "digits_mlp.onnx"
CALIB = ROOT / "sample_models" / "digits_calib.npz"


@pytest.fixture(scope="module")
def digits_kron():
    model, report = compress(str(DIGITS), ratio=0.25, method="kron", dope=0.01, calibration=str(CALIB),
                             exclude="head", kron_shape="balanced", progress=False)  # Kronecker even if slower
    assert report.factorised == 2
    return model


def test_trainable_tensors_of_a_doped_kron_model(digits_kron):
    names = trainable_factors(onnx.load(DIGITS), digits_kron)
    roles = sorted(n.rsplit("/", 1)[-1] for n in names)
    assert roles.count("A") == roles.count("B") == roles.count("dope_vals") == 2
    assert not any(r in ("dope_rows", "dope_cols") for r in roles)
    sites = stored_sites(onnx.load(DIGITS), digits_kron)
    assert sorted(s.site.weight for s in sites) == ["fc1.weight", "fc2.weight"] and all(s.doped for s in sites)


def test_refine_trains_kron_factors_and_doping_values(digits_kron):
    refined, report = refine(str(DIGITS), digits_kron, str(CALIB), steps=30, lr=3e-3, eval_every=10,
                             dope_dropout=0.0, progress=False)
    assert report.improved and report.after["loss"] < 0.9 * report.before["loss"]
    before, after = (
        {t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (digits_kron, refined))
    changed = {n.rsplit("/", 1)[-1] for n in report.trainable if not np.array_equal(before[n], after[n])}
    assert changed >= {"A", "B", "dope_vals"}
    assert all(np.array_equal(before[n], after[n]) for n in before if n.endswith(("dope_rows", "dope_cols")))


def test_co_matrix_dropout_feeds_zeros_and_masks_gradients():
    dropout = CoMatrixDropout(["a/dope_vals", "b/dope_vals"], 0.5, seed=3)
    draws = [dropout.draw() for _ in range(200)]
    assert 150 <= dropout.dropped_count <= 250 and any(d == set() for d in draws) and any(len(d) == 2 for d in draws)
    weights = {"a/dope_vals": np.ones(3), "b/dope_vals": np.ones(3), "A": np.ones(2)}
    fed = CoMatrixDropout.feed(weights, {"a/dope_vals"})
    assert not fed["a/dope_vals"].any() and fed["b/dope_vals"].all() and fed["A"].all()
    masked = CoMatrixDropout.mask(weights, {"b/dope_vals"})
    assert not masked["b/dope_vals"].any() and masked["a/dope_vals"].all()
    assert CoMatrixDropout([], 0.5).draw() == set()
    with pytest.raises(FwlrError):
        CoMatrixDropout(["x"], 1.0)


def test_refine_with_dropout_drops_and_stays_reproducible(digits_kron):
    runs = [refine(str(DIGITS), digits_kron, str(CALIB), steps=12, lr=3e-3, eval_every=4, dope_dropout=0.5,
                   progress=False) for _ in range(2)]
    (first, report), (second, _) = runs
    assert report.dope_dropout == 0.5 and 0 < report.dropped < 2 * 12
    assert first.SerializeToString() == second.SerializeToString()
    assert "co-matrix dropout 0.5" in report.format()


def test_reselect_support_recovers_the_true_support():
    """W = S + D exactly; the compressed model has S but its doping on the wrong entries: re-selection finds D."""
    rep = structured_site(nnz=6, seed=4)
    W = rep.dense()
    wrong = Structured(rep.structure, Coo(np.arange(6), np.zeros(6, dtype=np.int64), np.ones(6), (K, N)))
    original, compressed = structured_model(wrong)
    original.graph.initializer[0].CopyFrom(numpy_helper.from_array(W.astype(np.float32), "W"))
    sites = stored_sites(original, compressed)
    moved_model, moved = reselect_support(original, compressed, sites)
    assert moved >= 5
    x = np.random.default_rng(5).normal(size=(6, K)).astype(np.float32)
    assert rel_error(run(moved_model, {"x": x})[0], run(original, {"x": x})[0]) <= 1e-5


def test_refine_in_phases_reselects_between_them(digits_kron):
    refined, report = refine(str(DIGITS), digits_kron, str(CALIB), steps=20, lr=3e-3, eval_every=5, reselect=1,
                             dope_dropout=0.0, progress=False)
    assert [p["phase"] for p in report.phases] == [1, 2] and report.steps <= 20
    assert report.after["loss"] <= report.before["loss"]
    assert "doping support re-selected" in report.format()
    with pytest.raises(FwlrError, match="reselect"):
        refine(str(DIGITS), compress(str(DIGITS), ratio=0.3, method="svd", progress=False)[0], str(CALIB), steps=4,
               reselect=1, progress=False)


# ---------------------------------------------------------------- doping share, measured forms, CLI


def test_dope_share_spends_that_share_of_each_site():
    model, report = compress(str(DIGITS), ratio=0.25, method="kron", dope_share=0.3, calibration=str(CALIB),
                             exclude="head", kron_shape="balanced", progress=False)
    for site in report.sites:
        k = int(0.3 * 0.25 * site.K * site.N // 3)
        assert f"+ {k} doped" in site.note
    assert report.budget["dope_share"] == 0.3
    with pytest.raises(FwlrError, match="`dope` and `dope_share`"):
        compress(str(DIGITS), ratio=0.25, method="kron", dope=0.01, dope_share=0.3, progress=False)
    with pytest.raises(FwlrError, match="`dope_share`"):
        compress(str(DIGITS), ratio=0.25, method="kron", dope_share=1.5, progress=False)


class RuleTimer:
    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def __call__(self, models, K_, tokens):
        self.calls += 1
        return {label: self.rule(label, K_) for label in models}


def test_measured_forms_pick_per_site_and_keep_slower_sites_dense():
    from onnx_fwlr.cost.forms import DENSE

    def rule(label, K_):  # fc1 (K = 64): structure slower than dense; fc2 (K = 256): elements doping fastest
        if label == DENSE:
            return 1.0
        if K_ == 64:
            return 2.0
        return 0.3 if "elements" in label else 0.6

    timer = RuleTimer(rule)
    model, report = compress(str(DIGITS), ratio=0.25, method="kron", dope=0.01, calibration=str(CALIB),
                             exclude="head", forms="measured", form_timer=timer, kron_shape="balanced",
                             progress=False)
    notes = {s.name: s.note for s in report.sites}
    fc1, fc2 = (next(n for name, n in notes.items() if name.startswith(p)) for p in ("fc1", "fc2"))
    assert fc1.startswith("kept dense") and "doping elements" in fc2 and report.factorised == 1
    assert "ScatterElements" in {n.op_type for n in model.graph.node}
    assert report.budget["forms"]["kept_dense"] and timer.calls >= 2
    with pytest.raises(FwlrError, match="`forms` measured"):
        compress(str(DIGITS), ratio=0.3, method="svd", forms="measured", progress=False)


def test_cli_refine_and_compress_refine_accept_structured_models(tmp_path, capsys):
    structured = tmp_path / "kron.onnx"
    assert main(["compress", str(DIGITS), "-o", str(structured), "--method", "kron", "--dope", "0.01", "--ratio",
                 "0.25", "--exclude", "head", "--calib", str(CALIB), "--refine", "6", "--refine-lr", "3e-3",
                 "--dope-dropout", "0.3", "--kron-shape", "balanced", "--quiet"]) == 0
    assert "refine:" in capsys.readouterr().out
    out = tmp_path / "refined.onnx"
    assert main(["refine", str(DIGITS), str(structured), "-o", str(out), "--calib", str(CALIB), "--steps", "6",
                 "--lr", "3e-3", "--dope-dropout", "0.5", "--reselect", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "co-matrix dropout 0.5" in text and out.exists()
    code = main(["refine", str(DIGITS), str(structured), "-o", str(tmp_path / "bad.onnx"), "--calib", str(CALIB),
                 "--dope-dropout", "1.5", "--quiet"])
    assert code == 2 and not (tmp_path / "bad.onnx").exists()
