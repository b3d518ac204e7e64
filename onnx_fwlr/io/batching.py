"""Cutting batches for the passes that hold a whole batch's intermediates (the Fisher pass, refine, sequential):
into micro-batches of a few samples, and without the padding positions that no sample of the batch uses.

Both leave every statistic the same sum over the same real positions; the numbers differ from whole padded
batches only by float rounding (see docs/speed.md, "Compression cost", for the measured effect on MiniLM).

Padding: with an attention mask (`find_mask_input`), positions are right-padded tokens; a model that reads its
mask gives the real positions the same values whatever follows them, so the trailing positions where every
sample of the batch is padding are cut from every input laid out like the mask ([batch, seq], same sequence
dimension). The statistics already leave padding out (stats.activations), so only ORT and the backward pass see the
difference: on all-MiniLM-L6-v2's calibration text (57 positions, 18 real on average) batches of 32 keep 74 %
of the positions and micro-batches of 8 keep 56 %.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fwlr.io.data import InputSpec, find_token_input

# Samples per forward (and backward) pass in the passes that hold a batch's intermediates. The Fisher pass exposes
# about 25 MB per all-MiniLM-L6-v2 sample of 57 positions: its memory peak scales with this, not the batch.
MICRO_BATCH = 8

logger = logging.getLogger(__name__)


def seq_first_inputs(model: onnx.ModelProto) -> set[str]:
    """Tensors read as X [seq, batch, input] by an LSTM/GRU/RNN (layout 0): their first axis is time."""
    return {n.input[0] for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")
            and not any(a.name == "layout" and a.i == 1 for a in n.attribute)}


def sample_axis_first(model: onnx.ModelProto, specs: list[InputSpec]) -> bool:
    """Whether every input can be cut into samples along its first axis: the model fixes no batch size and no
    input is read sequence-first by an LSTM/GRU."""
    seq_first = seq_first_inputs(model)
    return all(spec.shape and not isinstance(spec.shape[0], int) and spec.name not in seq_first for spec in specs)


def micro_batches(feed: dict, labels, size: int | None):
    """The batch as consecutive pieces of at most `size` samples (None: whole), or whole when the inputs and
    labels do not share one leading sample axis."""
    counts = {np.shape(v)[0] if np.ndim(v) else -1 for v in feed.values()}
    if labels is not None:
        counts.add(np.shape(labels)[0] if np.ndim(labels) else -1)
    count = counts.pop() if len(counts) == 1 else -1
    if size is None or count <= size:
        yield feed, labels
        return
    for start in range(0, count, size):
        part = slice(start, start + size)
        yield {k: v[part] for k, v in feed.items()}, (labels[part] if labels is not None else None)


def padded_inputs(specs: list[InputSpec], mask_name: str | None) -> list[str]:
    """Inputs to cut with the mask: 2-D [batch, seq] like it, with the same symbolic sequence dimension (no
    input whose sequence length the model fixes), and the token ids even when their axis is named apart (a
    decoder's mask spans `total_sequence` = past + new tokens; without a past both are one length, and cutting
    the mask alone made ONNX Runtime refuse the batch). Empty without a mask: then nothing is cut."""
    spec = next((s for s in specs if s.name == mask_name), None)
    if spec is None or len(spec.shape) != 2 or isinstance(spec.shape[1], int):
        return []
    seq, tokens = spec.shape[1], find_token_input(specs)
    return [s.name for s in specs if len(s.shape) == 2 and not isinstance(s.shape[1], int)
            and (s.shape[1] == seq or seq is None or s.shape[1] is None or s.name == tokens)]


def trim_padding(feed: dict, labels, mask_name: str | None, names: list[str]):
    """(feed, labels) without the trailing positions where the mask is zero for every sample; only the named
    inputs (padded_inputs) and labels shaped like the mask are cut, and at least one position is kept."""
    mask = feed.get(mask_name) if mask_name else None
    if not names or mask is None or mask.ndim != 2:
        return feed, labels
    if any(np.shape(feed[k]) != mask.shape for k in names if k in feed):
        return feed, labels  # e.g. a decoder's past + new mask beside new token ids: cut all or none
    used = np.flatnonzero(np.any(mask != 0, axis=0))
    length = max(int(used[-1]) + 1 if used.size else 1, 1)
    if length == mask.shape[1]:
        return feed, labels
    trimmed = {k: (v[:, :length] if k in names and v.shape == mask.shape else v) for k, v in feed.items()}
    if labels is not None and np.shape(labels) == mask.shape:
        labels = labels[:, :length]
    return trimmed, labels


class PaddingTrimmer:
    """Runs `step(feed, labels)` on batches cut by trim_padding until the model refuses a shorter sequence: some
    exports fix the length inside the graph (a causal mask traced at one length), and from then on batches go
    whole. A real error is raised again by the whole batch."""

    def __init__(self, mask_name: str | None, names: list[str]):
        self.mask_name, self.names = mask_name, list(names)

    def __call__(self, step, feed: dict, labels):
        if self.names:
            trimmed, trimmed_labels = trim_padding(feed, labels, self.mask_name, self.names)
            if trimmed is not feed:
                try:
                    return step(trimmed, trimmed_labels)
                except Exception as exc:  # noqa: BLE001 (ONNX Runtime raises its own types)
                    logger.info("the model refuses a trimmed sequence (%s); padding is kept from now on", exc)
                    self.names = []
        return step(feed, labels)
