"""`quantize` on language models: options made site by site at bounded memory (weightings and plans spilled to
disk on large models, statistics one group of sites per pass), no dynamic int8 under auto, and the tied
embedding table and head quantized as one weight (docs/llm.md, docs/quantization.md)."""

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from llama_builder import TINY, build_tiny, write_tiny_calibration

from onnx_fwlr import compress, save_model
from onnx_fwlr.pipeline import quantized as quantized_module
from onnx_fwlr.pipeline import quantized_store
from onnx_fwlr.quant import ortquant

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "sample_models" / "decoder" / "decoder.onnx"
CALIB = ROOT / "sample_models" / "decoder" / "calib.npz"


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


@pytest.fixture(scope="module")
def in_memory():
    """auto at 0.3 of the decoder's bytes, everything held in memory (the small-model path)."""
    return compress(str(DECODER), quantize="auto", ratio=0.3, calibration=str(CALIB), progress=False)


def test_spilled_weightings_and_plans_give_the_same_bytes_and_hold_none_in_memory(in_memory, monkeypatch):
    stores, folders = [], []

    class Recording(quantized_store.SpillStore):
        def __init__(self, spill, prefix="onnx-fwlr-quantize-"):
            super().__init__(spill, prefix)
            stores.append(weakref.ref(self))  # not kept alive by the test: collection removes a store's folder

        def put(self, key, value):
            super().put(key, value)
            if self.folder is not None and self.folder not in folders:
                folders.append(self.folder)

    held = []
    real_options = quantized_module.plan.site_options

    def options(*args, **kwargs):  # what is alive while each site's options are made
        held.append(sum(s().held_in_memory() for s in stores if s() is not None))
        return real_options(*args, **kwargs)

    monkeypatch.setattr(quantized_module, "spill_needed", lambda sites: True)
    monkeypatch.setattr(quantized_module, "SpillStore", Recording)
    monkeypatch.setattr(quantized_module.plan, "site_options", options)
    model, report = compress(str(DECODER), quantize="auto", ratio=0.3, calibration=str(CALIB), progress=False)
    assert _bytes(model) == _bytes(in_memory[0])
    assert [s.note for s in report.sites] == [s.note for s in in_memory[1].sites]
    assert len(held) == len(report.sites) - 1 and set(held) == {0}  # every site but the table; nothing in memory
    assert len(folders) == 2 and all(s().held_in_memory() == 0 for s in stores if s() is not None)  # on disk
    assert [os.path.exists(f) for f in folders] == [False, True]  # weightings removed once the model is built;
    del model, report  # the plans stay for the report's `rewritten` (cli --also) until it goes
    gc.collect()
    assert not any(os.path.exists(f) for f in folders)


def test_statistics_in_groups_give_the_one_pass_choices(in_memory):
    """Two groups of sites (folded one at a time from the one recorded pass) instead of all at once: the same
    option for every site. ONNX Runtime's forward differs in the last float32 digits when other tensors are
    read out, so errors agree to 1e-6."""
    model, report = compress(str(DECODER), quantize="auto", ratio=0.3, calibration=str(CALIB), progress=False,
                             stats_memory=4_200_000)
    assert (report.method, report.calibration["passes"], report.calibration["groups"]) == ("kfac", 1, 2)
    assert [s.note for s in report.sites] == [s.note for s in in_memory[1].sites]
    np.testing.assert_allclose([s.weighted_error or 0.0 for s in report.sites],
                               [s.weighted_error or 0.0 for s in in_memory[1].sites], rtol=1e-6)


def test_released_group_grams_are_folded_again_the_same_without_a_pass():
    """release() (before a pricing pass of its own, and once the options are past a group): the group's Grams are
    not held, and asking again folds them from the recorded pass (the same sums, no pass more)."""
    from onnx_fwlr.pipeline.prepare import prepare
    from onnx_fwlr.stats.store import activation_key

    prepared = prepare(str(DECODER), method="kfac", calibration=str(CALIB), stats_memory=4_200_000, progress=False)
    stats, site = prepared.stats, prepared.sites[0]
    gram, gradients = stats.input_gram(site), stats.output_grad_gram(site)
    stats.release()
    assert stats.current is None and "gram" not in stats.activations[activation_key(site.uses[0])]
    np.testing.assert_array_equal(stats.input_gram(site), gram)
    np.testing.assert_array_equal(stats.output_grad_gram(site), gradients)
    assert stats.meta["passes"] == 1 and stats.current == 0


def test_auto_never_picks_dynamic_int8_for_a_language_model(in_memory):
    _, report = in_memory
    notes = [s.note for s in report.sites]
    assert not any(n.startswith("int8 dynamic") for n in notes if not n.startswith("embedding"))
    assert any(n.startswith("int8 b") for n in notes)  # 8 bits weight-only instead
    assert quantized_module.LM_INT8_NOTE in report.warnings


def test_auto_on_a_model_that_is_no_language_model_still_offers_dynamic_int8():
    job = quantized_module.prepare_quantized(str(ROOT / "sample_models" / "digits_mlp.onnx"), quantize="auto",
                                             method="svd", progress=False, budgeted=False)
    assert quantized_module.INT8_DYNAMIC in job.schemes
    assert quantized_module.LM_INT8_NOTE not in job.warnings


def test_a_spill_store_removes_its_folder_when_closed():
    store = quantized_store.SpillStore(spill=True)
    store.put("a", np.arange(3.0))
    np.testing.assert_array_equal(store.get("a"), np.arange(3.0))
    assert store.held_in_memory() == 0 and os.path.isdir(store.folder)
    store.close()
    assert not os.path.exists(store.folder)


# --- the tied embedding table and head ------------------------------------------------------------------



@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny LLaMA whose head stores a copy of its embedding table, transposed, and its calibration tokens."""
    folder = tmp_path_factory.mktemp("tied")
    return build_tiny(folder / "llama.onnx", tie="copy"), write_tiny_calibration(folder)


def _lines(report, name):
    return [s for s in report.sites if s.name == name or s.weight == name]


@pytest.mark.parametrize("ratio, bits", [(0.42, 4), (0.5, 8)])
def test_a_quantized_tied_pair_stores_one_copy_that_the_lookup_and_the_head_read(tied_llama, tmp_path, ratio, bits):
    path, calib = tied_llama
    model, report = compress(str(path), quantize="auto", ratio=ratio, calibration=str(calib), progress=False)
    head, = _lines(report, "lm_head.weight")
    table, = _lines(report, "model.embed_tokens.weight")
    assert head.note.startswith(f"int{bits} b32 with its table") and "one copy for the pair" in head.note
    assert table.bytes_after == 0 and f"reads the {bits}-bit numbers of its head" in table.note
    assert len(report.tied) == 1 and "GatherBlockQuantized" in report.tied[0]
    names = {t.name for t in model.graph.initializer}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    nodes = {n.op_type: n for n in model.graph.node}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.input[1])
    gather = nodes["GatherBlockQuantized"]
    assert onnx.helper.get_attribute_value(next(a for a in gather.attribute if a.name == "bits")) == bits
    reshape = next(n for n in model.graph.node if n.output[0] == gather.input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == matmul.input[1]
    assert list(gather.input[2:]) == list(matmul.input[2:4])  # the same scales and zero points
    # the lookup's rows are the head's dequantized columns, as ONNX Runtime computes them
    tensors = [t for t in model.graph.initializer if t.name in matmul.input[1:4]]
    head_numbers = ortquant.dequantize_matmul_weight(ortquant.QuantizedWeight(matmul, tensors))  # [D, V]
    model.graph.output.append(onnx.helper.make_tensor_value_info(gather.output[0], onnx.TensorProto.FLOAT, None))
    out = tmp_path / "tied.onnx"
    save_model(model, out)
    data = np.load(calib)
    feed = {k: data[k] for k in data.files}
    logits, rows = ort.InferenceSession(str(out)).run(["logits", gather.output[0]], feed)
    np.testing.assert_allclose(rows, head_numbers.T[feed["input_ids"]], rtol=0, atol=1e-6)
    assert np.isfinite(logits).all()


def test_a_tied_pair_kept_in_float_is_stored_once(tied_llama):
    path, calib = tied_llama
    model, report = compress(str(path), quantize="auto", ratio=0.7, calibration=str(calib), progress=False)
    head, = _lines(report, "lm_head.weight")
    table, = _lines(report, "model.embed_tokens.weight")
    assert head.note.startswith("fp32, tied") and head.bytes_after == 0
    assert table.bytes_after == 4 * TINY["vocab"] * TINY["hidden"] and "tied" in table.note
    names = {t.name for t in model.graph.initializer}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert any(n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight" for n in model.graph.node)



def test_the_tables_pass_runs_micro_batches_when_a_batch_would_not_fit(tied_llama, monkeypatch):
    """The pricing pass of embedding tables under a tiny activation budget: one sample at a time, the same
    statistics (the lm loss seeds nothing at random) to float32 rounding."""
    from onnx_fwlr.io.data import open_data
    from onnx_fwlr.io.model import load_model
    from onnx_fwlr.quant import calibration
    from onnx_fwlr.quant.embedding import find_tables
    from onnx_fwlr.stats import fisher

    path, calib = tied_llama
    model = load_model(path)
    tables = find_tables(model)

    def measure():
        batches = open_data(str(calib), model, batch_size=6)
        return calibration.collect_quant_stats(model, tables, [], batches, loss="lm", progress=False)

    whole = measure()
    sizes = []
    real = calibration.micro_batches

    def recording(feed, labels, size):
        sizes.append(size)
        return real(feed, labels, size)

    monkeypatch.setattr(fisher, "ACTIVATION_BUDGET", 1)
    monkeypatch.setattr(calibration, "micro_batches", recording)
    pieces = measure()
    assert sizes and set(sizes) == {1}
    for name, stats in whole.tables.items():
        np.testing.assert_array_equal(pieces.tables[name].counts, stats.counts)
        scale = np.abs(stats.grad_gram).max()  # ONNX Runtime's float32 forward differs per batch shape
        np.testing.assert_allclose(pieces.tables[name].grad_gram, stats.grad_gram, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("estimate", ["written", "in memory"])
def test_a_byte_budget_holds_for_the_files_written_with_external_data(tied_llama, tmp_path, monkeypatch, estimate):
    """A lazily loaded input is written with external data: the records and padding of the moved tensors count
    (counting only the model's bytes in memory, the files came out above the target)."""
    from onnx_fwlr.io import model as modelio

    path, calib = tied_llama
    monkeypatch.setattr(modelio, "LAZY_THRESHOLD", 0)
    if estimate == "in memory":
        monkeypatch.setattr(quantized_module, "_written_bytes", quantized_module._bytes)
    target = 60_000
    model, _ = compress(str(path), quantize="auto", target_size=target, calibration=str(calib), progress=False)
    out = tmp_path / "out.onnx"
    modelio.save_model(model, out, external_data=True)
    assert (modelio.file_size(out) <= target) == (estimate == "written")
