"""Which Kronecker shapes run faster than the dense weight: measured in ONNX Runtime, cached, and chosen with the
fit's error (methods.structured_fit uses it for the default `--method kron`).

At a size budget a [K, N] weight can take many Kronecker shapes (m1·m2 = K, n1·n2 = N). Their errors differ, and so
do their times: at 10x the most balanced 32x32 ⊗ 32x32 of a 1024² weight runs 4-6x slower than the dense MatMul,
while 4x256 ⊗ 256x4 runs at 0.55-0.72x (docs/doped.md). A form's time depends on the shapes, the number of terms,
the doping count, the rows per run, the threads and the machine, not on the values, so each candidate is timed once
on random values of its exact shapes, against the dense weight in the same interleaved rounds (the ratio of
back-to-back runs, which a burst of load moves far less than a time), and the ratio is cached per machine, threads
and ONNX Runtime version like the latency tables of cost.latency.

`KronSpeed` takes the timer of cost.forms (`timer(models: {label: ModelProto}, K, tokens) -> {label: ms}`), so
tests inject a fake one; only the real OrtFormTimer's results are cached on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_fwlr.methods.structured import Coo, KronSum, LowRank, Structured
from onnx_fwlr.methods.structured_fit import fast_orders
from onnx_fwlr.rewrite.structured import Form

DEFAULT_ROWS = (32, 1024)  # rows timed when the model's are unknown (no data file, no --shape): a sequence, a batch
SPEED_MARGIN = 0.05  # a structure is taken when it measures at most (1 − margin) × the dense time at every row count
ELEMENTS_ROWS = 4  # below this many rows the element-wise doping form is timed too (it wins at one row)
CACHE_VERSION = 1


@dataclass(frozen=True)
class Speed:
    """A candidate's measured time over the dense weight's (the worst over the row counts) in its fastest form."""

    ratio: float
    form: Form
    ratios: dict  # rows -> ratio in `form`

    def faster(self) -> bool:
        return self.ratio <= 1.0 - SPEED_MARGIN


def random_structure(K: int, N: int, shape, terms: int, k: int, seed: int = 0) -> Structured:
    """Random values in the exact shapes of a candidate (a Kronecker shape, or None for low rank with `terms` as the
    rank) with k doping entries on a random support: what its time depends on."""
    rng = np.random.default_rng(seed)
    if shape is None:
        structure = LowRank(rng.standard_normal((K, terms)), rng.standard_normal((terms, N)))
    else:
        m1, m2, n1, n2 = shape
        structure = KronSum(rng.standard_normal((terms, m1, n1)), rng.standard_normal((terms, m2, n2)))
    if k == 0:
        return Structured(structure)
    flat = np.sort(rng.choice(K * N, k, replace=False))
    return Structured(structure, Coo(flat // N, flat % N, rng.standard_normal(k), (K, N)))


class KronSpeed:
    """Measured speed of structured candidates at the deployment row counts `rows`, cached.

    timer: cost.forms' timer interface (None: OrtFormTimer at `threads`); cache_dir: where the real timer's
    ratios are kept (None: cost.latency's default folder); a custom timer is cached in memory only, unless a
    cache_dir is given. `verdicts` collects one sentence per site that no Kronecker shape could make faster.
    """

    def __init__(self, rows, timer=None, threads: int | None = None, cache_dir=None, dtype=np.float32,
                 progress=None):
        from onnx_fwlr.cost.latency import default_cache_dir, environment

        self.rows = tuple(sorted({int(r) for r in rows}))
        self.dtype = np.dtype(dtype)
        self.progress = progress
        real = timer is None
        if real:
            from onnx_fwlr.cost.forms import OrtFormTimer

            timer = OrtFormTimer(threads=threads)
        self.timer = timer
        self.path = None
        if real or cache_dir is not None:
            folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
            env = {**environment(threads), "dtype": self.dtype.name, "version": CACHE_VERSION}
            digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
            self.path = folder / f"kron-speed-{digest}.json"
        self.ratios: dict[str, float] = self._load()
        self.rejected: str | None = None  # why the last site got no Kronecker shape (structured_fit sets it)

    def _load(self) -> dict[str, float]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {str(k): float(v) for k, v in data.get("ratios", {}).items()}
        except (OSError, ValueError, AttributeError):
            return {}  # a damaged cache is remeasured and rewritten

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"version": CACHE_VERSION, "ratios": dict(sorted(self.ratios.items()))},
                                            indent=1) + "\n")
        except OSError:
            self.path = None  # an unwritable cache costs a remeasurement next time, never the run

    def _forms(self, shape, terms: int, K: int, N: int, k: int) -> list[Form]:
        orders = [None] if shape is None else fast_orders(shape, terms, K, N)
        dopings = ["scatternd"] if min(self.rows) >= ELEMENTS_ROWS else ["scatternd", "elements"]
        if k == 0:
            dopings = ["scatternd"]  # unused without doping
        return [Form(order=o, flat=shape is not None, doping=d) for o in orders for d in dopings]

    def _key(self, K, N, shape, terms, k, rows, form: Form) -> str:
        what = "lowrank" if shape is None else "x".join(str(v) for v in shape)
        return f"{K}x{N} {what} s{terms} k{k} T{rows} {form.label(shape is not None, k > 0)}"

    def measure(self, K: int, N: int, shape, terms: int, k: int) -> Speed:
        """The candidate's fastest form and its time over the dense weight's at every row count (timed or cached)."""
        from onnx_fwlr.cost.forms import DENSE, dense_model, site_model

        forms = self._forms(shape, terms, K, N, k)
        missing = [(rows, f) for rows in self.rows for f in forms
                   if self._key(K, N, shape, terms, k, rows, f) not in self.ratios]
        if missing:
            rep = random_structure(K, N, shape, terms, k)
            for rows in sorted({r for r, _ in missing}):
                todo = [f for r, f in missing if r == rows]
                labels = {f"form{i}": f for i, f in enumerate(todo)}
                models = {DENSE: dense_model((K, N), self.dtype),
                          **{label: site_model(rep, f, self.dtype) for label, f in labels.items()}}
                times = self.timer(models, K, rows)
                for label, f in labels.items():
                    self.ratios[self._key(K, N, shape, terms, k, rows, f)] = float(times[label] / times[DENSE])
            self._save()
        table = {f: {rows: self.ratios[self._key(K, N, shape, terms, k, rows, f)] for rows in self.rows}
                 for f in forms}
        best = min(forms, key=lambda f: (max(table[f].values()), forms.index(f)))
        return Speed(max(table[best].values()), best, table[best])

    def bar(self, total: int, what: str):
        """A progress bar with ETA when asked for (timing at 1024 rows takes seconds per shape), else a silent one."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=what, unit="shape", disable=not self.progress, leave=False)

    def describe_rows(self) -> str:
        return " and ".join(str(r) for r in self.rows) + " rows"
