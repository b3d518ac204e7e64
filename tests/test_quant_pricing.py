"""`--quantize`'s pricing statistics (embedding tables' token counts and output-gradient Grams, dynamic int8's
per-channel ranges) folded by the sites' one Fisher pass instead of a pass of their own (quant.calibration.Pricing,
stats.fisher's `pricing`): the same numbers as the pass they replace, the sites' statistics untouched, and the
pass of their own kept only where there is no Fisher pass (statistics loaded from a file)."""

from pathlib import Path

import numpy as np
import pytest
from llama_builder import build_tiny, write_tiny_calibration

from onnx_fwlr import compress
from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import load_model
from onnx_fwlr.pipeline import quantized as quantized_module
from onnx_fwlr.quant import calibration
from onnx_fwlr.quant.calibration import Pricing, collect_quant_stats
from onnx_fwlr.quant.embedding import find_tables
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.stats import fisher
from onnx_fwlr.stats.fisher import GroupedFisherStatistics, collect_fisher_stats, fisher_groups

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "sample_models" / "decoder" / "decoder.onnx"
DECODER_CALIB = ROOT / "sample_models" / "decoder" / "calib.npz"


@pytest.fixture(scope="module", params=["copy", "none"])
def tiny(request, tmp_path_factory):
    """A tiny LLaMA (its head a copy of its table, or a head of its own), its sites, tables and site inputs."""
    folder = tmp_path_factory.mktemp(f"pricing_{request.param}")
    path, calib = build_tiny(folder / "llama.onnx", tie=request.param), write_tiny_calibration(folder)
    model = load_model(path)
    sites, _ = find_all_sites(model, None, None, fisher=True)
    tables = find_tables(model, exclude={s.weight for s in sites})
    tensors = sorted({u.input for s in sites for u in s.uses})
    return path, calib, model, sites, tables, tensors


def _same_sums(a, b) -> None:
    """Every activation and gradient sum of two Statistics, to the bit."""
    for mine, theirs in ((a.activations, b.activations), (a.gradients, b.gradients)):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].keys() == theirs[key].keys()
            for name in mine[key]:
                assert np.array_equal(np.asarray(mine[key][name]), np.asarray(theirs[key][name])), (key, name)


def _folded(model, sites, tables, tensors, calib, batch_size):
    pricing = Pricing(tables, tensors)
    stats = collect_fisher_stats(model, sites, open_data(str(calib), model, batch_size=batch_size), progress=False,
                                 pricing=pricing)
    return stats, pricing.result("calibration")


def _own_pass(model, tables, tensors, calib, batch_size, meta):
    return collect_quant_stats(model, tables, tensors, open_data(str(calib), model, batch_size=batch_size),
                               loss=meta["loss"], output=meta["fisher_output"], progress=False)


def test_folded_pricing_is_the_pricing_pass_to_the_bit_and_leaves_the_sites_sums_alone(tiny):
    """Whole batches (6 samples, within the Fisher pass's micro-batch): both passes see the same forward values."""
    _, calib, model, sites, tables, tensors = tiny
    plain = collect_fisher_stats(model, sites, open_data(str(calib), model, batch_size=6), progress=False)
    stats, folded = _folded(model, sites, tables, tensors, calib, 6)
    _same_sums(stats, plain)
    own = _own_pass(model, tables, tensors, calib, 6, plain.meta)
    assert [t.name for t in tables] == list(folded.tables) == list(own.tables)
    for name, table in own.tables.items():
        assert np.array_equal(folded.tables[name].counts, table.counts)
        assert np.array_equal(folded.tables[name].grad_gram, table.grad_gram)
        assert (folded.tables[name].positions, folded.tables[name].grad_count) == (table.positions, table.grad_count)
    assert folded.step_squares == own.step_squares and len(own.step_squares) == len(tensors)
    for name in tensors:
        for (high, low), (their_high, their_low) in zip(folded.channel_ranges[name], own.channel_ranges[name],
                                                        strict=True):
            assert np.array_equal(high, their_high) and np.array_equal(low, their_low)


def test_micro_batches_change_the_table_grams_by_float64_rounding_only(tiny):
    """12 samples a batch: the Fisher pass runs 8 + 4, the pricing pass its whole batch (each piece's Gram is
    added in turn, as the pricing pass does for its own micro-batches); counts and ranges stay exact."""
    _, calib, model, sites, tables, tensors = tiny
    stats, folded = _folded(model, sites, tables, tensors, calib, 12)
    own = _own_pass(model, tables, tensors, calib, 12, stats.meta)
    for name, table in own.tables.items():
        assert np.array_equal(folded.tables[name].counts, table.counts)
        scale = np.abs(table.grad_gram).max()
        np.testing.assert_allclose(folded.tables[name].grad_gram, table.grad_gram, rtol=0, atol=1e-13 * scale)
    assert folded.step_squares == own.step_squares


def test_the_recorded_pass_folds_the_same_pricing_as_the_pass_in_memory(tiny):
    """GroupedFisherStatistics (one pass set aside on disk, walked with `consume` and `emit`) gives the pricing
    the in-memory pass gives, and its groups' sums stay those of the pass without pricing."""
    _, calib, model, sites, tables, tensors = tiny
    plain = collect_fisher_stats(model, sites, open_data(str(calib), model, batch_size=6), progress=False)
    _, in_memory = _folded(model, sites, tables, tensors, calib, 6)
    pricing = Pricing(tables, tensors)
    groups = fisher_groups(sites, 1)  # a site per group
    assert len(groups) > 2
    grouped = GroupedFisherStatistics(model, sites, groups, open_data(str(calib), model, batch_size=6),
                                      {"progress": False}, pricing)
    recorded = pricing.result("calibration")
    for name, table in in_memory.tables.items():
        assert np.array_equal(recorded.tables[name].grad_gram, table.grad_gram)
        assert np.array_equal(recorded.tables[name].counts, table.counts)
    assert recorded.step_squares == in_memory.step_squares
    for site in sites:
        assert np.array_equal(grouped.fisher_row(site), plain.fisher_row(site))
        assert np.array_equal(grouped.input_gram(site), plain.input_gram(site))


def test_the_lookups_side_session_keeps_the_fisher_session_as_it_was():
    """On the shipped decoder ONNX Runtime fuses the first layer norm unless its inside is exposed, which the
    lookup's cotangent needs: the side session computes those values, so the sites' session fetches exactly
    what it fetched and their sums do not move. The tables' Gram then differs from the old pricing pass's
    (whose session did not fuse that norm, so every later value rounded differently) by float32 rounding:
    measured 1.4e-7 of its largest entry."""
    model = load_model(DECODER)
    sites, _ = find_all_sites(model, None, None, fisher=True)
    tables = find_tables(model, exclude={s.weight for s in sites})
    assert tables
    plain = collect_fisher_stats(model, sites, open_data(str(DECODER_CALIB), model), progress=False)
    stats, folded = _folded(model, sites, tables, [], DECODER_CALIB, 32)
    _same_sums(stats, plain)
    own = _own_pass(model, tables, [], DECODER_CALIB, 32, plain.meta)
    for name, table in own.tables.items():
        assert np.array_equal(folded.tables[name].counts, table.counts)
        scale = np.abs(table.grad_gram).max()
        np.testing.assert_allclose(folded.tables[name].grad_gram, table.grad_gram, rtol=0, atol=1e-6 * scale)
    target = fisher._gradient_setup(model, sites, None)[-1]
    priced = fisher._gradient_setup(model, sites, None, pricing=Pricing(tables, []))[-1]
    assert priced.fetch_names == target.fetch_names
    assert set(priced.wrt) == set(target.wrt) | {o for t in tables for o in t.outputs}


def test_side_cotangents_are_those_of_a_runner_that_exposes_them():
    """GradientRunner's side_wrt: the cotangents of asking for them in `wrt`, to float32 rounding (the runner that
    exposes the first layer norm's inside runs it unfused: its later values round differently)."""
    model = load_model(DECODER)
    sites, _ = find_all_sites(model, None, None, fisher=True)
    table = find_tables(model, exclude={s.weight for s in sites})[0]
    target = fisher._gradient_setup(model, sites, None)[1].tensor
    feed = {k: v[:2] for k, v in np.load(DECODER_CALIB).items()}
    wrt = [sites[0].uses[0].output]
    side = GradientRunner(model, target, wrt, side_wrt=table.outputs)
    whole = GradientRunner(model, target, wrt + table.outputs)
    side_values, whole_values = side.forward(feed), whole.forward(feed)
    seed = np.random.default_rng(0).standard_normal(side_values[target].shape).astype(np.float32)
    mine, theirs = side.backward(side_values, seed), whole.backward(whole_values, seed)
    assert mine.keys() == theirs.keys()
    scale = np.abs(theirs[table.outputs[0]]).max()
    np.testing.assert_allclose(mine[table.outputs[0]], theirs[table.outputs[0]], rtol=0, atol=1e-5 * scale)


def test_quantize_auto_runs_one_pass_and_writes_what_the_pass_of_its_own_gave(tiny, monkeypatch):
    path, calib, *_ = tiny
    own_passes = []
    real = quantized_module.collect_quant_stats

    def counted(*args, **kwargs):
        own_passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantized_module, "collect_quant_stats", counted)
    options = dict(quantize="auto", ratio=0.5, calibration=str(calib), batch_size=6, progress=False)
    folded, _ = compress(str(path), **options)
    assert own_passes == []
    monkeypatch.setattr(quantized_module, "Pricing", lambda tables, tensors: None)  # no folding: the old pass
    separate, _ = compress(str(path), **options)
    assert own_passes == [1]
    assert folded.SerializeToString() == separate.SerializeToString()


def test_statistics_from_a_file_price_in_a_pass_of_their_own(tiny, tmp_path, monkeypatch):
    path, calib, model, sites, tables, _ = tiny
    assert tables
    stats = collect_fisher_stats(model, sites, open_data(str(calib), model, batch_size=6), progress=False)
    stats.save(tmp_path / "stats.npz")
    calls = []
    real = calibration.Pricing.end_batch

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(calibration.Pricing, "end_batch", counted)
    compress(str(path), quantize="auto", ratio=0.5, stats=str(tmp_path / "stats.npz"), calibration=str(calib),
             batch_size=6, progress=False)
    assert len(calls) == 2  # the two batches of the pass of its own


def test_options_let_each_group_go_once_its_last_site_has_its_weighting(monkeypatch):
    """Grouped statistics (two groups of the sample decoder): each group is folded once and dropped once its
    last site's weighting is made (the last group, with the LM head, too: not kept through the fit attempts);
    the file is the one written when they stay."""
    folds, releases = [], []
    real_measure, real_release = GroupedFisherStatistics._measure, GroupedFisherStatistics.release

    def measure(self, index):
        folds.append(index)
        return real_measure(self, index)

    def release(self):
        releases.append(self.current)
        return real_release(self)

    monkeypatch.setattr(GroupedFisherStatistics, "_measure", measure)
    monkeypatch.setattr(GroupedFisherStatistics, "release", release)
    options = dict(quantize="auto", ratio=0.3, calibration=str(DECODER_CALIB), progress=False, stats_memory=4_200_000)
    released, report = compress(str(DECODER), **options)
    assert report.calibration["groups"] == 2
    assert folds == [0, 1] and releases == [0, 1]
    monkeypatch.setattr(quantized_module, "_release_finished_group", lambda job, index: None)
    kept, _ = compress(str(DECODER), **options)
    assert released.SerializeToString() == kept.SerializeToString()
