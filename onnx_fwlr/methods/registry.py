"""The weighting methods, one entry each (README: Methods).

Every low-rank method solves min ‖P (W − A B) Q‖_F; an entry says which statistics it needs, how it builds
the input side P and the output side Q from them, whether sites reading one input can share P, how the
structured fits (Kronecker, doping) judge a site in the same metric, and whether the mean output shift is
folded into a bias by default. Adding a method is adding one entry to METHODS.

Statistics are passed as an object with `input_gram(site)`, `fisher_row(site)` and `output_grad_gram(site)`
(stats.store.Statistics); this module imports numpy and the maths only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods import lowrank

ACTIVATIONS = "activations"
GRADIENTS = "gradients"


@dataclass(frozen=True)
class Method:
    name: str
    needs: tuple[str, ...]  # statistics the method reads: ACTIVATIONS, GRADIENTS
    summary: str
    input_scaling: Callable | None = None  # (site, stats) -> lowrank.Scaling: P
    output_scaling: Callable | None = None  # (site, stats) -> lowrank.Scaling: Q
    shares_input_scaling: bool = False  # P depends on the site's input only: sites reading one tensor share it
    structured_metric: Callable | None = None  # (input_gram, fisher_row) -> fit_site keywords; None: no such fit
    structure: str = "lowrank"  # "kron" for the Kronecker structure, which is no weighting of its own

    @property
    def bias_correction(self) -> bool:
        """Fold the mean output shift into a bias by default: possible whenever mean inputs are measured."""
        return ACTIVATIONS in self.needs

    @property
    def loss_units(self) -> bool:
        """Dropped energy in loss units, comparable across sites: what global allocation needs."""
        return GRADIENTS in self.needs


def _diagonal_of_gram(site, stats):
    return lowrank.diagonal_scaling(np.sqrt(np.diag(stats.input_gram(site))))


def _gram(site, stats):
    return lowrank.gram_scaling(stats.input_gram(site))


def _fisher_rows(site, stats):
    return lowrank.diagonal_scaling(np.sqrt(stats.fisher_row(site)))


def _gradient_gram(site, stats):
    sketch = stats.output_grad_sketch(site) if hasattr(stats, "output_grad_sketch") else None
    if sketch is not None:  # a vocabulary-wide output side: low rank + diagonal, never N × N
        return lowrank.low_rank_diagonal_scaling(*sketch)
    return lowrank.gram_scaling(stats.output_grad_gram(site))


def _plain_metric(input_gram, fisher_row) -> dict:
    return {}


def _whiten_metric(input_gram, fisher_row) -> dict:
    return {"gram": input_gram} if input_gram is not None else {}


def _asvd_metric(input_gram, fisher_row) -> dict:
    if input_gram is None:
        return {}
    return {"row_weights": np.sqrt(np.maximum(np.diag(input_gram), 0.0))}


def _fwsvd_metric(input_gram, fisher_row) -> dict:
    return {"row_weights": np.sqrt(np.maximum(fisher_row, 0.0))} if fisher_row is not None else {}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("svd", (), "plain SVD, no data", structured_metric=_plain_metric),
        Method("asvd", (ACTIVATIONS,), "input features scaled by √E[x²] (ASVD)", _diagonal_of_gram,
               shares_input_scaling=True, structured_metric=_asvd_metric),
        Method("whiten", (ACTIVATIONS,), "input whitened by the Cholesky factor of E[x xᵀ] (SVD-LLM)", _gram,
               shares_input_scaling=True, structured_metric=_whiten_metric),
        Method("fwsvd", (GRADIENTS,), "input features scaled by √Fisher (FWSVD)", _fisher_rows,
               structured_metric=_fwsvd_metric),
        Method("kfac", (ACTIVATIONS, GRADIENTS), "input whitened, output weighted by E[g gᵀ] (K-FAC)", _gram,
               _gradient_gram, shares_input_scaling=True),
        Method("kron", (), "sums of Kronecker products (weighted like whiten when statistics exist)",
               structure="kron"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FwlrError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def input_scaling(method: str, site, stats) -> lowrank.Scaling | None:
    """The input-side weighting P of the method (None: identity)."""
    scaling = get_method(method).input_scaling
    return scaling(site, stats) if scaling is not None else None


def output_scaling(method: str, site, stats) -> lowrank.Scaling | None:
    """The output-side weighting Q of the method (None: identity)."""
    scaling = get_method(method).output_scaling
    return scaling(site, stats) if scaling is not None else None


def structured_metric(method: str, input_gram=None, fisher_row=None) -> dict:
    """fit_site's weighting keywords for a low-rank method's metric, so every structure of a site is judged
    in the units that method would use; a missing statistic falls back to the plain Frobenius norm."""
    metric = get_method(method).structured_metric
    if metric is None:
        raise FwlrError(f"method {method} has no structured (Kronecker or doped) fit: its output-side weighting "
                        "has none; use whiten or fwsvd with structured fits.")
    return metric(input_gram, fisher_row)
