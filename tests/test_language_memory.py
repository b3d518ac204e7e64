"""Language-model validation holds one ONNX Runtime session at a time: the original runs first over a span of
batches, the logits of its counted positions wait in an anonymous temporary file, then the compressed model runs
and is folded with them (evaluate.language; docs/llm.md, "The memory rule"). The metrics are the same bits as
the path that held both sessions and folded each call's logits of both models in turn (kept here as the
reference), nothing is left in the temporary folder, and the parked bytes stay within their bound."""

import gc
import os
import tempfile
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_decoder import V, decoder, token_batch

from onnx_fwlr import FwlrError, compress
from onnx_fwlr.autodiff.losses import next_token_targets
from onnx_fwlr.evaluate import language
from onnx_fwlr.io import runtime


def both_sessions_path(original, compressed, batches, max_logits_bytes):
    """The previous implementation: both models' sessions at once, each call's rows of both folded in turn."""
    sessions = [runtime.make_session(m, runtime.session_options(arena=False)) for m in (original, compressed)]
    sums, vocab = language._Sums(), None
    for feed in batches:
        ids = feed["input_ids"]
        targets, keep = next_token_targets(ids, feed["attention_mask"])
        batch, start = None, 0
        while start < len(ids):
            stop = start + (1 if vocab is None else language.rows_per_run(ids.shape[-1], vocab,
                                                                            limit=max_logits_bytes))
            part = {name: value[start:stop] for name, value in feed.items()}
            ref, out = (session.run(["logits"], part)[0] for session in sessions)
            vocab = ref.shape[-1]
            batch = batch or language._BatchSums(sums, vocab)
            batch.add(ref, out, targets[start:stop], keep[start:stop])
            start = stop
        batch.close()
    return sums.result()


@pytest.fixture(scope="module")
def models():
    model = decoder(False)
    worse, _ = compress(model, rank=1, progress=False)
    return model, worse


def batches():
    """Three batches of 5 rows of 6 tokens, the first row of each padded (its last two positions do not count)."""
    return [token_batch(batch=5, seed=s) for s in range(3)]


@pytest.mark.parametrize("park_bytes", [1, 5 * 6 * V * 4 + 1, language.PARK_BYTES])  # a span per batch, 2, 1
@pytest.mark.parametrize("rows", [None, 2])  # whole batches per call; two rows per call
def test_parked_metrics_are_the_same_bits_as_both_sessions(models, monkeypatch, park_bytes, rows):
    monkeypatch.setattr(language, "CHUNK_ELEMENTS", 7 * V)  # 7 positions a chunk: straddles calls and rows
    limit = 1 << 30 if rows is None else rows * 6 * V * 4
    want = both_sessions_path(*models, batches(), limit)
    made = []
    make = runtime.make_session
    monkeypatch.setattr(language.runtime, "make_session", lambda m, *a, **k: made.append(m) or make(m, *a, **k))
    got = language.compare_language_models(*models, batches(), progress=False, max_logits_bytes=limit,
                                           park_bytes=park_bytes)
    assert got == want and got.kl_divergence > 0 and got.tokens == 3 * (5 * 5 - 2)
    spans = {1: 3, 5 * 6 * V * 4 + 1: 2, language.PARK_BYTES: 1}[park_bytes]
    assert made == [models[0], models[1]] * spans  # the original then the compressed model, once per span


def test_one_session_at_a_time_and_the_parked_bytes_bounded(models, monkeypatch):
    live, sizes = [], []
    make = runtime.make_session

    def tracked(model, *args, **kwargs):
        assert not [ref for ref in live if ref() is not None], "a session was made while another was alive"
        session = make(model, *args, **kwargs)
        live.append(weakref.ref(session))
        return session

    park = language._ParkedLogits.park
    monkeypatch.setattr(language._ParkedLogits, "park", lambda self, *a: park(self, *a) or sizes.append(self.size))
    monkeypatch.setattr(language.runtime, "make_session", tracked)
    park_bytes = 5 * 6 * V * 4 + 1
    language.compare_language_models(*models, batches(), progress=False, max_logits_bytes=2 * 6 * V * 4,
                                     park_bytes=park_bytes)
    assert len(live) == 4
    batch_bytes = (5 * 5 - 2) * V * 4  # one batch's counted positions (a row's last has no target), float32
    assert max(sizes) <= park_bytes - 1 + batch_bytes  # a span stops at the batch that reaches the bound
    assert max(sizes) == 2 * batch_bytes  # the first span: two batches, parked as counted rows only


def with_extra_input(model):
    """The model with one more declared input, which the token data lacks: it fails on its first batch."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    return copy


def open_files_in(folder):
    """Open files of this process in `folder` (an anonymous file, O_TMPFILE or unlinked, shows as its folder
    and a number or name, then '(deleted)')."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the process's open files from /proc")
def test_nothing_left_in_the_temporary_folder(models, monkeypatch, tmp_path):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    seen = []
    park = language._ParkedLogits.park
    monkeypatch.setattr(language._ParkedLogits, "park",
                        lambda self, *a: park(self, *a) or seen.append((os.listdir(folder), open_files_in(folder))))
    language.compare_language_models(*models, batches(), progress=False)
    assert seen and all(names == [] and len(files) == 1 for names, files in seen)  # one file, with no name
    gc.collect()
    assert os.listdir(folder) == [] and open_files_in(folder) == []
    seen.clear()
    with pytest.raises(FwlrError, match="lacks input"):
        language.compare_language_models(models[0], with_extra_input(models[1]), batches(), progress=False)
    assert seen  # the error came after the original's logits were parked
    gc.collect()
    assert os.listdir(folder) == [] and open_files_in(folder) == []


def test_a_compressed_model_without_logits_fails_before_any_run(models, monkeypatch):
    runs = []
    monkeypatch.setattr(language, "_run_logits", lambda *a: runs.append(a))
    renamed = onnx.ModelProto()
    renamed.CopyFrom(models[1])
    renamed.graph.output[0].name = "scores"
    for node in renamed.graph.node:
        node.output[:] = ["scores" if name == "logits" else name for name in node.output]
    with pytest.raises(FwlrError, match="compressed model has no output 'logits'"):
        language.compare_language_models(models[0], renamed, batches(), progress=False)
    assert runs == []


def test_logits_of_another_shape_in_the_compressed_model_are_refused(models):
    """The compressed model's logits are checked against the original's shape (no original logits at hand)."""
    short = onnx.ModelProto()
    short.CopyFrom(models[1])
    graph = short.graph
    logits = next(o for o in graph.output)
    for node in graph.node:
        node.output[:] = ["full_logits" if name == logits.name else name for name in node.output]
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([0], np.int64), "slice_start"),
                              onnx.numpy_helper.from_array(np.array([V - 1], np.int64), "slice_end"),
                              onnx.numpy_helper.from_array(np.array([2], np.int64), "slice_axis")])
    graph.node.append(helper.make_node("Slice", ["full_logits", "slice_start", "slice_end", "slice_axis"],
                                       [logits.name]))
    with pytest.raises(FwlrError, match=r"has shape \(1, 6, 16\) \(original\) and \(1, 6, 15\) \(compressed\)"):
        language.compare_language_models(models[0], short, batches()[:1], progress=False, max_logits_bytes=1)
