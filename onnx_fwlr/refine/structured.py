"""Structured sites in refine: co-matrix dropout of the doping values, and the doping support re-selected
between training phases.

A doped structured site stores its factors "A", "B" and its doping "dope_rows", "dope_cols", "dope_vals" in
one canonical layout (rewrite.structured); refine trains A, B and the doping values on the fixed support.

Co-matrix dropout (Thakker et al., "Doping", MLSys 2021): trained together, the structure leans on the sparse
doping matrix ("co-matrix adaptation"): the doping values grow to absorb what the structure should learn, and
the pair generalises worse than either alone. Dropping the doping term at random during training (its values
fed as zeros for that step, with zero gradient) makes the structure learn to stand on its own; evaluation and
the final model always use the full doping term. Here each site's doping term is dropped with probability p
independently, per step.

Support re-selection: after a phase of training the structure has moved, so the k entries it fits worst are
no longer those chosen at compression. Between phases the support becomes the top-k of the residual
W − S of the original weight and the trained structure, weighted by the input's √E[x_i²] (the diagonal of
the activation metric the fit used), and the values that residual's entries; then training resumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.methods.doping import top_k_doping
from onnx_fwlr.rewrite.structured import STORED_ROLES, stored_structure
from onnx_fwlr.sites.find import Site, find_sites, weight_matrix

DOPING_VALUES = "dope_vals"


@dataclass
class StoredSite:
    """A structured site of the compressed model: the original's site and its stored tensors by role."""

    site: Site
    names: dict[str, str]  # role ("A", "B", "dope_rows", "dope_cols", "dope_vals") -> initializer name

    @property
    def doped(self) -> bool:
        return DOPING_VALUES in self.names


def stored_sites(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[StoredSite]:
    """The compressed model's structured sites, found by the names the rewrite gives their tensors:
    "{weight}/kron/<role>" or "{weight}/lowrank/<role>" (with a numeric suffix when the name was taken)."""
    names = {t.name for t in compressed.graph.initializer}
    found = []
    for site in find_sites(original)[0]:
        pattern = re.compile(rf"^{re.escape(site.weight)}/(kron|lowrank)(_\d+)?/({'|'.join(STORED_ROLES)})$")
        roles: dict[str, dict[str, str]] = {}
        for name in sorted(names):
            match = pattern.match(name)
            if match:
                roles.setdefault(match.group(1) + (match.group(2) or ""), {})[match.group(3)] = name
        complete = [r for r in roles.values() if "A" in r and "B" in r]
        if len(complete) == 1:
            found.append(StoredSite(site, complete[0]))
    return found


def doping_tensors(trainable: list[str], sites: list[StoredSite]) -> list[str]:
    """The trained doping-value tensors, one per doped site."""
    wanted = set(trainable)
    return [s.names[DOPING_VALUES] for s in sites if s.doped and s.names[DOPING_VALUES] in wanted]


class CoMatrixDropout:
    """Per step, each doping-value tensor is dropped (fed as zeros, its gradient zeroed) with probability p."""

    def __init__(self, names: list[str], p: float, seed: int = 0):
        if not 0.0 <= p < 1.0:
            raise FwlrError(f"`dope_dropout` {p} is out of range; give a probability 0 <= p < 1 (e.g. 0.5).")
        self.names, self.p = list(names), p
        self.rng = np.random.default_rng([seed, 0x0D0BE])  # its own stream: the batch order does not change
        self.dropped_count = 0

    def draw(self) -> set[str]:
        if not self.names or self.p == 0.0:
            return set()
        dropped = {n for n, u in zip(self.names, self.rng.random(len(self.names))) if u < self.p}
        self.dropped_count += len(dropped)
        return dropped

    @staticmethod
    def feed(weights: dict, dropped: set[str]) -> dict:
        return {k: (np.zeros_like(v) if k in dropped else v) for k, v in weights.items()}

    @staticmethod
    def mask(grads: dict, dropped: set[str]) -> dict:
        return {k: (np.zeros_like(g) if k in dropped else g) for k, g in grads.items()}


def _arrays(model: onnx.ModelProto, names: dict[str, str]) -> dict[str, np.ndarray]:
    tensors = {t.name: t for t in model.graph.initializer}
    return {role: tensor_array(model, tensors[name]) for role, name in names.items()}


def reselect_support(original: onnx.ModelProto, compressed: onnx.ModelProto, sites: list[StoredSite],
                     row_weights: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, int]:
    """A copy of `compressed` whose doped sites have the top-k support of W − S (weighted by `row_weights`,
    weight name -> [K], when given) with those residual values; returns (model, entries that moved)."""
    model = onnx.ModelProto()
    model.CopyFrom(compressed)
    tensors = {t.name: t for t in model.graph.initializer}
    moved = 0
    for stored in sites:
        if not stored.doped:
            continue
        site = stored.site
        arrays = _arrays(model, stored.names)
        structure, coo = stored_structure(arrays, site.K, site.N)
        residual = weight_matrix(original, site).astype(np.float64) - structure.dense()
        new = top_k_doping(residual, len(coo.vals), (row_weights or {}).get(site.weight))
        moved += len(coo.vals) - len(set(zip(coo.rows.tolist(), coo.cols.tolist()))
                                     & set(zip(new.rows.tolist(), new.cols.tolist())))
        for role, values in (("dope_rows", new.rows), ("dope_cols", new.cols), (DOPING_VALUES, new.vals)):
            name = stored.names[role]
            tensors[name].CopyFrom(numpy_helper.from_array(values.astype(arrays[role].dtype), name))
    return model, moved


def activation_row_weights(original: onnx.ModelProto, sites: list[StoredSite], feeds) -> dict[str, np.ndarray]:
    """√E[x_i²] of each doped site's input on `feeds` (a list of feed dicts), from one pass of the original."""
    from onnx_fwlr.io.data import open_data
    from onnx_fwlr.stats.activations import collect_activation_stats

    doped = [s.site for s in sites if s.doped]
    if not doped:
        return {}
    stats = collect_activation_stats(original, doped, open_data(list(feeds), original), progress=False)
    return {site.weight: np.sqrt(np.maximum(np.diag(stats.input_gram(site)), 0.0))
            for site in doped if stats.has_activations(site)}


def refine_in_phases(run_phase, original, compressed, calibration, *, phases: int, steps: int, batch_size: int,
                     **options):
    """`phases` runs of `run_phase` (refine without re-selection), steps // phases steps each, with the doping
    support re-selected before every run but the first; returns the model of the phase that validated best
    (never worse than the input: each phase is never worse than its own start) and one merged RefineReport."""
    from onnx_fwlr.io.data import open_data

    sites = stored_sites(original, compressed)
    if not any(s.doped for s in sites):
        raise FwlrError("`reselect` moves the doping support of doped structured sites, and the compressed model "
                        "has none; drop `reselect` or compress with `dope`.")
    feeds = [feed for feed, _ in open_data(calibration, original, batch_size=batch_size)]
    row_weights = activation_row_weights(original, sites, feeds)
    model, reports, models = compressed, [], []
    for phase in range(phases):
        moved = 0
        if phase:
            model, moved = reselect_support(original, model, sites, row_weights)
        model, report = run_phase(original, model, calibration, steps=max(1, steps // phases), batch_size=batch_size,
                                  **options)
        report.phases = [{"phase": phase + 1, "reselected": moved, "steps": report.steps,
                          "best_step": report.best_step, "before": report.before, "after": report.after}]
        reports.append(report)
        models.append(model)
    best = min(range(phases), key=lambda i: (reports[i].after["loss"], i))
    return models[best], merge_reports(reports, best)


def merge_reports(reports, best: int):
    """One RefineReport for consecutive phases: the first's start, the best phase's end, curves joined."""
    merged, offset = reports[0], 0
    curve, phases, seconds, step_seconds = [], [], 0.0, 0.0
    for index, report in enumerate(reports):
        curve += [(step + offset, *rest) for step, *rest in report.curve if not (index and step == 0)]
        phases += report.phases
        if index == best:
            merged.best_step = report.best_step + offset if report.improved or index else 0
            merged.after = report.after
        seconds, step_seconds = seconds + report.seconds, step_seconds + report.step_seconds
        offset += report.steps
    merged.curve, merged.phases, merged.steps, merged.stopped = curve, phases, offset, reports[-1].stopped
    merged.seconds, merged.step_seconds = seconds, step_seconds
    return merged
