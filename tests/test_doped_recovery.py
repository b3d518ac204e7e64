"""Exact recovery: a weight that is exactly a structure of s terms (rank s) plus k sparse entries is recovered
when the budget allows it, even when the budget allows many more terms (issue 19's example)."""

import numpy as np
import onnx
import pytest
from builders import matmul_model, rel_error, run

from onnx_fwlr.cli.main import main
from onnx_fwlr.methods.doping import dope
from onnx_fwlr.methods.structured import nearest_kron
from onnx_fwlr.methods.structured_fit import doping_count, fit_site

SHAPE = (16, 24, 16, 24)  # A 16x16, B 24x24: W is 384 x 384
DOPE = 0.003


def kron_plus_sparse(terms, seed=0):
    """W = Σ_s A_s ⊗ B_s + D with round(0.3 % · K·N) entries in D, one to three times W's spread."""
    rng = np.random.default_rng(seed)
    m1, m2, n1, n2 = SHAPE
    W = sum(np.kron(rng.normal(size=(m1, n1)), rng.normal(size=(m2, n2))) for _ in range(terms))
    k = doping_count(*W.shape, DOPE)
    flat = rng.choice(W.size, k, replace=False)
    W.reshape(-1)[flat] += rng.choice([-1, 1], k) * rng.uniform(1, 3, k) * W.std()
    return W, set(flat.tolist())


@pytest.mark.parametrize("terms", [1, 2])
def test_doped_kron_is_recovered_exactly_with_the_terms_it_needs(terms):
    W, spikes = kron_plus_sparse(terms)
    fit = fit_site(W, "kron", 0.2 * W.size, dope=DOPE, kron_shape=SHAPE)  # the budget allows 33 terms
    assert rel_error(W, fit.replacement.dense()) < 1e-5
    assert fit.replacement.structure.A.shape[0] == terms
    assert fit.description.startswith(f"kron {terms}x")
    doping = fit.replacement.doping
    assert {int(r) * W.shape[1] + int(c) for r, c in zip(doping.rows, doping.cols)} == spikes


def test_the_plain_alternation_at_the_full_budget_does_not_recover_it():
    """Why the structure is grown: 33 terms from the start absorb the sparse entries (the error of issue 19)."""
    W, _ = kron_plus_sparse(1)
    k = doping_count(*W.shape, DOPE)
    plain = dope(W, lambda M: nearest_kron(M, SHAPE, 33), k, max_iter=30, tol=1e-4)
    assert rel_error(W, plain.structure.dense() + plain.doping.dense()) > 1e-4


@pytest.mark.parametrize("use_gram", [False, True])
def test_doped_low_rank_is_recovered_exactly_above_its_rank(use_gram):
    rng = np.random.default_rng(3)
    K, N, rank, k = 96, 80, 3, 40
    W = rng.normal(size=(K, rank)) @ rng.normal(size=(rank, N))
    W.reshape(-1)[rng.choice(W.size, k, replace=False)] += rng.choice([-1, 1], k) * rng.uniform(2, 4, k)
    X = rng.normal(size=(500, K)) * rng.uniform(0.3, 2.0, K)
    options = {"gram": X.T @ X / len(X)} if use_gram else {}
    fit = fit_site(W, "lowrank", 0.5 * W.size, dope=k / W.size, **options)  # the budget allows rank 17
    assert rel_error(W, fit.replacement.dense()) < 1e-5
    assert fit.replacement.structure.A.shape[1] == rank


def test_cli_recovers_the_issue_example(tmp_path):
    """`compress --method kron --kron-shape 16x24,16x24 --dope 0.003 --ratio 0.2`: output error at float32 level."""
    W, _ = kron_plus_sparse(1)
    model_path, out_path = tmp_path / "kron.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_model(W.astype(np.float32)), str(model_path))
    code = main(["compress", str(model_path), "-o", str(out_path), "--method", "kron", "--kron-shape", "16x24,16x24",
                 "--dope", str(DOPE), "--ratio", "0.2", "--quiet"])
    assert code == 0
    x = {"x": np.random.default_rng(1).normal(size=(64, 384)).astype(np.float32)}
    assert rel_error(run(onnx.load(str(model_path)), x)[0], run(onnx.load(str(out_path)), x)[0]) < 1e-5
