"""The latency model's bookkeeping with a fake timer (no timing here): tables, cache, rounding, dense decisions,
allocation under a latency budget."""

import itertools
import json

import numpy as np
import pytest

from onnx_fwlr.cost.latency import (
    FP32,
    INT8,
    ROUNDS,
    SiteTable,
    cache_path,
    correction_form,
    default_rank_multiple,
    form_grid,
    load_tables,
    measure_table,
    one_site_model,
    predicted_ms,
    rank_grid,
    round_ranks,
    site_tables,
    slower_than_dense,
)
from onnx_fwlr.methods import allocation as alloc
from onnx_fwlr.methods.allocation import latency_ranks

ENV = {"machine": "test CPU | x86_64 | 2 CPUs", "providers": ["CPUExecutionProvider"], "threads": 2,
       "onnxruntime": "0.0"}
TOKENS = 64


class FakeTimer:
    """ms = FLOPs / 1e6, the pair `penalty` slower at ranks that are not multiples of `multiple`; counts calls."""

    def __init__(self, multiple=16, penalty=0.15):
        self.multiple, self.penalty, self.calls = multiple, penalty, []

    def __call__(self, K, N, rank, tokens):
        self.calls.append((K, N, rank, tokens))
        if rank is None:
            return 2 * tokens * K * N / 1e6
        slow = 1.0 + (self.penalty if rank % self.multiple else 0.0)
        return 2 * tokens * rank * (K + N) / 1e6 * slow


def _table(K, N, timer=None):
    return measure_table(K, N, TOKENS, timer or FakeTimer())


def test_rank_grid_holds_multiples_and_the_rank_past_each():
    grid = rank_grid(64, 64)  # FLOP break-even at 32
    assert grid == [1, 8, 9, 16, 17, 24, 25, 32]
    assert all(r <= 64 * 256 // (64 + 256) for r in rank_grid(64, 256))


def test_table_interpolates_and_round_trips():
    table = _table(64, 64)
    assert table.time(None) == table.dense_ms
    assert table.time(16) == pytest.approx(2 * TOKENS * 16 * 128 / 1e6)
    assert table.time(12) == pytest.approx((table.time(9) * 4 + table.time(16) * 3) / 7)  # between 9 and 16
    assert table.time(64) == pytest.approx(table.time(32) * 2)  # past the grid: along the FLOPs
    again = SiteTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table


def _same_table(a, b):
    assert (a.K, a.N, a.tokens, a.ranks) == (b.K, b.N, b.tokens, b.ranks)
    assert a.dense_ms == pytest.approx(b.dense_ms) and a.factored_ms == pytest.approx(b.factored_ms)


def test_a_burst_of_load_does_not_move_the_table():
    timer, calls = FakeTimer(), []

    def loaded(K, N, rank, tokens):  # a burst of load over the first 11 timings (it ends between the dense
        calls.append(rank)  # op and the pair of the 6th rank), and one lone dense timing 5x too fast
        ms = timer(K, N, rank, tokens)
        if len(calls) <= 11:
            return 10 * ms
        return ms / 5 if len(calls) == 41 else ms

    _same_table(measure_table(64, 64, TOKENS, loaded), _table(64, 64))


def test_cache_round_trip_times_each_shape_once(tmp_path):
    timer = FakeTimer()
    first = site_tables([(64, 64), (64, 128), (64, 64)], TOKENS, timer, ENV, tmp_path)
    calls = len(timer.calls)
    assert set(first) == {(64, 64), (64, 128)}
    assert calls == ROUNDS * 2 * (len(rank_grid(64, 64)) + len(rank_grid(64, 128)))  # dense, then each rank
    assert cache_path(tmp_path, ENV, TOKENS).is_file()

    again = site_tables([(64, 64), (64, 128)], TOKENS, timer, ENV, tmp_path)
    assert len(timer.calls) == calls and again == first  # all from the cache

    site_tables([(64, 64), (128, 64)], TOKENS, timer, ENV, tmp_path)
    assert {c[:2] for c in timer.calls[calls:]} == {(128, 64)}  # only the new shape is timed
    calls = len(timer.calls)

    site_tables([(64, 64)], TOKENS, timer, {**ENV, "threads": 1}, tmp_path)  # another environment: its own file
    site_tables([(64, 64)], 2 * TOKENS, timer, ENV, tmp_path)  # another token count too
    assert len(timer.calls) == calls + 2 * ROUNDS * 2 * len(rank_grid(64, 64))
    assert len(list(tmp_path.glob("latency-*.json"))) == 3

    cache_path(tmp_path, ENV, TOKENS).write_text("{not json")
    site_tables([(64, 64)], TOKENS, timer, ENV, tmp_path)  # a damaged file is remeasured and rewritten
    assert json.loads(cache_path(tmp_path, ENV, TOKENS).read_text())["tokens"] == TOKENS


def _decaying(n, scale=1.0, length=200.0):
    """σ² decaying over `length` components (the default: slowly, so one component is a small share of the tail)."""
    return scale * np.exp(-np.arange(n) / length)


def test_rounding_picks_the_faster_neighbour():
    table = _table(512, 512)  # multiples of 16 sit on the FLOP line, other ranks cost 15 % more
    energy = _decaying(512)
    # 65 -> 64: faster and drops only one small component; 79 -> 80: no slower than 79, and drops less
    assert round_ranks([65, 79, None], [energy] * 3, [table] * 3) == [64, 80, None]
    # the same choices from the multiple alone, without a table (nearest multiple)
    assert round_ranks([65, 79], [energy] * 2, multiple=16) == [64, 80]


def test_rounding_down_refused_when_it_costs_fidelity():
    table = _table(512, 512)
    energy = _decaying(512)
    energy[64] = 1e3  # the 65th component carries most of what is left
    assert round_ranks([65], [energy], [table]) == [65]  # 64 is faster but drops far more
    assert round_ranks([65], [energy], multiple=16) == [80]  # only multiples allowed: up, never down
    assert round_ranks([65], [energy], [table], multiple=16) == [65]  # measured: 80 is slower than 65, so stay


def test_slower_factored_site_stays_dense():
    fast, slow = _table(256, 256), _table(256, 256, FakeTimer(penalty=3.0))
    # at rank 40 the slow site's pair costs 40*512*4 vs 256*256 dense per token: slower than dense
    assert slow.time(40) > slow.dense_ms and fast.time(40) < fast.dense_ms
    assert slower_than_dense([40, 40, None], [fast, slow, slow]) == [1]
    assert slower_than_dense([40], [None]) == []


def test_default_rank_multiple_from_measurement():
    for multiple in (16, 32):
        tables = [_table(512, 512, FakeTimer(multiple=multiple)), _table(512, 1024, FakeTimer(multiple=multiple))]
        assert default_rank_multiple(tables) == multiple
    assert default_rank_multiple([_table(512, 512, FakeTimer(penalty=0.0))]) == 1


def _loss(ranks, energies):
    return sum(0.0 if r is None else float(np.sum(e[r:])) for r, e in zip(ranks, energies))


def test_latency_budget_is_respected_and_spent_where_loss_per_ms_is_smallest():
    tables = [_table(256, 256), _table(256, 256)]
    important, unimportant = _decaying(256, 100.0, 20.0), _decaying(256, 1.0, 20.0)
    energies = [important, unimportant]
    dense_total = sum(t.dense_ms for t in tables)
    target = 0.8 * dense_total
    ranks = latency_ranks(energies, tables, target)
    assert predicted_ms(ranks, tables) <= target
    assert ranks[0] is None and ranks[1] is not None  # the cheap-to-lose site pays for the whole saving

    # as good as the best of all pairs of measured choices that meet the budget (the leftover time is spent)
    best = min(_loss(choice, energies) for choice in itertools.product(*[[None] + t.ranks for t in tables])
               if predicted_ms(choice, tables) <= target)
    assert _loss(ranks, energies) <= 1.01 * best

    tight = latency_ranks(energies, tables, 0.3 * dense_total)  # now both sites must give
    assert predicted_ms(tight, tables) <= 0.3 * dense_total and None not in tight
    assert latency_ranks(energies, tables, 2 * dense_total) == [None, None]  # budget allows everything


def test_latency_budget_never_factorises_a_slower_site():
    def slow_timer(K, N, rank, tokens):
        return 2 * tokens * K * N / 1e6 * (1.0 if rank is None else 1.1)

    tables = [_table(256, 256), _table(256, 256, slow_timer)]  # the second site's pair is slower at every rank
    energies = [_decaying(256), _decaying(256, 1e-6)]  # even though losing it costs next to nothing
    ranks = latency_ranks(energies, tables, 0.01)  # unreachable: returns the fastest choices
    assert ranks == [1, None]


def test_rounding_and_budget_stay_within_the_highest_usable_rank():
    table = _table(64, 64)  # timed up to rank 32, the FLOP break-even; 31 is the last rank that saves parameters
    energy = _decaying(64)
    assert round_ranks([30], [energy], multiple=16) == [32]
    assert round_ranks([30], [energy], multiple=16, max_ranks=[31]) == [30]  # 32 does not exist, 16 drops too much

    def half_cost(K, N, rank, tokens):  # the pair at rank r costs r / 64 of dense: every timed rank is faster
        return 1.0 if rank is None else rank / 64

    table = measure_table(64, 64, TOKENS, half_cost)
    assert latency_ranks([np.ones(64)], [table], target_ms=0.999) == [32]
    assert latency_ranks([np.ones(64)], [table], target_ms=0.999, max_ranks=[31]) == [25]  # the next timed rank


class FormTimer:
    """ms = FLOPs / 1e6 in fp32; int8 forms at 0.6 of that; a correction form: its main branch (0.5 of the fp32
    dense op) plus the fp32 pair. Records (rank, form) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, K, N, rank, tokens, form=FP32):
        self.calls.append((rank, form))
        dense, pair = 2 * tokens * K * N / 1e6, 0.0 if rank is None else 2 * tokens * rank * (K + N) / 1e6
        if form == INT8:
            return 0.6 * (dense if rank is None else pair)
        if form != FP32:
            return 0.5 * dense + pair
        return dense if rank is None else pair


def test_each_form_has_its_own_table_and_cache_file(tmp_path):
    timer, int4 = FormTimer(), correction_form("int4 b32")
    tables = {form: site_tables([(64, 128)], TOKENS, timer, ENV, tmp_path, form) for form in (FP32, INT8, int4)}
    assert {form for _, form in timer.calls} == {FP32, INT8, int4}  # the form reaches the timer
    assert len(list(tmp_path.glob("latency-*.json"))) == 3
    assert len({cache_path(tmp_path, ENV, TOKENS, form) for form in tables}) == 3
    assert cache_path(tmp_path, ENV, TOKENS) == cache_path(tmp_path, ENV, TOKENS, FP32)

    fp32, int8, corrected = (tables[f][(64, 128)] for f in (FP32, INT8, int4))
    assert int8.dense_ms == pytest.approx(0.6 * fp32.dense_ms) and int8.time(16) == pytest.approx(0.6 * fp32.time(16))
    assert corrected.ranks == form_grid(64, 128, int4) == [8, 16, 24, 32, 40]  # correction ranks: steps of 8
    assert corrected.time(None) == pytest.approx(0.5 * fp32.dense_ms)  # the main branch alone
    # past the grid only the correction grows with the rank; the main branch stays
    assert corrected.time(80) == pytest.approx(corrected.dense_ms + 2 * (corrected.time(40) - corrected.dense_ms))
    assert fp32.ranks[-1] == 41 and fp32.time(82) == pytest.approx(2 * fp32.time(41))  # a plain pair scales whole

    calls = len(timer.calls)
    assert site_tables([(64, 128)], TOKENS, timer, ENV, tmp_path, INT8) == {(64, 128): int8}  # from its file
    assert len(timer.calls) == calls
    assert load_tables(cache_path(tmp_path, ENV, TOKENS, INT8), ENV, TOKENS, FP32) == {}  # another form's file
    again = SiteTable.from_dict(json.loads(json.dumps(corrected.to_dict())))
    assert again == corrected and again.form == int4


def test_one_site_models_are_the_graphs_compress_writes():
    """Built through ORT's quantizers and quant.graph.rewrite (no timing): the op types say what is timed."""
    ops = {(form, rank): sorted(n.op_type for n in one_site_model(64, 96, rank, form).graph.node)
           for form in (FP32, INT8, correction_form("int4 b32"), correction_form("int8 dynamic"))
           for rank in (None, 8)}
    assert ops[(FP32, 8)] == ["MatMul", "MatMul"]
    assert ops[(INT8, None)].count("MatMulInteger") == 1 and ops[(INT8, 8)].count("MatMulInteger") == 2
    assert ops[("int4 b32 + fp32", None)] == ["MatMulNBits"]
    assert ops[("int4 b32 + fp32", 8)] == ["Add", "Cast", "Cast", "MatMul", "MatMul", "MatMulNBits"]  # fp16 factors
    assert ops[("int8 dynamic + fp32", 8)].count("MatMulInteger") == 1
    assert ops[("int8 dynamic + fp32", 8)].count("MatMul") == 2


def test_fused_gemm_nodes_count_as_their_site():
    """ONNX Runtime names a Gemm fused with its Relu `fused <node>` (the digits MLP profiles as `fused fc1/Gemm`);
    site_share and profile --compare must still give its time to the site."""
    from onnx_fwlr.cost.limits import owner, per_site

    sites = ["fc1/Gemm", "fc2/MatMul"]
    assert owner("fused fc1/Gemm", sites) == "fc1/Gemm"
    times = {"fused fc1/Gemm": 1.3, "fused fc2/MatMul/MatMulAddFusion": 1.5, "head/Gemm": 0.1}
    assert per_site(times, sites) == pytest.approx({"fc1/Gemm": 1.3, "fc2/MatMul": 1.5, None: 0.1})


# --- ranks in steps of a multiple (the default allocation granularity) ------------------------------------------


def test_rank_step_applies_only_to_wide_sites():
    assert alloc.rank_step(384, 1536, 16) == 16 and alloc.rank_step(384, 384, 16) == 16  # break-even 307, 192
    assert alloc.rank_step(64, 256, 16) == 1 and alloc.rank_step(64, 256, 8) == 8  # break-even 51
    assert alloc.rank_step(384, 384, None) == alloc.rank_step(384, 384, 1) == 1


def test_global_ranks_in_steps_spend_no_more_than_the_budget():
    rng = np.random.default_rng(0)
    shapes = [(384, 384), (384, 1536), (1536, 384), (64, 256)]
    energies = [np.sort(rng.gamma(0.5, size=min(s)))[::-1] * (i + 1) for i, s in enumerate(shapes)]
    budget = 0.4 * sum(K * N for K, N in shapes)
    plain = alloc.global_ranks(energies, shapes, budget)
    stepped = alloc.global_ranks(energies, shapes, budget, multiple=16)
    assert plain == alloc.global_ranks(energies, shapes, budget, multiple=1)  # no step: the old greedy
    assert any(r % 16 for r in plain[:3] if r)  # the plain greedy lands off the multiple
    for (K, N), rank in zip(shapes, stepped):
        assert rank is None or alloc.rank_step(K, N, 16) == 1 or rank % 16 == 0
    spent = sum(alloc.site_params(K, N, r) for (K, N), r in zip(shapes, stepped))
    assert budget - 16 * (1536 + 384) < spent <= budget  # within one block of the budget


def test_uniform_ranks_in_steps_hold_the_budget():
    shapes = [(384, 384), (384, 1536), (1536, 384), (64, 256)]
    for ratio in (0.2, 0.3, 0.45, 0.5, 0.7):
        ranks = alloc.uniform_ranks(shapes, ratio, 16)
        assert all(r % 16 == 0 for r in ranks[:3]) and ranks[3] == alloc.uniform_ranks(shapes, ratio)[3]
        spent = sum(alloc.site_params(K, N, r) for (K, N), r in zip(shapes, ranks))
        assert spent <= ratio * sum(K * N for K, N in shapes)


def test_turning_dense_is_priced_by_the_whole_tail_it_keeps():
    # site 0 is worth keeping up to its break-even rank 191, and past it its 193 small components add up; site 1's
    # components are each worth more than one of those small ones, less than the whole tail per parameter
    shapes = [(384, 384), (384, 1536)]
    energies = [np.concatenate([np.full(191, 10.0), np.full(193, 0.02)]), np.full(384, 0.5)]
    budget = 384 * 384 + 100 * (384 + 1536) - 500  # priced as one small component, site 0 stopped at rank 191
    ranks = alloc.global_ranks(energies, shapes, budget)
    assert ranks[0] is None  # dense: 768 parameters buy back 3.86 of energy, more per parameter than site 1's
    spent = sum(alloc.site_params(K, N, r) for (K, N), r in zip(shapes, ranks))
    assert spent <= budget and ranks[1] == (budget - 384 * 384) // (384 + 1536)
