"""What quantization costs beyond the sites' own statistics, measured in one pass over the calibration data.

- Embedding tables: token counts and output-gradient Grams (embedding.TableStats), so a table's error is
  priced in the loss units of the sites.
- Dynamic int8 rounds the *activation* too: ONNX Runtime quantizes each MatMul input per call, over the
  whole tensor, with step s = (max(x, 0) − min(x, 0)) / 255. Rounding noise of variance s²/12 per element
  costs σ² ‖W L_g‖² per sample in the K-FAC loss (L_g L_gᵀ the output-gradient Gram), which the weight
  residual alone misses (measured: it made int8's predicted loss 2-4x too low). The mean of s² over the
  calibration batches is recorded per input tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.batching import micro_batches, sample_axis_first
from onnx_fwlr.io.data import Batches, find_mask_input
from onnx_fwlr.quant.embedding import Table, TableStats, fold_lookup

DYNAMIC_LEVELS = 255  # uint8 activations


@dataclass
class QuantStats:
    tables: dict[str, TableStats] = field(default_factory=dict)
    step_squares: dict[str, float] = field(default_factory=dict)  # tensor -> mean over batches of s²
    # tensor -> per batch, the largest and smallest value of each channel (last axis): what the step would be
    # with some channels taken out of the int8 input (outlier channels, quant.graph)
    channel_ranges: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def rounding_variance(self, tensor: str) -> float:
        """Per-element variance of dynamic int8 rounding of `tensor`: E[s²] / 12."""
        return self.step_squares[tensor] / 12.0

    def largest_channels(self, tensor: str) -> np.ndarray:
        """Channel indices of `tensor`, largest magnitude over the calibration data first (ties by index)."""
        top = np.max([np.maximum(high, -low) for high, low in self.channel_ranges[tensor]], axis=0)
        return np.lexsort((np.arange(top.size), -top))

    def rounding_variance_without(self, tensor: str, channels) -> float:
        """rounding_variance of `tensor` once `channels` are zeroed in the int8 input (each batch's step from
        the other channels' range)."""
        kept = np.ones(self.channel_ranges[tensor][0][0].size, dtype=bool)
        kept[np.asarray(channels, dtype=np.int64)] = False
        steps = [(max(float(high[kept].max()), 0.0) - min(float(low[kept].min()), 0.0)) / DYNAMIC_LEVELS
                 for high, low in self.channel_ranges[tensor]]
        return float(np.mean(np.square(steps))) / 12.0


class Pricing:
    """The statistics QuantStats holds, folded from the forward values and cotangents of a pass someone else
    runs: the sites' Fisher pass (stats.fisher, so `--quantize` makes one pass over the data) or
    collect_quant_stats (statistics loaded from a file or measured in shards: no Fisher pass here).

    A batch may come in pieces (micro-batches, trailing padding trimmed): each piece's lookups are folded as
    it comes (fold_lookup), and its channel ranges join the batch's (maxima and minima: the same whatever the
    pieces), whose dynamic step is folded at the batch's end."""

    def __init__(self, tables: list[Table], tensors: list[str]):
        self.tables, self.tensors = list(tables), list(tensors)
        self.stats = QuantStats({t.name: TableStats(np.zeros(t.V), np.zeros((t.D, t.D))) for t in tables},
                                {name: 0.0 for name in tensors})
        self.batches = 0
        self._ranges: dict = {}  # tensor -> per-channel (high, low) over the batch's pieces so far

    @property
    def outputs(self) -> list[str]:
        """The lookups' outputs, whose cotangents the pass gives (its backward pass differentiates them)."""
        return sorted({o for t in self.tables for o in t.outputs})

    def exposed(self, fed) -> list[str]:
        """The forward values to read that are not fed: the lookups' index tensors and the priced tensors."""
        return sorted({i for t in self.tables for i in t.ids if i not in fed} | {t for t in self.tensors
                                                                                 if t not in fed})

    def lookup_ids(self, read) -> dict:
        """Index tensor -> its values, read by `read(name)` (before the pass lets forward values go)."""
        return {name: read(name) for table in self.tables for name in table.ids}

    def fold_ranges(self, read) -> None:
        """One piece's per-channel largest and smallest value of each priced tensor, read by `read(name)`."""
        for name in self.tensors:
            x = read(name)
            rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            high, low = rows.max(axis=0), rows.min(axis=0)
            if name in self._ranges:
                high, low = np.maximum(self._ranges[name][0], high), np.minimum(self._ranges[name][1], low)
            self._ranges[name] = (high, low)

    def fold_lookups(self, ids: dict, cotangents: list[dict], mask, samples: int) -> None:
        """One piece's tables: its index tensors (lookup_ids), each seed's cotangents of the lookups' outputs,
        its mask and its samples."""
        for table in self.tables:
            for ids_name, out in zip(table.ids, table.outputs):
                fold_lookup(self.stats.tables[table.name], ids[ids_name], [c[out] for c in cotangents], mask,
                            table.V, samples)

    def end_batch(self) -> None:
        """The batch's dynamic step of each priced tensor, from its pieces' ranges."""
        for name, (high, low) in self._ranges.items():
            self.stats.step_squares[name] += (float(max(high.max(), 0.0) - min(low.min(), 0.0)) / DYNAMIC_LEVELS) ** 2
            self.stats.channel_ranges.setdefault(name, []).append((high, low))
        self._ranges = {}
        self.batches += 1

    def result(self, description: str) -> QuantStats:
        """The statistics, each step square the mean over the batches."""
        if self.batches == 0:
            raise FwlrError(f"{description}: holds no samples; give at least one batch of calibration data.")
        return QuantStats(self.stats.tables, {name: total / self.batches for name, total in
                                              self.stats.step_squares.items()}, self.stats.channel_ranges)


def collect_quant_stats(model: onnx.ModelProto, tables: list[Table], tensors: list[str], batches: Batches, *,
                        loss: str | None, output: str | None = None, mask_input=None, samples: int = 1,
                        seed: int = 0, progress: bool = True) -> QuantStats:
    """Table statistics (seeded like the sites' Fisher pass: give its `loss` and `output`) and the dynamic
    quantization step of every tensor in `tensors`, in a pass of their own: for statistics that come without
    the sites' Fisher pass here (loaded from a file, measured in shards); otherwise the Fisher pass folds them
    (stats.fisher, `pricing`). With tables, a batch whose forward values would pass the Fisher pass's
    activation budget runs in micro-batches (as stats.fisher does: a language model's backward pass over a
    whole batch took gigabytes); a batch that fits runs whole."""
    from onnx_fwlr.io.data import find_token_input

    pricing = Pricing(tables, tensors)
    forward, backward = _passes(model, tables, tensors, loss, output)
    mask_name = find_mask_input(batches.specs, mask_input)
    token_name = find_token_input(batches.specs)
    rng = np.random.default_rng(seed)
    size = None if tables and sample_axis_first(model, batches.specs) else 0
    for feed, labels in tqdm(batches, desc="calibrate (quantization)", unit="batch", disable=not progress,
                             leave=False):
        if size is None:
            size = _fitting_size(forward, feed)
        for part, part_labels in micro_batches(feed, labels, size or None):
            values = forward(part)
            pricing.fold_ranges(values.__getitem__)
            if tables:
                backward(pricing, part, part_labels, values, mask_name, token_name, samples, rng)
            del values
        pricing.end_batch()
    return pricing.result(batches.description)


def _fitting_size(forward, feed: dict) -> int:
    """Samples per micro-batch whose forward values stay within the Fisher pass's ACTIVATION_BUDGET, measured on
    the first sample (not folded); the whole batch when it fits."""
    from onnx_fwlr.stats.fisher import ACTIVATION_BUDGET

    count = max((np.shape(v)[0] for v in feed.values() if np.ndim(v)), default=1)
    probe = {k: v[:1] if np.ndim(v) else v for k, v in feed.items()}
    per_sample = sum(np.asarray(v).nbytes for v in forward(probe).values())
    return max(1, min(count, ACTIVATION_BUDGET // max(per_sample, 1)))


def _passes(model, tables, tensors, loss, output):
    """(forward(feed) -> values, backward(...)): ONNX Runtime with the tensors exposed; the backward pass of
    autodiff only when there are tables to price."""
    if not tables:
        return _exposed_forward(model, tensors), None
    from onnx_fwlr.autodiff import losses
    from onnx_fwlr.autodiff.backward import GradientRunner
    from onnx_fwlr.stats.fisher import default_output

    if loss is None:
        raise RuntimeError("pricing embedding tables needs the loss of the sites' Fisher pass")
    target = losses.find_seed_target(model, default_output(model, output))
    fed = {i.name for i in model.graph.input}
    pricing = Pricing(tables, tensors)
    runner = GradientRunner(model, target.tensor, pricing.outputs, extra_outputs=pricing.exposed(fed))

    def forward(feed):
        return {**feed, **runner.forward(feed)}

    def backward(pricing, feed, labels, values, mask_name, token_name, samples, rng):
        """The tables' lookups and cotangents from one micro-batch; the last seed's backward pass lets each
        forward value go once it is read for the last time (`values` is the caller's scratch), as the Fisher
        pass does."""
        z = values[target.tensor]
        mask = feed.get(mask_name) if mask_name else None
        weight = mask if (mask is not None and z.ndim >= 3 and z.shape[:2] == mask.shape) else None
        seeds = losses.make_seeds(loss, z, target=target, labels=labels, draws=samples, rng=rng, weight=weight,
                                  tokens=feed.get(token_name) if token_name else None)
        batch = len(z) if z.ndim else 1
        del z
        lookups = pricing.lookup_ids(lambda name: feed[name] if name in feed else values[name])
        cotangents = [runner.backward(values, s, consume=number == len(seeds) - 1) for number, s in enumerate(seeds)]
        pricing.fold_lookups(lookups, cotangents, mask, batch)

    return forward, backward


def _exposed_forward(model: onnx.ModelProto, tensors: list[str]):
    """A session returning the given intermediate tensors (added as graph outputs of a copy)."""
    from onnx_fwlr.io.runtime import make_session

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    fed = {i.name for i in exposed.graph.input}
    names = [name for name in tensors if name not in fed]
    exposed.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                for name in names if name not in present)
    session = make_session(exposed)

    def forward(feed):
        return {**feed, **dict(zip(names, session.run(names, feed)))}

    return forward
