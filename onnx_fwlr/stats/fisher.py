"""Gradient (Fisher) statistics from a calibration run: forward in ONNX Runtime, backward in numpy.

One pass gives both the activation statistics of every site input (the same sums as calibration.py,
computed from the exposed inputs) and, per site, the per-sample Fisher sums of its weight gradient
dW_n = X_nᵀ G_n and the output-gradient Gram Σ g gᵀ, for fwsvd, kfac and loss-unit global allocation.

For an LSTM/GRU input weight the site's output is the input projection X_t Wᵀ, which is no tensor of the
graph: the backward pass stops at the op's outputs and backpropagation through time
(autodiff.recurrent_vjp.input_projection_grads) gives G per step; a sample is a batch entry, its positions
the time steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from threadpoolctl import ThreadpoolController
from tqdm.auto import tqdm

from onnx_fwlr.autodiff import losses
from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.autodiff.recurrent_vjp import GATES, input_projection_grads
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.outputs import score_outputs
from onnx_fwlr.io.batching import MICRO_BATCH, PaddingTrimmer, micro_batches, padded_inputs, sample_axis_first
from onnx_fwlr.io.data import Batches, find_mask_input, find_token_input
from onnx_fwlr.io.onnx_utils import FLOAT_TYPES
from onnx_fwlr.io.runtime import release_free_memory, return_large_blocks_promptly
from onnx_fwlr.io.spill import SpillFile
from onnx_fwlr.sites.find import Site
from onnx_fwlr.stats.activations import GRAM_BYTES_PER_ENTRY, main_graph_tensors, record_pass
from onnx_fwlr.stats.store import Statistics, activation_key, model_fingerprint


def default_output(model: onnx.ModelProto, name: str | None, option: str = "`output`") -> str:
    """The output the loss is defined on: the one named (by `option`), else the first floating-point output."""
    outputs = [o.name for o in model.graph.output]
    if name is not None:
        if name not in outputs:
            raise FwlrError(f"{option} '{name}' is not an output of the model; its outputs are {outputs}.")
        return name
    for out in model.graph.output:
        if out.type.tensor_type.elem_type in FLOAT_TYPES:
            return out.name
    raise FwlrError("the model has no floating-point output to define a loss on; use an activation-based method.")


def reachable_uses(model, sites) -> list:
    """(site, use) for the site uses the backward pass reaches: those in the main graph (gradients do not enter
    subgraphs)."""
    return _reachable_uses(model, sites)


def _reachable_uses(model, sites):
    """Site uses in the main graph (gradients do not enter subgraphs)."""
    visible = main_graph_tensors(model)
    return [(site, use) for site in sites for use in site.uses
            if use.graph_index == 0 and use.input in visible and use.output in visible]


def _recurrent_node(model, use) -> onnx.NodeProto | None:
    """The LSTM/GRU node of a recurrent site's use (None for MatMul/Gemm uses)."""
    return model.graph.node[use.node_index] if use.op_type in GATES else None


def _attributes(node: onnx.NodeProto) -> dict:
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else [e.decode() if isinstance(e, bytes) else e for e in v]
            if isinstance(v, list) else v for k, v in values.items()}


def _gradient_tensors(use, node) -> list[str]:
    """Tensors whose cotangents give the site's output gradient: its output, or all outputs of the recurrent op."""
    return [use.output] if node is None else [o for o in node.output if o]


def _read_tensors(use, node) -> list[str]:
    """Forward values the statistics read: the site input, or every input of the recurrent op (to recompute it)."""
    return [use.input] if node is None else [i for i in node.input if i]


def _site_rows(values, use, node) -> np.ndarray:
    """The site input as [samples, positions, K]; a recurrent op's X batch first whatever its layout."""
    if node is None:
        return _rows(values[use.input], use.trans_a)
    x = values[use.input]
    return x if _attributes(node).get("layout", 0) else np.swapaxes(x, 0, 1)


def _site_output_grads(values, cotangents, use, node, samples: int) -> np.ndarray:
    """Cotangent of the site output as [samples, positions, N] (recurrent: of X_t Wᵀ per step, by BPTT)."""
    if node is None:
        G = cotangents[use.output]
        return (G * use.alpha if use.alpha != 1.0 else G).reshape(samples, -1, G.shape[-1])
    ins = [values[name] if name else None for name in node.input]
    grads = [cotangents.get(name) if name else None for name in node.output]
    return input_projection_grads(node.op_type, ins, _attributes(node), grads)


def _next_token_logits(output: str, z: np.ndarray, tokens: np.ndarray | None) -> bool:
    """A language model's logits: an output named like 'logits', shaped [batch, seq, vocab] over the input ids."""
    return (tokens is not None and "logits" in output.lower() and z.ndim == 3 and z.shape[:2] == tokens.shape
            and z.shape[-1] > int(tokens.max(initial=0)))


def _rows(x: np.ndarray, transposed: bool) -> np.ndarray:
    """The site input as [samples, positions, K] (a Gemm with transA reads X [K, M])."""
    if transposed:
        x = x.T
    if x.ndim == 1:
        return x.reshape(1, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _leading(shape: tuple, transposed: bool) -> int:
    """The samples _rows gives an input of this shape (its first axis; 1 for a vector), without the array."""
    shape = tuple(shape)[::-1] if transposed else tuple(shape)
    return 1 if len(shape) == 1 else shape[0]


def _keep(x3: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """[samples, positions] True where the attention mask marks a real token; None without a mask that fits."""
    return mask != 0 if mask is not None and x3.shape[:2] == mask.shape else None


def _activation_sums(x3: np.ndarray, keep: np.ndarray | None) -> dict:
    """The sums calibration.py measures; padding rows are dropped (as there), not zeroed: they cost nothing."""
    rows = x3.reshape(-1, x3.shape[-1]).astype(np.float32, copy=False)
    if keep is not None:
        rows = rows[keep.reshape(-1)]
    return {"gram": rows.T @ rows, "sum": rows.sum(0, dtype=np.float64),
            "abs_sum": np.abs(rows).sum(0, dtype=np.float64), "count": float(rows.shape[0])}


def _gradient_setup(model, sites, output, providers=("CPUExecutionProvider",), pricing=None):
    """(loss output, seed target, reachable uses, their recurrent nodes, GradientRunner): everything the
    backward pass needs, built before any data is read (an op without a gradient rule fails here). With
    `pricing` (quant.calibration.Pricing), the runner also gives its lookups' cotangents and exposes the
    forward values it reads."""
    out_name = default_output(model, output)
    target = losses.find_seed_target(model, out_name)
    uses = _reachable_uses(model, sites)
    if not uses:
        raise FwlrError("no site is reachable by the backward pass (all inside subgraphs); use `method` whiten.")
    nodes = [_recurrent_node(model, use) for _, use in uses]
    wrt = sorted({name for (_, use), node in zip(uses, nodes) for name in _gradient_tensors(use, node)})
    inputs = sorted({name for (_, use), node in zip(uses, nodes) for name in _read_tensors(use, node)}
                    | set(pricing.exposed({i.name for i in model.graph.input}) if pricing is not None else ()))
    # the lookups' cotangents on the side: the session stays the sites' own (the same forward values, bit for bit)
    runner = GradientRunner(model, target.tensor, wrt, providers=providers, extra_outputs=inputs,
                            side_wrt=pricing.outputs if pricing is not None else ())
    # No memory arena: every exposed tensor is an output, copied out to numpy; an arena would keep a second
    # copy of the largest run's (a decoder's activations for a micro-batch: gigabytes).
    runner.session_options = _session_options()
    return out_name, target, uses, nodes, runner


def _session_options():
    from onnx_fwlr.io import runtime

    return runtime.session_options(spinning=False, quiet=False, arena=False, shapes_first=True)


# Most bytes of exposed forward values per micro-batch: a larger model runs fewer samples at a time
# (_fitting_micro_batch). The backward pass holds about as much again in cotangents.
ACTIVATION_BUDGET = 128 << 20


# Bytes of a sample's forward values the recorded pass's backward walk keeps in memory ahead of where it is;
# the rest wait in a temporary file until their first reader (GradientRunner.park). Nothing: the walk starts at
# the LM head, whose weight it maps (113 MB on SmolLM2), just after ONNX Runtime handed every value over at
# once; 32 MiB kept resident peaked 25 MiB higher there (docs/llm.md).
PARK_RESIDENT = 0


def _fitting_micro_batch(runner, feed: dict, size: int | None) -> int | None:
    """The micro-batch size whose exposed forward values stay within ACTIVATION_BUDGET, measured by running the
    first sample of the first batch (not folded); `size` when that already fits (small models keep it)."""
    if size is None:
        return None
    probe = {k: v[:1] if np.ndim(v) else v for k, v in feed.items()}
    per_sample = runner.value_bytes(runner.forward(probe, lazy=True))
    return max(1, min(size, ACTIVATION_BUDGET // max(per_sample, 1)))


def class_scores(model: onnx.ModelProto, output: str) -> bool | None:
    """Whether `output` is class scores by the rule validation uses (a linear layer through at most a bias, a
    temperature, a reshape or a softmax; evaluate.outputs), which decides the default loss of a 2-D output:
    'mc' for scores, 'gaussian' for an embedding such as a normalised mean pool. None when unreadable."""
    scores = score_outputs(model)
    return None if scores is None else output in scores


def gradient_obstacle(model: onnx.ModelProto, sites: list[Site], output: str | None = None) -> str | None:
    """Why the backward pass cannot give these sites gradients (an op without a rule, no float output...), as
    the sentence collect_fisher_stats would raise; None when it can. Reads no data."""
    try:
        _gradient_setup(model, sites, output)
    except FwlrError as exc:
        return str(exc)
    return None


class _BatchFolder:
    """Runs one (micro-)batch forward and backward and folds its sums into `stats`; what it exposes and computes
    is freed when the call returns."""

    def __init__(self, runner, target, out_name, uses, nodes, mask_name, token_name, loss, samples, rng, stats,
                 sketch_ranks=None, recording=None, fold_weights=None, pricing=None):
        self.runner, self.target, self.out_name, self.uses, self.nodes = runner, target, out_name, uses, nodes
        self.pricing = pricing  # quant.calibration.Pricing: --quantize's statistics, folded from this pass
        self.recording = recording  # a PassRecording: set the arrays aside instead of folding them
        self.folded = [fold_weights is None or site.weight in fold_weights for site, _ in uses]
        self.sketch_ranks = sketch_ranks or {}  # weight -> rank of its output-side estimator (wide sites only)
        self.mask_name, self.token_name, self.loss, self.samples = mask_name, token_name, loss, samples
        self.rng, self.stats = rng, stats
        self.class_scores = None  # the graph's reading of the output, for the default loss (collect_fisher_stats)
        self.keys = sorted({activation_key(use) for (_, use), folded in zip(uses, self.folded) if folded})

    def __call__(self, feed: dict, labels) -> None:
        values = self.runner.forward(feed, lazy=self.recording is not None)
        z = values[self.target.tensor]
        tokens = feed.get(self.token_name) if self.token_name else None
        if self.loss is None:
            self.loss = losses.default_seed_loss(self.target, z.shape, labels is not None,
                                                 next_token=_next_token_logits(self.out_name, z, tokens),
                                                 class_scores=self.class_scores)
        mask = feed.get(self.mask_name) if self.mask_name else None
        weight = mask if (mask is not None and z.ndim >= 3 and z.shape[:2] == mask.shape) else None
        batch = len(z) if z.ndim else 1
        self.stats.meta["samples"] += batch
        lookups = self._price_inputs(feed, values) if self.pricing is not None else None
        if self.recording is not None:
            entry, samples = self._record_inputs(values, mask)
            parked = self.runner.park(values, PARK_RESIDENT)  # before the seeds: they are made beside the values
        seeds = losses.make_seeds(self.loss, z, target=self.target, labels=labels, draws=self.samples, rng=self.rng,
                                  weight=weight, tokens=tokens)
        if self.recording is not None:
            del z
            self.runner.drop_unread(values)  # the logits: backward needs their shape once the seeds exist
            try:
                priced = self._record_grads(values, seeds, entry, samples)
            finally:
                if parked is not None:
                    parked.close()
            if self.pricing is not None:
                self.pricing.fold_lookups(lookups, priced, mask, batch)
            return
        for key in self.keys:
            use, node = next((u, n) for (_, u), n in zip(self.uses, self.nodes) if activation_key(u) == key)
            x3 = _site_rows(values, use, node)
            _fold_input(self.stats, key, x3, mask)
        priced = []
        for seed_value in seeds:
            cotangents = self.runner.backward(values, seed_value)
            for (site, use), node, folded in zip(self.uses, self.nodes, self.folded):
                if not folded:
                    continue
                X = _site_rows(values, use, node)
                G = _site_output_grads(values, cotangents, use, node, X.shape[0])
                _fold_gradient(self.stats, site, X, G, mask, self.sketch_ranks.get(site.weight))
            if self.pricing is not None:
                priced.append({name: cotangents[name] for name in self.pricing.outputs})
            del cotangents
        if self.pricing is not None:
            self.pricing.fold_lookups(lookups, priced, mask, batch)

    def _price_inputs(self, feed: dict, values: dict) -> dict:
        """--quantize's reads of the forward values (quant.calibration.Pricing), before the pass lets them go:
        the priced tensors' channel ranges are folded, the lookups' index tensors returned."""
        def read(name):
            return feed[name] if name in feed else self.runner.value(values, name)

        self.pricing.fold_ranges(read)
        return self.pricing.lookup_ids(read)

    # Recording (PassRecording): the batch's site inputs and cotangents are set aside, each as soon as it
    # exists, and the forward values leave memory as early as they can: the site inputs no backward step reads
    # once recorded, the values the walk reads late until it reaches them (GradientRunner.park), each value
    # after its last reader and each site's cotangent when it is complete (GradientRunner.backward's `consume`
    # and `emit`). So a sample's forward values and every site's cotangent are not all held at once. Only for
    # sites that are not recurrent (uses read one input tensor).

    def _record_inputs(self, values: dict, mask) -> tuple[_Entry, list[int]]:
        """Start the batch's entry with its mask and site inputs; returns it and each use's sample count."""
        entry = self.recording.start(mask)
        for key in self.keys:
            use, node = next((u, n) for (_, u), n in zip(self.uses, self.nodes) if activation_key(u) == key)
            entry.inputs[key] = self.recording.put(_rows(self.runner.value(values, use.input), use.trans_a))
        samples = [_leading(self.runner.shape(values, use.input), use.trans_a) for _, use in self.uses]
        self.runner.drop_unread(values, keep=[self.target.tensor])
        return entry, samples

    def _record_grads(self, values: dict, seeds, entry: _Entry, samples: list[int]) -> list[dict]:
        """Run the backward pass for each seed, setting each site's output cotangent aside when complete;
        returns each seed's cotangents of the priced lookups' outputs (none without `pricing`)."""
        by_output: dict = {}
        for i, (_, use) in enumerate(self.uses):
            by_output.setdefault(use.output, []).append(i)
        lookups = set(self.pricing.outputs) if self.pricing is not None else set()
        priced = []
        for number, seed_value in enumerate(seeds):
            refs, kept = [None] * len(self.uses), {}

            def emit(name, cotangent, refs=refs, kept=kept):
                for i in by_output.get(name, ()):
                    use = self.uses[i][1]
                    refs[i] = self.recording.put(_site_output_grads({}, {name: cotangent}, use, None, samples[i]))
                if name in lookups:
                    kept[name] = cotangent

            self.runner.backward(values, seed_value, consume=number == len(seeds) - 1, emit=emit)
            entry.grads.append(refs)
            priced.append(kept)
        return priced


def _fold_input(stats: Statistics, key: str, x3: np.ndarray, mask) -> None:
    """One (micro-)batch's activation sums of one site input, folded into `stats`."""
    Statistics.fold(stats.activations.setdefault(key, {}), _activation_sums(x3, _keep(x3, mask)))


def _fold_gradient(stats: Statistics, site: Site, X: np.ndarray, G: np.ndarray, mask, sketch_rank) -> None:
    """One (micro-)batch's gradient sums of one site use, folded into `stats`."""
    acc = stats.gradients.setdefault(site.weight, {})
    losses.accumulate_fisher(acc, X, G, keep=_keep(X, mask), sketch_rank=sketch_rank)


@dataclass
class _Entry:
    """One recorded (micro-)batch: where its mask, site inputs (per activation key) and output cotangents (per
    seed, per use in the pass's order) lie in the recording's file."""

    mask: tuple | None
    inputs: dict = field(default_factory=dict)
    grads: list = field(default_factory=list)


class PassRecording:
    """One Fisher pass's folding work set aside on disk: for each (micro-)batch, in order, every site input and
    every output cotangent the pass would fold (float32, in a SpillFile, an anonymous temporary file). The
    statistics of any group of sites are then folded from it (`fold`) with the same functions on the same
    arrays in the same order as the pass folds them in memory: the same sums to the bit, with one forward and
    backward pass in all instead of one per group, and no Gram held while the pass runs.

    Costs disk, not memory: the tokens times the widths of the distinct site inputs and outputs, in float32
    (SmolLM2-135M, 64 × 128 tokens: 7.2 GiB; the file is freed when the statistics go).

    With `path` the file is a named one, and the recording pickles as that path and its table of entries: other
    processes fold their groups from it (pipeline.distributed's group tasks on a Ray cluster)."""

    def __init__(self, path=None):
        self.file = SpillFile(prefix="onnx-fwlr-pass-", path=path)
        self.entries: list[_Entry] = []
        self.uses: list = []  # (site, use) in the pass's order
        self.sketch_ranks: dict = {}

    def start(self, mask) -> _Entry:
        entry = _Entry(None if mask is None else self.put(np.asarray(mask)))
        self.entries.append(entry)
        return entry

    def put(self, array: np.ndarray) -> tuple:
        return self.file.append(array), array.dtype.str, array.shape

    def get(self, ref: tuple) -> np.ndarray:
        offset, dtype, shape = ref
        return self.file.read(offset, np.dtype(dtype), shape)

    def fold(self, sites: list[Site], stats: Statistics) -> Statistics:
        """The sums of `sites` (activation and gradient) folded into `stats`, batch by batch as recorded."""
        weights = {site.weight for site in sites}
        chosen = [i for i, (site, _) in enumerate(self.uses) if site.weight in weights]
        keys = sorted({activation_key(self.uses[i][1]) for i in chosen})
        with ThreadpoolController().limit(limits=1, user_api="blas"):  # as in the pass (collect_fisher_stats)
            self._fold_entries(chosen, keys, stats)
        for weight in weights:
            acc = stats.gradients.get(weight)
            if acc is not None:
                acc["grad_count"] = np.asarray(float(acc["grad_count"]))
        return stats

    def _fold_entries(self, chosen: list[int], keys: list[str], stats: Statistics) -> None:
        for entry in self.entries:
            mask = None if entry.mask is None else self.get(entry.mask)
            inputs = {key: self.get(entry.inputs[key]) for key in keys}
            for key in keys:
                _fold_input(stats, key, inputs[key], mask)
            for refs in entry.grads:
                for i in chosen:
                    site, use = self.uses[i]
                    _fold_gradient(stats, site, inputs[activation_key(use)], self.get(refs[i]), mask,
                                   self.sketch_ranks.get(site.weight))


def collect_fisher_stats(
    model: onnx.ModelProto,
    sites: list[Site],
    batches: Batches,
    mask_input: str | None = None,
    loss: str | None = None,
    output: str | None = None,
    samples: int = 1,
    seed: int = 0,
    progress: bool = True,
    providers=("CPUExecutionProvider",),
    micro_batch: int | None = MICRO_BATCH,
    trim: bool = True,
    sketch_min_dim: int = losses.SKETCH_MIN_DIM,
    sketch_rank: int = losses.SKETCH_RANK,
    description: str = "calibrate (fisher)",
    recording: PassRecording | None = None,
    fold_sites: list[Site] | None = None,
    pricing=None,
) -> Statistics:
    """Activation and gradient statistics for every site the backward pass reaches, in one pass over the data.

    loss: 'ce' (labels), 'mc' (sampled from the model's own softmax), 'gaussian' (ε ~ N(0, I) on the
    output) or 'lm' (next-token cross-entropy of a language model: targets are the input ids shifted by
    one, padding masked); default 'ce' with labels, 'lm' for a 'logits' output [batch, seq, vocab] of a
    model fed input ids, else by the output's kind (losses.default_seed_loss). `samples` seeds per batch
    for 'mc'/'gaussian'. Seeded, so reproducible.

    Each batch is run forward and backward in pieces of `micro_batch` samples (None: whole), each folded into
    the sums as it is done, so memory grows with the piece, not the batch; with `trim`, a piece's trailing
    positions that are padding in every sample are not run at all (io.batching; docs/speed.md, "Compression
    cost").

    A site wider than `sketch_min_dim` outputs (an LM head: the vocabulary) keeps its output-gradient Gram as a
    rank-`sketch_rank` factor plus the exact diagonal (autodiff.losses.fold_sketch), never N × N.

    `recording` (a PassRecording): set every batch's arrays aside in it instead of folding them; the statistics
    returned then hold the pass's metadata only, and `recording.fold` gives any group's sums.
    `fold_sites`: run the pass over every site in `sites` but fold only these: the forward values ONNX Runtime
    computes depend on which tensors the session exposes (its fusions change), so a group's sums equal one
    whole pass's only when measured in the whole pass's session.
    `pricing` (quant.calibration.Pricing): also fold --quantize's statistics (embedding tables, dynamic int8's
    activation ranges) from this pass's values and cotangents, so quantization needs no pass of its own.
    """
    if loss is not None and loss not in losses.LOSSES:
        raise FwlrError(f"unknown loss '{loss}'; choose one of {', '.join(losses.LOSSES)}.")
    if samples < 1:
        raise FwlrError(f"`samples` {samples} is out of range; it must be a positive integer.")
    out_name, target, uses, nodes, runner = _gradient_setup(model, sites, output, providers, pricing)
    return_large_blocks_promptly()  # the pass's arrays go back to the system when freed, not to glibc's heap
    mask_name = find_mask_input(batches.specs, mask_input)
    token_name = find_token_input(batches.specs)
    rng = np.random.default_rng(seed)
    stats = Statistics(model_fingerprint(model), meta={
        "samples": 0, "batches": 0, "smoke_test": batches.smoke_test, "data": batches.description,
        "mask_input": mask_name, "fisher_output": out_name, "seed_tensor": target.tensor})
    sketch_ranks = {site.weight: sketch_rank for site, _ in uses if losses.sketched(site.N, sketch_min_dim)}
    if recording is not None:
        recording.uses, recording.sketch_ranks = uses, sketch_ranks
    fold_weights = None if fold_sites is None else {site.weight for site in fold_sites}
    fold = _BatchFolder(runner, target, out_name, uses, nodes, mask_name, token_name, loss, samples, rng, stats,
                        sketch_ranks, recording, fold_weights, pricing)
    if loss is None:
        fold.class_scores = class_scores(model, out_name)
    splittable = sample_axis_first(model, batches.specs)
    trimmer = PaddingTrimmer(mask_name, padded_inputs(batches.specs, mask_name) if trim else [])
    start = time.perf_counter()
    # One BLAS thread for the numpy work between ORT runs (per-sample products, the VJPs): OpenBLAS's spinning
    # threads made it several times slower on a loaded 2-core machine, and ORT keeps its own threads.
    with ThreadpoolController().limit(limits=1, user_api="blas"):
        size = None
        for feed, labels in tqdm(batches, desc=description, unit="batch", disable=not progress,
                                 leave=False):
            if size is None:
                size = _fitting_micro_batch(runner, feed, micro_batch if splittable else None) or 0
            for part, part_labels in micro_batches(feed, labels, size or None):
                trimmer(fold, part, part_labels)
            if pricing is not None:
                pricing.end_batch()
            stats.meta["batches"] += 1
    chosen_loss = fold.loss
    if stats.meta["batches"] == 0:
        raise FwlrError(f"{batches.description}: holds no samples; give at least one batch of calibration data.")
    stats.meta.update(loss=chosen_loss, fisher_samples=samples, seconds=time.perf_counter() - start)
    for acc in stats.gradients.values():
        acc["grad_count"] = np.asarray(float(acc["grad_count"]))
    del fold, runner  # the session and the last batch's intermediates
    release_free_memory()
    return stats


# --- statistics larger than memory: one backward pass per group of sites --------------------------------

# Arrays dropped when the next group is measured; the small per-channel sums stay for bias correction, the
# report and fwsvd-style reads.
_LARGE_FIELDS = ("gram", "grad_gram", "grad_sketch", "grad_diag")


def small_sums(stats: Statistics) -> Statistics:
    """The statistics without their Grams and Gram estimators (_LARGE_FIELDS): the per-channel sums and counts
    that bias correction, the report and diagonal methods read."""
    small = Statistics(stats.fingerprint, meta=dict(stats.meta))
    for mine, theirs in ((small.activations, stats.activations), (small.gradients, stats.gradients)):
        for key, sums in theirs.items():
            mine[key] = {name: value for name, value in sums.items() if name not in _LARGE_FIELDS}
    return small


def fisher_site_bytes(site: Site, sketch_min_dim: int = losses.SKETCH_MIN_DIM,
                      sketch_rank: int = losses.SKETCH_RANK) -> int:
    """Bytes of a site's output-side statistic while it is measured (the estimator's folding peak for a wide one)."""
    if losses.sketched(site.N, sketch_min_dim):
        return losses.sketch_peak_bytes(site.N, sketch_rank)
    return GRAM_BYTES_PER_ENTRY * site.N * site.N


def fisher_stats_bytes(sites: list[Site], **sketch) -> int:
    """What one pass holds for these sites: every distinct input's Gram and every output-side statistic."""
    inputs = {activation_key(u): s.K for s in sites for u in s.uses}
    return GRAM_BYTES_PER_ENTRY * sum(K * K for K in inputs.values()) + sum(
        fisher_site_bytes(s, **sketch) for s in sites)


def fisher_groups(sites: list[Site], limit: int, **sketch) -> list[list[Site]]:
    """Sites in order, cut into consecutive groups whose statistics fit in `limit` bytes (a site alone larger
    than the limit makes a group of its own: the limit is a target)."""
    groups: list[list[Site]] = []
    for site in sites:
        if groups and fisher_stats_bytes(groups[-1] + [site], **sketch) <= limit:
            groups[-1].append(site)
        else:
            groups.append([site])
    return groups


class GroupedFisherStatistics(Statistics):
    """Gradient and activation statistics held one group of sites at a time, for models whose Grams together do
    not fit in memory: a decoder's FFN Grams alone are 30 GB at 1.1 B parameters.

    One forward and backward pass over the data sets every batch's site inputs and cotangents aside on disk
    (PassRecording) and folds the first group's sums from them; asking for a large statistic of a site of
    another group drops the current group's Grams and folds that group's. Decomposing in site order therefore
    reads the recording once, and the sums are those of one pass. The small sums of every group folded stay.
    A model with recurrent sites (whose statistics re-run the op) measures each group in a pass of its own.
    """

    def __init__(self, model, sites: list[Site], groups: list[list[Site]], batches: Batches, options: dict,
                 pricing=None):
        super().__init__(model_fingerprint(model))
        self._measure_sites = lambda group, text, recording=None, pricing=None: collect_fisher_stats(
            model, group, batches, description=text, recording=recording, pricing=pricing, **options)
        self.groups = groups
        self.group_of = {site.weight: g for g, group in enumerate(groups) for site in group}
        reachable = _reachable_uses(model, sites)
        self._with_gradients = {site.weight for site, _ in reachable}
        self._with_activations = {activation_key(use) for _, use in reachable}
        self.later_seconds = 0.0
        self.current = None
        self._recording = None
        if not any(_recurrent_node(model, use) is not None for _, use in reachable):
            self._record([site for group in groups for site in group], pricing)
        self._measure(0)

    def _record(self, sites: list[Site], pricing=None) -> None:
        """The one pass, set aside (its metadata is the statistics' own); `pricing` folded from it (a pass per
        group, for recurrent sites, leaves it to a pass of its own: each group's session exposes other values)."""
        start = time.perf_counter()
        self._recording = PassRecording()
        measured = self._measure_sites(sites, "calibrate (fisher), one pass set aside on disk", self._recording,
                                       pricing)
        record_pass(self, measured.meta, start)
        self.meta["set_aside_bytes"] = self._recording.file.size
        self.later_seconds = 0.0

    def _drop_large(self) -> None:
        for table in (self.activations, self.gradients):
            for sums in table.values():
                for name in _LARGE_FIELDS:
                    sums.pop(name, None)
        release_free_memory()

    def _measure(self, index: int) -> None:
        start = time.perf_counter()
        self._drop_large()
        if self._recording is not None:
            folded = self._recording.fold(self.groups[index], Statistics(self.fingerprint))
            self.activations.update(folded.activations)
            self.gradients.update(folded.gradients)
            self.current = index
            self.meta["fold_seconds"] = self.meta.get("fold_seconds", 0.0) + time.perf_counter() - start
            if index:  # folding a later group runs during decomposition
                self.later_seconds += time.perf_counter() - start
            return
        done = self.meta.get("passes", 0)
        description = f"calibrate (fisher) group {index + 1} of {len(self.groups)}"
        if done:  # every pass reads the same data: the mean pass so far times the passes left
            left = (self.meta["seconds"] / done) * (len(self.groups) - done)
            description += f", about {left / 60:.1f} min for the passes left"
        measured = self._measure_sites(self.groups[index], description)
        self.activations.update(measured.activations)
        self.gradients.update(measured.gradients)
        self.current = index
        record_pass(self, measured.meta, start)

    def release(self) -> None:
        """Drop the current group's Grams until a site of it is asked for again (folded again from the recorded
        pass: the same sums), for a caller that runs another pass first (--quantize's pricing pass); without a
        recording (recurrent sites: a pass per group) they stay."""
        if self._recording is not None:
            self._drop_large()
            self.current = None

    def _ensure(self, site: Site) -> None:
        index = self.group_of.get(site.weight)
        if index is not None and index != self.current:
            self._measure(index)

    def _activation_sums(self, site: Site) -> tuple[dict, float]:
        if not all(activation_key(u) in self.activations for u in site.uses):
            self._ensure(site)
        return super()._activation_sums(site)

    def input_gram(self, site: Site) -> np.ndarray:
        self._ensure(site)
        return super().input_gram(site)

    def fisher_row(self, site: Site) -> np.ndarray:
        if site.weight not in self.gradients:
            self._ensure(site)
        return super().fisher_row(site)

    def output_grad_gram(self, site: Site) -> np.ndarray:
        self._ensure(site)
        return super().output_grad_gram(site)

    def output_grad_sketch(self, site: Site):
        self._ensure(site)
        return super().output_grad_sketch(site)

    def has_activations(self, site: Site) -> bool:
        return all(activation_key(u) in self._with_activations for u in site.uses)

    def has_gradients(self, site: Site) -> bool:
        return site.weight in self._with_gradients

    def save(self, path) -> None:
        raise FwlrError("gradient statistics measured in groups hold one group's Grams at a time and cannot be "
                        "saved; raise `stats_memory` to measure them in one pass.")
