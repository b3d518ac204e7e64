"""`quantize` on language models: options made site by site at bounded memory (weightings and plans spilled to
disk on large models, statistics one group of sites per pass), no dynamic int8 under auto, and the tied
embedding table and head quantized as one weight (docs/llm.md, docs/quantization.md)."""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_fwlr import compress
from onnx_fwlr.pipeline import quantized as quantized_module
from onnx_fwlr.pipeline import quantized_store

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
    stores = []

    class Recording(quantized_store.SpillStore):
        def __init__(self, spill, prefix="onnx-fwlr-quantize-"):
            super().__init__(spill, prefix)
            stores.append(self)

    held = []
    real_options = quantized_module.plan.site_options

    def options(*args, **kwargs):  # what is alive while each site's options are made
        held.append(sum(s.held_in_memory() for s in stores))
        return real_options(*args, **kwargs)

    monkeypatch.setattr(quantized_module, "spill_needed", lambda sites: True)
    monkeypatch.setattr(quantized_module, "SpillStore", Recording)
    monkeypatch.setattr(quantized_module.plan, "site_options", options)
    model, report = compress(str(DECODER), quantize="auto", ratio=0.3, calibration=str(CALIB), progress=False)
    assert _bytes(model) == _bytes(in_memory[0])
    assert [s.note for s in report.sites] == [s.note for s in in_memory[1].sites]
    assert len(held) == len(report.sites) - 1 and set(held) == {0}  # every site but the table; nothing in memory
    folders = [s.folder for s in stores if s.folder is not None]
    assert len(folders) == 2 and all(s.held_in_memory() == 0 for s in stores)  # weightings and plans, on disk
    assert not any(os.path.exists(f) for f in folders)  # removed once the model is built


def test_statistics_in_groups_give_the_one_pass_choices(in_memory):
    """Two passes (one group of sites each) instead of one: the same option for every site. ONNX Runtime's
    forward differs in the last float32 digits when other tensors are read out, so errors agree to 1e-6."""
    model, report = compress(str(DECODER), quantize="auto", ratio=0.3, calibration=str(CALIB), progress=False,
                             stats_memory=4_200_000)
    assert (report.method, report.calibration["passes"]) == ("kfac", 2)
    assert [s.note for s in report.sites] == [s.note for s in in_memory[1].sites]
    np.testing.assert_allclose([s.weighted_error or 0.0 for s in report.sites],
                               [s.weighted_error or 0.0 for s in in_memory[1].sites], rtol=1e-6)


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
