"""MatMulNBits' accuracy_level per site: measured at the deployment row count, and checked on real activations.

accuracy_level 0 computes in float (the weight dequantized), 4 quantizes the activation to int8 per block of K
(scale max|x|/127 per block) and runs integer dot products. Which is faster depends on the CPU and on the
rows per run: on an AVX-512 VNNI Xeon, level 4 at block 128 runs a single row 20x faster than level 0 and a
128-row batch at about the same speed; on an AVX2-only EPYC level 4 is 0.75x fp32 at one row and 1.25x at
128 (docs/speed.md). So each site's level is timed on its own shape and rows, in pairs, by the latency model's
timer (cost.latency: `timer(K, N, rank, rows, form=...)`; tests pass a fake one).

Level 4 is also checked (ONNX Runtime issue 29849: wrong results on models with very large activations): a
block of K holding one huge activation rounds every other activation of the block to a few steps. The site's
own calibration activations go through ONNX Runtime at both levels; a site whose level-4 output moves from the
level-0 one by more than LEVEL_BOUND × the int4 weight error itself (‖Y4 − Y0‖ against ‖Y0 − X W‖) keeps 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_fwlr.quant import ortquant
from onnx_fwlr.quant.ortquant import Scheme

LEVEL_BOUND = 0.5  # level 4 may add at most half of the int4 weight error's output norm
CHECK_ROWS = 512  # activation rows per site for the check (spread over the calibration batch)
LEVEL_ROUNDS = 3  # pairs (level 0, level 4) timed per site shape
FAST = 4  # the integer-compute level


@dataclass
class LevelChoice:
    """One site's level for one scheme, and why: the timings (ms at `rows`) and the check's ratio."""

    level: int
    rows: int | None = None
    ms: dict | None = None  # {0: ms, 4: ms}
    check_ratio: float | None = None  # ‖Y4 − Y0‖ / ‖Y0 − X W‖ on the site's calibration activations

    @property
    def reason(self) -> str:
        timed = "" if not self.ms else (f"level 4 {self.ms[FAST]:.3g} ms vs level 0 {self.ms[0]:.3g} ms at "
                                        f"{self.rows} rows")
        checked = "" if self.check_ratio is None else (
            f"level 4 adds {self.check_ratio:.2f}x the int4 error"
            + (f" (> {LEVEL_BOUND:g}: ONNX Runtime issue 29849, large activations)"
               if self.check_ratio > LEVEL_BOUND else ""))
        return "; ".join(part for part in (timed, checked) if part)


def site_model(W: np.ndarray, scheme: Scheme) -> onnx.ModelProto:
    """x [rows, K] -> MatMulNBits(x) with W quantized by ONNX Runtime in `scheme` (its level included)."""
    K, N = W.shape
    q = ortquant.quantize_matmul_weight(np.asarray(W, dtype=np.float32), scheme, "W")
    node = helper.make_node("MatMulNBits", ["x"] + [t.name for t in q.tensors], ["y"], name="site",
                            domain=ortquant.MS_DOMAIN,
                            **{a.name: helper.get_attribute_value(a) for a in q.node.attribute})
    graph = helper.make_graph([node], "site", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", N])], q.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(ortquant.MS_DOMAIN, 1)])
    model.ir_version = 8
    return model


def check_ratio(W: np.ndarray, scheme: Scheme, X: np.ndarray) -> float:
    """‖Y4 − Y0‖ / ‖Y0 − X W‖: what level 4 adds to the output error, relative to the int4 weight error,
    on activations X [rows, K], both levels run by ONNX Runtime."""
    from onnx_fwlr.io import runtime

    X = np.asarray(X, dtype=np.float32)
    outputs = []
    for level in (0, FAST):
        session = runtime.make_session(site_model(W, scheme.at_level(level)), runtime.session_options(threads=1))
        outputs.append(session.run(None, {"x": X})[0].astype(np.float64))
    exact = X.astype(np.float64) @ np.asarray(W, dtype=np.float64)
    weight_error = float(np.linalg.norm(outputs[0] - exact))
    added = float(np.linalg.norm(outputs[1] - outputs[0]))
    return added / weight_error if weight_error > 0 else (0.0 if added == 0 else float("inf"))


def time_levels(K: int, N: int, rows: int, scheme: Scheme, timer, rounds: int = LEVEL_ROUNDS) -> dict[int, float]:
    """ms of the scheme's main branch at levels 0 and 4, from pairs timed back to back (the latency model's timer,
    `timer(K, N, None, rows, form=...)`, cost.latency): level 0's median time, and level 4's as that times
    the median ratio of the pairs (a burst of load moves a ratio less than a time)."""
    from onnx_fwlr.cost.latency import correction_form

    forms = {level: correction_form(scheme.at_level(level).label) for level in (0, FAST)}
    base, ratios = [], []
    for _ in range(rounds):
        slow = float(timer(K, N, None, rows, form=forms[0]))
        ratios.append(float(timer(K, N, None, rows, form=forms[FAST])) / slow)
        base.append(slow)
    level0 = float(np.median(base))
    return {0: level0, FAST: level0 * float(np.median(ratios))}


def site_activations(model: onnx.ModelProto, sites, feed: dict, max_rows: int = CHECK_ROWS) -> dict[str, np.ndarray]:
    """Per site weight, up to `max_rows` rows [rows, K] of the activation it multiplies on `feed` (main-graph
    MatMul uses without a transpose; others are left out), rows spread evenly."""
    from onnx_fwlr.io import runtime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    wanted = {}
    for site in sites:
        use = site.uses[0]
        if use.graph_index != 0 or use.trans_a:
            continue
        if use.input not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=use.input))
            known.add(use.input)
        wanted[site.weight] = use.input
    if not wanted:
        return {}
    session = runtime.make_session(probe, runtime.session_options(optimize=False))
    names = [o.name for o in session.get_outputs()]
    needed = sorted(set(wanted.values()))
    values = dict(zip(needed, session.run(needed, feed))) if set(needed) <= set(names) else {}
    found = {}
    for weight, name in wanted.items():
        if name not in values:
            continue
        rows = np.asarray(values[name], dtype=np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        if len(rows) > max_rows:
            rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(np.int64)]
        found[weight] = rows
    return found


def choose_level(timings: dict[int, float] | None, ratio: float | None, rows: int | None, forced: int | None = None
                 ) -> LevelChoice:
    """Level 4 when it is asked for (`forced` 4) or measures faster (`timings`), and its check passes (a site
    with no activations to check keeps level 0); otherwise 0."""
    wanted = forced == FAST if forced is not None else bool(timings) and timings[FAST] < timings[0]
    safe = ratio is not None and ratio <= LEVEL_BOUND
    return LevelChoice(FAST if wanted and safe else 0, rows, timings, ratio)
