"""A latency model from measurement: how long one site takes, dense and factored, on this machine.

Kernels do not run at their FLOP share: in ONNX Runtime on a CPU a factored pair at a rank one past a multiple
of 16 or 32 costs 4–21 % more than at the multiple (docs/speed.md). So instead of counting FLOPs we time, for
each site shape [K, N] and the model's real number of rows (tokens per batch), the dense MatMul and the
factored pair X @ A @ B at a grid of ranks, and keep the table as JSON per machine, execution provider,
threads, ONNX Runtime version and token count, under ~/.cache/onnx_fwlr/latency (or a given folder).

A table is for one *form* of the site, the kernels it will run as (docs/speed.md, "Quantized forms"):
  "fp32"                   dense fp32 MatMul; factored: the fp32 pair;
  "int8"                   the dense op after quantize_dynamic (int8 per channel); factored: both factors int8
                           dynamic, as an int8 input gets them back after compress requantizes it;
  "<scheme> + fp32"        (correction_form) the --quantize main branch alone (e.g. "int4 b32", "int8 dynamic");
                           factored: it plus the fp32 correction pair of rank r, the graph quant/graph writes.
Kernels differ more than FLOPs say between forms (on a 2-core CPU, MatMulNBits int4 runs at 1.06x fp32 and
dynamic int8 at 0.57x), so each form is timed, from one-site models built by the same code compress uses.

Everything here except OrtTimer is bookkeeping that takes the timer as a callable
`timer(K, N, rank or None, tokens[, form=...]) -> milliseconds` (the form keyword is passed for forms other
than fp32 only, so an fp32 timer takes four arguments), and tests run it with a fake timer. The decisions made
with the tables: round_ranks (the fastest nearby rank when it costs almost no fidelity), default_rank_multiple,
slower_than_dense (sites to keep dense), and methods.allocation.latency_ranks (ranks under a latency budget).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnx_fwlr.errors import FwlrError

GRID_STEP = 8  # timed ranks: multiples of 8, each with the rank one above it (the cost of missing a multiple)
MULTIPLES = (8, 16, 32)  # candidate defaults for --rank-multiple (1 = no rounding)
ROUNDS = 3  # passes over a table's ranks, each timed right after the dense op
MODEL_CACHE_BYTES = 256 << 20  # one-site models OrtTimer keeps between the rounds over one table's ranks
CACHE_VERSION = 4  # 3: factored/dense ratios of pairs timed together; 4: one table per form
FP32, INT8 = "fp32", "int8"
CORRECTED = " + fp32"  # suffix of a --quantize form: the main branch in a scheme plus an fp32 correction


def correction_form(scheme_label: str) -> str:
    """The form of a --quantize main branch stored as `scheme_label` (ortquant.Scheme.label), with its correction."""
    return scheme_label + CORRECTED


def is_correction_form(form: str) -> bool:
    return form.endswith(CORRECTED)


def scheme_label(form: str) -> str:
    """The scheme label of a correction form (the inverse of correction_form)."""
    return form.removesuffix(CORRECTED)


# ---------------------------------------------------------------------------------------------------------
# Tables


def rank_grid(K: int, N: int, step: int = GRID_STEP) -> list[int]:
    """Ranks worth timing for a [K, N] site: 1, the multiples of `step` and each multiple plus one, up to the
    rank where the pair does the dense op's FLOPs (r (K + N) = K N); past it factoring cannot be faster."""
    limit = (K * N) // (K + N)
    ranks = {1}
    for multiple in range(step, limit + 1, step):
        ranks.update((multiple, multiple + 1))
    return sorted(r for r in ranks if r <= limit)


def form_grid(K: int, N: int, form: str) -> list[int]:
    """The ranks a form's table times: rank_grid, or for a correction form the multiples of GRID_STEP up to
    the same limit (--quantize offers correction ranks in steps of 8, so the ranks one past are not needed)."""
    if is_correction_form(form):
        return list(range(GRID_STEP, (K * N) // (K + N) + 1, GRID_STEP))
    return rank_grid(K, N)


@dataclass
class SiteTable:
    """Measured times (ms) of one site shape at one token count in one form: the dense op (for a correction
    form, the main branch alone) and the factored form at `ranks` (the pair, or main branch plus correction)."""

    K: int
    N: int
    tokens: int
    dense_ms: float
    ranks: list[int] = field(default_factory=list)  # ascending
    factored_ms: list[float] = field(default_factory=list)
    form: str = FP32

    def time(self, rank: int | None) -> float:
        """Predicted ms at any rank (None: dense): piecewise linear between timed ranks; past the last one,
        the last time scaled by FLOPs (rank / last rank) — for a correction form, the correction's part only."""
        if rank is None:
            return self.dense_ms
        base = self.dense_ms if is_correction_form(self.form) else 0.0  # the main branch runs at any rank
        if not self.ranks:
            return base + self.dense_ms * rank * (self.K + self.N) / (self.K * self.N)
        if rank > self.ranks[-1]:
            return base + (self.factored_ms[-1] - base) * rank / self.ranks[-1]
        return float(np.interp(rank, self.ranks, self.factored_ms))

    def flop_line(self, rank: int) -> float:
        """The time the pair would take at its FLOP share of the dense op."""
        return self.dense_ms * rank * (self.K + self.N) / (self.K * self.N)

    def to_dict(self) -> dict:
        return {"K": self.K, "N": self.N, "tokens": self.tokens, "dense_ms": self.dense_ms, "form": self.form,
                "factored_ms": {str(r): t for r, t in zip(self.ranks, self.factored_ms)}}

    @classmethod
    def from_dict(cls, data: dict) -> SiteTable:
        pairs = sorted((int(r), float(t)) for r, t in data["factored_ms"].items())
        return cls(K=int(data["K"]), N=int(data["N"]), tokens=int(data["tokens"]), dense_ms=float(data["dense_ms"]),
                   ranks=[r for r, _ in pairs], factored_ms=[t for _, t in pairs], form=data.get("form", FP32))


def _timed(timer, K: int, N: int, rank: int | None, tokens: int, form: str) -> float:
    """One timing; the form keyword only where it is not fp32 (a timer of fp32 alone takes four arguments)."""
    return float(timer(K, N, rank, tokens) if form == FP32 else timer(K, N, rank, tokens, form=form))


def measure_table(K: int, N: int, tokens: int, timer, ranks=None, rounds: int = ROUNDS, form: str = FP32
                  ) -> SiteTable:
    """Time the dense op and the factored form at `ranks` (default form_grid) with `timer(K, N, rank|None,
    tokens[, form=form])`.

    Each rank is timed right after the dense op, in `rounds` passes over the grid; its time is the median of
    its factored/dense ratios times the median dense time. A pair timed together sees the same load, so a
    burst of load on a shared machine moves a ratio far less than it moves a time (timed alone, one lucky
    dense timing made every pair of a 384x384 table look slower than dense).
    """
    ranks = form_grid(K, N, form) if ranks is None else sorted(ranks)
    dense_times, ratios = [], {r: [] for r in ranks}
    for _ in range(rounds):
        for rank in ranks:
            dense = _timed(timer, K, N, None, tokens, form)
            ratios[rank].append(_timed(timer, K, N, rank, tokens, form) / dense)
            dense_times.append(dense)
    if not ranks:
        dense_times = [_timed(timer, K, N, None, tokens, form)]
    dense_ms = float(np.median(dense_times))
    return SiteTable(K=K, N=N, tokens=tokens, dense_ms=dense_ms, ranks=list(ranks),
                     factored_ms=[dense_ms * float(np.median(ratios[r])) for r in ranks], form=form)


# ---------------------------------------------------------------------------------------------------------
# The cache: one JSON file per machine / provider / threads / ORT version / token count / form


def machine_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo), architecture and logical CPU count."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or 'unknown CPU'} | {platform.machine()} | {os.cpu_count()} CPUs"


def environment(threads: int | None, providers=("CPUExecutionProvider",)) -> dict:
    """What a timing depends on besides the shapes; the cache key."""
    import onnxruntime as ort

    return {"machine": machine_name(), "providers": list(providers), "threads": threads,
            "onnxruntime": ort.__version__}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnx_fwlr" / "latency"


def cache_path(folder, env: dict, tokens: int, form: str = FP32) -> Path:
    key = json.dumps({**env, "tokens": tokens, "form": form, "version": CACHE_VERSION}, sort_keys=True)
    return Path(folder) / f"latency-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def load_tables(path, env: dict, tokens: int, form: str = FP32) -> dict[tuple[int, int], SiteTable]:
    """The cached tables at `path` for exactly this environment, token count and form; {} when absent or stale."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is remeasured and rewritten
    if (data.get("environment") != env or data.get("tokens") != tokens or data.get("version") != CACHE_VERSION
            or data.get("form") != form):
        return {}
    tables = [SiteTable.from_dict(entry) for entry in data.get("sites", [])]
    return {(t.K, t.N): t for t in tables}


def save_tables(path, env: dict, tokens: int, tables: dict[tuple[int, int], SiteTable], form: str = FP32) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": CACHE_VERSION, "environment": env, "tokens": tokens, "form": form,
                "sites": [tables[shape].to_dict() for shape in sorted(tables)]}
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as error:
        raise FwlrError(f"Cannot write the latency table {path} ({error.strerror}); pass a writable cache "
                        "folder.") from None


def site_tables(shapes, tokens: int, timer, env: dict, cache_dir=None, form: str = FP32
                ) -> dict[tuple[int, int], SiteTable]:
    """Tables in `form` for every [K, N] in `shapes`: from the cache, the missing ones timed with `timer` and
    cached."""
    path = cache_path(default_cache_dir() if cache_dir is None else cache_dir, env, tokens, form)
    tables = load_tables(path, env, tokens, form)
    missing = sorted({(int(K), int(N)) for K, N in shapes} - set(tables))
    for K, N in missing:
        tables[(K, N)] = measure_table(K, N, tokens, timer, form=form)
    if missing:
        save_tables(path, env, tokens, tables, form)
    return tables


# ---------------------------------------------------------------------------------------------------------
# Decisions from the tables


def _dropped(energy: np.ndarray, total: float, rank: int) -> float:
    return max(total - float(np.sum(energy[:rank])), 0.0)


def _candidates(rank: int, limit: int, multiple: int | None, table: SiteTable | None) -> list[int]:
    """Ranks to consider instead of `rank`: the multiples of `multiple` around it (with a table, the rank
    itself too: it stays when neither is faster at almost the same fidelity), or without a multiple the timed
    ranks within an eighth of it (at least GRID_STEP) and the rank itself."""
    if multiple and multiple > 1:
        below, above = (rank // multiple) * multiple, -(-rank // multiple) * multiple
        kept = {rank} if table is not None else set()
        return sorted({r for r in (below, above) if 1 <= r <= limit} | kept)
    if table is None:
        return [rank]
    window = max(GRID_STEP, rank // 8)
    return sorted({rank} | {r for r in table.ranks if abs(r - rank) <= window and r <= limit})


def _pick(rank, candidates, energy, total, table, max_loss_increase, time_tolerance):
    """The fastest candidate whose dropped energy is at most (1 + max_loss_increase) × the rank's; among those
    within time_tolerance of the fastest, the one dropping least. Without a table: the nearest (lower on ties)."""
    allowed_loss = _dropped(energy, total, rank) * (1.0 + max_loss_increase)
    passing = [c for c in candidates if _dropped(energy, total, c) <= allowed_loss + 1e-12 * max(total, 1.0)]
    if not passing:
        return rank
    if table is None:
        return min(passing, key=lambda c: (abs(c - rank), c))
    fastest = min(table.time(c) for c in passing)
    near = [c for c in passing if table.time(c) <= fastest * (1.0 + time_tolerance)]
    return max(near)  # the most components among the (almost) fastest: the least dropped energy


def round_ranks(ranks, energies, tables=None, multiple=None, totals=None, max_ranks=None, max_loss_increase=0.02,
                time_tolerance=0.01) -> list[int | None]:
    """Ranks moved to the fastest nearby value when that costs almost no fidelity.

    ranks: per site, a rank or None (dense, left alone). energies: per site, σ² descending in one currency
    (as for global allocation); totals: per site ‖PWQ‖_F² when energies are truncated (default their sums).
    tables: per site a SiteTable or None. multiple: the multiples of it below and above are the candidates
    (with a table the rank itself is one too, so a move must be faster); without a multiple, the timed ranks
    near the rank. A move down is allowed while the site's
    dropped energy grows by at most max_loss_increase (relative); moves up always lower it, but never past
    max_ranks (per site: the highest rank the decomposition gives and that still saves parameters).
    """
    tables = tables or [None] * len(ranks)
    totals = totals or [float(np.sum(e)) for e in energies]
    max_ranks = max_ranks or [None] * len(ranks)
    rounded = []
    for rank, energy, total, table, max_rank in zip(ranks, energies, totals, tables, max_ranks):
        if rank is None or (table is None and not multiple):
            rounded.append(rank)
            continue
        limit = len(energy) if max_rank is None else min(len(energy), max_rank)
        if table is not None:
            limit = min(limit, table.ranks[-1] if table.ranks else limit)
        candidates = _candidates(rank, limit, multiple, table)
        rounded.append(_pick(rank, candidates, np.asarray(energy), total, table, max_loss_increase, time_tolerance))
    return rounded


def multiple_efficiency(tables, multiple: int) -> float | None:
    """Median over tables of flop_line(r) / time(r) at the timed ranks that are multiples of `multiple` but
    not of twice it (multiple 1: the ranks one past a multiple of GRID_STEP); None when no rank qualifies."""
    values = []
    for table in tables:
        for rank, ms in zip(table.ranks, table.factored_ms):
            if multiple == 1:
                chosen = rank > 1 and rank % GRID_STEP == 1
            else:
                chosen = rank % multiple == 0 and rank % (2 * multiple) != 0
            if chosen and ms > 0:
                values.append(table.flop_line(rank) / ms)
    return float(np.median(values)) if values else None


def default_rank_multiple(tables, tolerance: float = 0.03) -> int:
    """The rank multiple measurement says to round to: the smallest m in (1,) + MULTIPLES such that ranks that
    are multiples of m (and of 2m, 4m, ...) run within `tolerance` of the most efficient class of ranks."""
    tables = list(tables)
    classes = {m: multiple_efficiency(tables, m) for m in (1,) + MULTIPLES}
    measured = {m: e for m, e in classes.items() if e is not None}
    if not measured:
        return 1
    best = max(measured.values())
    for m in (1,) + MULTIPLES:
        coarser = [e for k, e in measured.items() if k >= m]
        if coarser and min(coarser) >= best * (1.0 - tolerance):
            return m
    return MULTIPLES[-1]


def slower_than_dense(ranks, tables, margin: float = 0.0) -> list[int]:
    """Indices of sites whose factored form at their rank is predicted no faster than the dense op
    (time ≥ (1 − margin) × dense); sites without a table or kept dense are never listed."""
    return [i for i, (rank, table) in enumerate(zip(ranks, tables))
            if rank is not None and table is not None and table.time(rank) >= table.dense_ms * (1.0 - margin)]


def predicted_ms(ranks, tables) -> float:
    """Σ over sites with a table of the predicted time at their rank (None: dense)."""
    return float(sum(table.time(rank) for rank, table in zip(ranks, tables) if table is not None))


# ---------------------------------------------------------------------------------------------------------
# The model's own shapes, and the measured latency model compress uses


def site_rows(model, sites, feed) -> list[int | None]:
    """Rows each MatMul/Gemm site multiplies per run of `feed` (tokens per batch for a transformer), summed
    over its uses of main-graph nodes; None for LSTM/GRU sites and sites inside subgraphs (no table)."""
    import onnx

    from onnx_fwlr.io import runtime
    from onnx_fwlr.sites.recurrent import is_recurrent

    timed = [s for s in sites if not is_recurrent(s) and all(u.graph_index == 0 for u in s.uses)]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    wanted = []
    for site in timed:
        for use in site.uses:
            if use.input not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=use.input))
                known.add(use.input)
            wanted.append(use.input)
    if not timed:
        return [None] * len(sites)
    session = runtime.make_session(probe, runtime.session_options(optimize=False))
    names = [o.name for o in session.get_outputs()]
    shapes = dict(zip(names, (v.shape for v in session.run(None, feed))))
    shapes.update({name: np.asarray(value).shape for name, value in feed.items()})
    rows = {}
    for site in timed:
        rows[site.weight] = sum(
            int(shapes[u.input][1]) if u.trans_a else int(np.prod(shapes[u.input][:-1], dtype=np.int64))
            for u in site.uses)
    return [rows.get(s.weight) for s in sites]


def site_nodes(sites) -> list[str]:
    """The node names of the sites' uses, as site_share takes them."""
    return sorted({u.node_name for s in sites for u in s.uses if u.node_name})


class MeasuredLatency:
    """The latency model compress uses: per-site tables (cached, timed with `timer`, default OrtTimer) and the
    share of the original's time its sites take (ONNX Runtime's profiler). Tests pass a fake timer."""

    def __init__(self, threads: int | None = None, providers=("CPUExecutionProvider",), cache_dir=None, timer=None):
        self.threads, self.providers, self.cache_dir = threads, tuple(providers), cache_dir
        self.timer = timer or OrtTimer(threads, providers)
        self.env = environment(threads, providers)

    def tables(self, model, sites, feed, forms=None) -> list[SiteTable | None]:
        """One table per site at its own row count, in its form (`forms`: one per site, default fp32; a site
        may be listed once per form it needs); None where the latency model does not apply."""
        rows = site_rows(model, sites, feed)
        forms = list(forms) if forms is not None else [FP32] * len(sites)
        found = {}
        for tokens, form in sorted({(r, f) for r, f in zip(rows, forms) if r}):
            shapes = [(s.K, s.N) for s, r, f in zip(sites, rows, forms) if (r, f) == (tokens, form)]
            found[(tokens, form)] = site_tables(shapes, tokens, self.timer, self.env, self.cache_dir, form)
        return [found[(r, f)][(s.K, s.N)] if r else None for s, r, f in zip(sites, rows, forms)]

    def site_share(self, model, nodes, feed, runs: int = 5) -> float:
        """Fraction of the kernel time of `model` (ONNX Runtime's profiler, `runs` runs after one warm-up) spent
        in the nodes named `nodes` (site_nodes) and those named under them; the rest does not get faster
        whatever the ranks. `model` is the model the user gave: an int8 input is profiled as int8."""
        import tempfile

        from onnx_fwlr.cost.limits import per_site
        from onnx_fwlr.cost.profiling import parse_ort_profile
        from onnx_fwlr.io import runtime

        with tempfile.TemporaryDirectory(prefix="fwlr_latency_") as folder:
            options = runtime.session_options(threads=self.threads, profile_prefix=os.path.join(folder, "ort"))
            session = runtime.make_session(model, options, self.providers)
            for _ in range(1 + runs):
                session.run(None, feed)
            events = json.loads(Path(session.end_profiling()).read_text())
        profile = parse_ort_profile(events, skip_runs=1)
        times = per_site(profile["node_times"], sorted(set(nodes)))
        total = profile["kernel_time_ms"]
        return (total - times[None]) / total if total > 0 else 0.0

    def model_ratio(self, original, compressed, feed, runs: int = 20) -> dict:
        """The compressed model's latency over the original's on `feed`, measured as profile --compare does
        (alternating pairs in a fresh process; cost.limits.ratio_summary's keys: ratio_p50, ratio_p10, ...)."""
        import tempfile

        from onnx_fwlr.cost.limits import paired_ratio
        from onnx_fwlr.io.model import save_model

        with tempfile.TemporaryDirectory(prefix="fwlr_speed_check_") as folder:
            paths = [m if isinstance(m, (str, os.PathLike)) else save_model(m, Path(folder) / f"{name}.onnx")
                     for name, m in (("original", original), ("compressed", compressed))]
            return paired_ratio(*paths, feed, runs=runs, threads=self.threads, providers=self.providers)


# ---------------------------------------------------------------------------------------------------------
# The real timer (used by the benchmark and the CLI; never by tests)


class OrtTimer:
    """Times X [tokens, K] @ W [K, N] (rank None) or X @ A [K, r] @ B [r, N] in ONNX Runtime, in a form (module
    docstring): the fastest of at least `runs` runs after a warm-up, continuing until `min_seconds` have passed.
    The fastest, as timeit advises: slower runs measure the other processes on the machine, not the kernel, and a
    table is kept. The dense session of the last shape is kept, since measure_table times it before every rank,
    and so are the models of the last shape and form up to MODEL_CACHE_BYTES (quantizing them again every round
    would cost more than timing them; past the bound, on LLM-sized shapes, they are rebuilt)."""

    def __init__(self, threads: int | None = None, providers=("CPUExecutionProvider",), runs: int = 3,
                 min_seconds: float = 0.05, seed: int = 0):
        self.threads, self.providers, self.runs, self.min_seconds = threads, tuple(providers), runs, min_seconds
        self.seed = seed
        self._dense = (None, None)  # ((K, N, tokens, form), session)
        self._models = (None, {})  # ((K, N, form), {rank: one-site model}), at most MODEL_CACHE_BYTES

    def _session(self, K: int, N: int, rank: int | None, tokens: int, form: str):
        from onnx_fwlr.io import runtime

        if rank is None and self._dense[0] == (K, N, tokens, form):
            return self._dense[1]
        if self._models[0] != (K, N, form):
            self._models = ((K, N, form), {})
        models = self._models[1]
        model = models[rank] if rank in models else one_site_model(K, N, rank, form, self.seed)
        if rank not in models and sum(m.ByteSize() for m in models.values()) + model.ByteSize() <= MODEL_CACHE_BYTES:
            models[rank] = model
        session = runtime.make_session(model, runtime.session_options(threads=self.threads), self.providers)
        if rank is None:
            self._dense = ((K, N, tokens, form), session)
        return session

    def __call__(self, K: int, N: int, rank: int | None, tokens: int, form: str = FP32) -> float:
        session = self._session(K, N, rank, tokens, form)
        x = np.random.default_rng(self.seed).standard_normal((tokens, K)).astype(np.float32)
        session.run(None, {"x": x})
        seconds, started = [], time.perf_counter()
        while len(seconds) < self.runs or time.perf_counter() - started < self.min_seconds:
            start = time.perf_counter()
            session.run(None, {"x": x})
            seconds.append(time.perf_counter() - start)
        return float(min(seconds) * 1000.0)


def one_site_model(K: int, N: int, rank: int | None, form: str = FP32, seed: int = 0):
    """The one-site model OrtTimer times, built by the code that writes compress's output, so the timed graph
    is the written one: fp32 MatMuls; for "int8", those after ONNX Runtime's quantize_dynamic (quant.ortquant);
    for a correction form, quant.graph.rewrite of the dense site into the scheme's main branch plus (at a rank)
    the fp16-stored correction pair."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    if rank is None or is_correction_form(form):
        nodes, weights = [helper.make_node("MatMul", ["x", "W"], ["y"], name="dense")], [weight("W", K, N)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="factor_A"),
                 helper.make_node("MatMul", ["h", "B"], ["y"], name="factor_B")]
        weights = [weight("A", K, rank), weight("B", rank, N)]
    graph = helper.make_graph(nodes, "site", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", N])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if form == FP32:
        return model
    if form == INT8:
        from onnx_fwlr.quant.ortquant import quantize_dynamic_nodes

        return quantize_dynamic_nodes(model, [n.name for n in nodes])
    if is_correction_form(form):
        from onnx_fwlr.quant.graph import SitePlan, rewrite
        from onnx_fwlr.quant.ortquant import scheme_from_label

        A = B = None
        if rank:
            A, B = rng.standard_normal((K, rank)) / np.sqrt(K), rng.standard_normal((rank, N)) / np.sqrt(rank)
        return rewrite(model, {"W": SitePlan(scheme_from_label(scheme_label(form)), A, B)}, {}, "float16")
    raise ValueError(f"unknown latency form {form!r}")
