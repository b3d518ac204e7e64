"""Language-model checks: perplexity of an original and a compressed decoder, and cached greedy decoding.

`compare_language_models` runs both models on token batches and folds, per batch, the next-token
negative log-likelihoods, the top-1 agreement and the KL divergence between their next-token
distributions into float64 sums. Memory stays bounded whatever the batch size and vocabulary, and only
one model's ONNX Runtime session exists at a time: the original runs first over a span of batches and the
logits of its counted positions wait on disk (`_ParkedLogits`: float32 as run, in one anonymous temporary
file, at most `PARK_BYTES` a span), its session goes, then the compressed model runs over the same span
and is folded with them. Each ONNX Runtime call gets as many rows of a batch as keep its logits
[rows, T, V] within `LOGITS_BYTES` (`rows_per_run`), and the logits are folded in chunks of about
`CHUNK_ELEMENTS` float64 entries (`_BatchSums`: the same chunks, in the same order, as one call per batch,
so the metrics do not depend on how the rows were run nor on where the original's logits waited).

`greedy_check` generates greedily twice — re-running the whole sequence each step, and with the KV
cache (present outputs fed back as past inputs) — and reports whether the two agree. It takes a
decoder with past inputs (optimum's with-past model, or a merged model with `use_cache_branch`),
optionally with the no-cache model for the first step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from onnx_fwlr.autodiff.losses import next_token_targets
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io import runtime
from onnx_fwlr.io.spill import SpillFile

CHUNK_ELEMENTS = 1 << 20
LOGITS_BYTES = 64 << 20  # logits one ONNX Runtime call may return per model (at least one row is run)
PARK_BYTES = 2 << 30  # the original's logits waiting on disk for the compressed model's (at least one batch)
CACHE_FLAG = "use_cache_branch"


@dataclass
class LanguageMetrics:
    """Next-token quality of the compressed model against the original, over all counted positions."""

    tokens: int                   # positions with a next-token target (padding and last positions left out)
    original_perplexity: float
    compressed_perplexity: float
    top1_agreement: float         # fraction of positions where both models predict the same next token
    kl_divergence: float          # mean KL(original ‖ compressed) per position, in nats
    original_accuracy: float      # next-token top-1 accuracy against the text itself
    compressed_accuracy: float

    @property
    def perplexity_ratio(self) -> float:
        return self.compressed_perplexity / self.original_perplexity

    def check(self, max_perplexity_ratio: float | None = None, max_kl: float | None = None,
              min_top1_agreement: float | None = None) -> list[str]:
        """Sentences naming each violated tolerance; empty means the compressed model passes."""
        failures = []
        if not math.isfinite(self.compressed_perplexity):
            failures.append("the compressed model's perplexity is not finite.")
        if max_perplexity_ratio is not None and not self.perplexity_ratio <= max_perplexity_ratio:
            failures.append(f"perplexity ratio {self.perplexity_ratio:.4f} is above the maximum "
                            f"{max_perplexity_ratio:g}.")
        if max_kl is not None and not self.kl_divergence <= max_kl:
            failures.append(f"KL divergence {self.kl_divergence:.4g} nats is above the maximum {max_kl:g}.")
        if min_top1_agreement is not None and not self.top1_agreement >= min_top1_agreement:
            failures.append(f"top-1 agreement {self.top1_agreement:.4f} is below the minimum {min_top1_agreement:g}.")
        return failures

    def to_dict(self) -> dict:
        values = asdict(self) | {"perplexity_ratio": self.perplexity_ratio}
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}


def format_language(m: LanguageMetrics, failures: Sequence[str] = (), judged: bool = True) -> str:
    """The metrics as lines, then the verdict: PASS / FAIL: reasons, or (``judged`` False: no tolerance was
    given) a line saying so rather than a PASS that judged nothing."""
    lines = [
        f"Next-token check on {m.tokens} token positions.",
        f"perplexity      original {m.original_perplexity:.4f}   compressed {m.compressed_perplexity:.4f}   "
        f"ratio {m.perplexity_ratio:.4f}",
        f"top-1 accuracy  original {100 * m.original_accuracy:.2f} %   compressed {100 * m.compressed_accuracy:.2f} %",
        f"top-1 agreement {100 * m.top1_agreement:.2f} %   KL(original ‖ compressed) {m.kl_divergence:.5f} nats/token",
        "FAIL: " + " ".join(failures) if failures else "PASS" if judged else
        "no tolerance given (`max_perplexity_ratio`, `max_kl`, `min_top1_agreement`): nothing judged",
    ]
    return "\n".join(lines)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))


class _Sums:
    """float64 running sums over counted positions; each batch is worked on in row chunks."""

    def __init__(self):
        self.count = 0
        self.nll = np.zeros(2)
        self.correct = np.zeros(2, dtype=np.int64)
        self.agree = 0
        self.kl = 0.0

    def add(self, ref: np.ndarray, out: np.ndarray, targets: np.ndarray, keep: np.ndarray) -> None:
        """One whole batch: logits [B, T, V] of both models, targets and counted positions [B, T]."""
        batch = _BatchSums(self, ref.shape[-1])
        batch.add(ref, out, targets, keep)
        batch.close()

    def add_chunk(self, ref: np.ndarray, out: np.ndarray, targets: np.ndarray) -> None:
        """Counted positions' logits [n, V] of both models (float32 as run) and their targets [n]."""
        log_p, log_q = _log_softmax(ref), _log_softmax(out)
        picked = np.arange(targets.size)
        self.nll += [-log_p[picked, targets].sum(), -log_q[picked, targets].sum()]
        top_p, top_q = log_p.argmax(axis=1), log_q.argmax(axis=1)
        self.correct += [int((top_p == targets).sum()), int((top_q == targets).sum())]
        self.agree += int((top_p == top_q).sum())
        self.kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        self.count += targets.size

    def result(self) -> LanguageMetrics:
        if self.count == 0:
            raise FwlrError("The token data has no position with a next token; give sequences of at least two tokens.")
        with np.errstate(over="ignore"):
            ppl = np.exp(self.nll / self.count)
        return LanguageMetrics(int(self.count), float(ppl[0]), float(ppl[1]), self.agree / self.count,
                               self.kl / self.count, float(self.correct[0] / self.count),
                               float(self.correct[1] / self.count))


class _BatchSums:
    """One batch's counted positions, handed to the sums in chunks of `CHUNK_ELEMENTS // vocab` positions in
    batch order, whatever groups of rows they arrive in: the last chunk of a batch is cut short at `close`,
    so running a batch row by row gives the same float64 sums as running it whole. Holds less than one
    chunk of each model's logits between groups."""

    def __init__(self, sums: _Sums, vocab: int):
        self.sums = sums
        self.step = max(1, CHUNK_ELEMENTS // vocab)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.waiting = 0

    def add(self, ref, out: np.ndarray, targets: np.ndarray, keep: np.ndarray) -> None:
        """Consecutive rows of the batch: logits [b, T, V] of both models, targets and counted positions [b, T].
        `ref` may instead be the original's parked logits (`_ParkedLogits`), read here in the same order."""
        vocab = out.shape[-1]
        rows = np.flatnonzero(keep.reshape(-1))
        out, targets = out.reshape(-1, vocab), targets.reshape(-1)
        take = ref.take if isinstance(ref, _ParkedLogits) else ref.reshape(-1, vocab).__getitem__
        start = 0
        while start < rows.size:
            index = rows[start:start + self.step - self.waiting]
            self.pending.append((take(index), out[index], targets[index]))
            self.waiting += index.size
            start += index.size
            if self.waiting == self.step:
                self._fold()

    def close(self) -> None:
        """The batch's last (short) chunk."""
        if self.pending:
            self._fold()

    def _fold(self) -> None:
        parts = self.pending
        self.pending, self.waiting = [], 0
        ref, out, targets = (parts[0][i] if len(parts) == 1 else np.concatenate([p[i] for p in parts])
                             for i in range(3))
        self.sums.add_chunk(ref, out, targets)


def rows_per_run(seq: int, vocab: int, itemsize: int = 4, limit: int = LOGITS_BYTES) -> int:
    """Rows of a token batch per ONNX Runtime call: as many as keep one call's logits [rows, seq, vocab] within
    `limit` bytes, at least one (a sequence is never cut: each position reads all the earlier ones)."""
    return max(1, limit // max(1, seq * vocab * itemsize))


def compare_language_models(original, compressed, batches: Iterable[Mapping[str, np.ndarray]], *,
                            logits: str = "logits", tokens: str = "input_ids", mask: str | None = "attention_mask",
                            providers: Sequence[str] = runtime.CPU, progress: bool = True,
                            max_logits_bytes: int = LOGITS_BYTES, park_bytes: int = PARK_BYTES) -> LanguageMetrics:
    """Perplexity of both models, their ratio, next-token top-1 agreement and KL on token batches.

    Targets are the input ids shifted by one; positions whose token or next token is padding (``mask``
    zero) do not count. Models are paths or ModelProtos; each is fed only the inputs it declares. One session
    at a time: the original runs over a span of batches (until its counted logits reach ``park_bytes``, at
    least one batch) and those logits wait in an anonymous temporary file; its session goes, the compressed
    model's runs over the span and is folded with them. Each ONNX Runtime call gets the rows of a batch whose
    logits fit in ``max_logits_bytes`` (`rows_per_run`; one row until the vocabulary is known); the metrics
    are the same however the rows are run and the batches spanned.
    """
    for model, role in ((original, "original"), (compressed, "compressed")):
        _check_declares(model, logits, role)  # before any run: a model without logits fails here, not after a span
    sums = _Sums()
    span, parked, session = [], None, None
    for index, feed in enumerate(tqdm(batches, desc="perplexity: original", unit="batch", disable=not progress,
                                      leave=False)):
        if tokens not in feed:
            raise FwlrError(f"The token data has no '{tokens}' array; save the token ids under the model's input name.")
        ids = np.asarray(feed[tokens])
        targets, keep = next_token_targets(ids, feed.get(mask) if mask else None)
        if session is None:
            session, parked = _session(original, "original", logits, providers), _ParkedLogits()
        _park_batch(session, feed, ids, keep, logits, index, parked, max_logits_bytes)
        span.append((index, feed, ids, targets, keep))
        if parked.size >= park_bytes:
            session = None  # the original's session goes before the compressed model's is made
            _fold_span(compressed, span, parked, logits, providers, max_logits_bytes, sums, progress)
            span, parked = [], None
    session = None
    if span:
        _fold_span(compressed, span, parked, logits, providers, max_logits_bytes, sums, progress)
    return sums.result()


class _ParkedLogits:
    """The original's logits at the counted positions of a span of batches, [n, V] as run (float32 for a float32
    model), in the order `_BatchSums` folds them, in one anonymous temporary file (io.spill.SpillFile: no name,
    so nothing is left behind after success, an error or a kill). Written once, read back once, in order."""

    def __init__(self):
        self.file = SpillFile(prefix="onnx-fwlr-logits-")
        self.vocab: int | None = None
        self.dtype = None
        self.read_at = 0

    @property
    def size(self) -> int:
        return self.file.size

    def park(self, ref: np.ndarray, keep: np.ndarray) -> None:
        """The counted positions of logits [b, T, V], written in pieces of a fold chunk's rows (no copy of all)."""
        self.vocab, self.dtype = ref.shape[-1], ref.dtype
        rows = np.flatnonzero(keep.reshape(-1))
        flat, step = ref.reshape(-1, self.vocab), max(1, CHUNK_ELEMENTS // self.vocab)
        for start in range(0, rows.size, step):
            self.file.append(flat[rows[start:start + step]])

    def take(self, index: np.ndarray) -> np.ndarray:
        """The next ``index.size`` parked rows: the rows ``ref.reshape(-1, V)[index]`` of the run they came from."""
        rows = self.file.read(self.read_at, self.dtype, (index.size, self.vocab))
        self.read_at += rows.nbytes
        return rows


def _check_declares(model, logits: str, role: str) -> None:
    """The model declares the logits output (read from its graph, weights not loaded)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(os.fspath(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - an unreadable model is reported by ONNX Runtime's loader, in one sentence
            return
    _require_output([o.name for o in model.graph.output], logits, role)


def _require_output(names: list[str], logits: str, role: str) -> None:
    if logits not in names:
        raise FwlrError(f"The {role} model has no output '{logits}'; name its logits output (outputs: {names}).")


def _session(model, role: str, logits: str, providers: Sequence[str]):
    session = runtime.make_session(model, runtime.session_options(arena=False), providers, role=f"{role} model")
    _require_output([o.name for o in session.get_outputs()], logits, role)
    return session


def _park_batch(session, feed, ids, keep, logits, index, parked: _ParkedLogits, max_logits_bytes: int) -> None:
    """The original on one batch, a few rows per call; the counted positions' logits parked."""
    start = 0
    while start < max(1, len(ids)):
        vocab = parked.vocab
        stop = start + (1 if vocab is None else rows_per_run(ids.shape[-1], vocab, limit=max_logits_bytes))
        ref = _run_logits(session, _rows(feed, len(ids), start, stop), logits, "original", index)
        if ref.ndim != 3 or ref.shape[:2] != ids[start:stop].shape or vocab not in (None, ref.shape[-1]):
            raise FwlrError(f"Output '{logits}' of the original model has shape {ref.shape}; perplexity needs logits "
                            f"[batch, seq, vocab] over the token ids {ids[start:stop].shape}.")
        parked.park(ref, keep[start:stop])
        del ref  # before the next call returns its own
        start = stop


def _fold_span(compressed, span, parked: _ParkedLogits, logits, providers, max_logits_bytes, sums, progress) -> None:
    """The compressed model on the span's batches, in the same order, each folded with the parked logits."""
    runtime.release_free_memory()  # the original's session is gone: its pages go back before this one is made
    session = _session(compressed, "compressed", logits, providers)
    vocab = parked.vocab
    for index, feed, ids, targets, keep in tqdm(span, desc="perplexity: compressed", unit="batch",
                                                disable=not progress, leave=False):
        batch, start = _BatchSums(sums, vocab), 0
        while start < max(1, len(ids)):
            stop = start + rows_per_run(ids.shape[-1], vocab, limit=max_logits_bytes)
            out = _run_logits(session, _rows(feed, len(ids), start, stop), logits, "compressed", index)
            expected = ids[start:stop].shape + (vocab,)
            if out.shape != expected:
                raise FwlrError(f"Output '{logits}' has shape {expected} (original) and {out.shape} (compressed); "
                                f"perplexity needs logits [batch, seq, vocab] over the token ids "
                                f"{ids[start:stop].shape}.")
            batch.add(parked, out, targets[start:stop], keep[start:stop])
            del out  # before the next call returns its own
            start = stop
        batch.close()


def _rows(feed: Mapping[str, np.ndarray], count: int, start: int, stop: int) -> dict:
    """Rows start:stop of a batch of `count` rows: every array with that many rows is cut, any other is fed whole."""
    if start == 0 and stop >= count:
        return dict(feed)
    return {name: value[start:stop] if np.ndim(value) and np.shape(value)[0] == count else value
            for name, value in feed.items()}


def check_language_model(model, logits: str = "logits") -> None:
    """Before any work: the model takes token ids and has the `logits` output that perplexity is computed on."""
    from onnx_fwlr.io.data import find_token_input, model_inputs
    from onnx_fwlr.io.model import load_model

    reference = load_model(model, lazy=True) if isinstance(model, (str, os.PathLike)) else model
    if find_token_input(model_inputs(reference)) is None:
        raise FwlrError("The model has no token-id input (input_ids); perplexity needs a language model fed token "
                        "ids (or use the default per-output comparison).")
    outputs = [o.name for o in reference.graph.output]
    if logits not in outputs:
        raise FwlrError(f"The model has no output '{logits}' to compute perplexity on; its outputs are {outputs} "
                        "(name the logits with --logits).")


def is_language_model(model, logits: str = "logits") -> bool:
    """Whether ``model`` (path or ModelProto) reads token ids and has a ``logits`` output [batch, seq, vocab]: the
    models `validate` and `compress --val` judge by perplexity rather than by output errors. Reads the graph's
    declared inputs and outputs only (external weights are not loaded)."""
    import onnx

    from onnx_fwlr.io.data import find_token_input, model_inputs

    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(os.fspath(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - unreadable files are reported by the loader that follows
            return False
    outputs = {o.name: o for o in model.graph.output}
    if logits not in outputs or not outputs[logits].type.HasField("tensor_type"):
        return False
    tensor = outputs[logits].type.tensor_type
    rank = len(tensor.shape.dim) if tensor.HasField("shape") else None
    token = find_token_input(model_inputs(model))
    return rank == 3 and token is not None and tensor.elem_type in FLOAT_TYPES


FLOAT_TYPES = (1, 10, 11, 16)  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def validate_language(original, compressed, data, *, batch_size: int = 32, logits: str = "logits",
                      progress: bool = True) -> LanguageMetrics:
    """`compare_language_models` on a data source (.npz path, folder, feed dicts), checked against the inputs
    of the original."""
    from onnx_fwlr.io.data import find_mask_input, find_token_input, open_data
    from onnx_fwlr.io.model import load_model

    reference = original if not isinstance(original, (str, os.PathLike)) else load_model(original, lazy=True)
    batches = open_data(data, reference, batch_size=batch_size)
    tokens = find_token_input(batches.specs)
    if tokens is None:
        raise FwlrError("The model has no token-id input (input_ids); perplexity needs a language model fed token ids.")
    return compare_language_models(original, compressed, (feed for feed, _ in batches), logits=logits, tokens=tokens,
                                   mask=find_mask_input(batches.specs), progress=progress)


def _run_logits(session, feed, name, role, index) -> np.ndarray:
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in feed]
    if missing:
        raise FwlrError(f"The token data lacks input(s) {missing} of the {role} model; give arrays named after its "
                        f"inputs {wanted}.")
    try:
        return session.run([name], {n: feed[n] for n in wanted})[0]
    except Exception as error:  # noqa: BLE001 - ORT raises many types; the user needs one sentence
        raise FwlrError(f"ONNX Runtime rejected batch {index} for the {role} model: "
                        f"{runtime.error_text(error)}.") from None


@dataclass
class GreedyCheck:
    """Greedy continuations of the same prompts, without and with the KV cache."""

    full: np.ndarray           # [B, prompt + steps]: the whole sequence re-run at every step
    cached: np.ndarray         # [B, prompt + steps]: one new token per step, past fed back
    max_logit_diff: float      # largest |difference| between the two paths' next-token logits

    @property
    def matches(self) -> bool:
        return bool(np.array_equal(self.full, self.cached))

    def to_dict(self) -> dict:
        return {"matches": self.matches, "max_logit_diff": self.max_logit_diff, "full": self.full.tolist(),
                "cached": self.cached.tolist()}


class CachedDecoder:
    """A decoder with `past*` inputs and as many `present*` outputs (paired in declaration order).

    The first call on a prompt runs without cache: the no-cache model when given, else the model itself
    with zero-length past tensors (and `use_cache_branch` false, for a merged model). Later calls feed one
    token and the previous call's present tensors.
    """

    def __init__(self, model, no_cache=None, *, logits: str = "logits", providers: Sequence[str] = runtime.CPU,
                 options=None):
        options = options or runtime.session_options()
        self.session = runtime.make_session(model, options, providers, role="decoder")
        self.first = (runtime.make_session(no_cache, options, providers, role="no-cache decoder")
                      if no_cache is not None else None)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [name for name in self.inputs if "past" in name]
        self.present = [o.name for o in self.session.get_outputs() if "present" in o.name]
        self.logits = logits
        if not self.past or len(self.past) != len(self.present):
            raise FwlrError(f"A cached decoder needs past inputs and as many present outputs; this model has "
                            f"{len(self.past)} past input(s) and {len(self.present)} present output(s).")
        if "input_ids" not in self.inputs:
            raise FwlrError("The decoder has no 'input_ids' input; greedy decoding feeds token ids there.")

    def _feed(self, session, ids, total, start, past, use_cache):
        batch = ids.shape[0]
        feed = {"input_ids": ids, "attention_mask": np.ones((batch, total), dtype=np.int64),
                "position_ids": np.broadcast_to(np.arange(start, total, dtype=np.int64), ids.shape).copy(),
                CACHE_FLAG: np.array([use_cache])}
        if past is None:
            past = [self._empty(name, batch) for name in self.past]
        feed.update(zip(self.past, past))
        wanted = [i.name for i in session.get_inputs()]
        return {name: feed[name] for name in wanted if name in feed}

    def _empty(self, name, batch):
        dims = self.inputs[name].shape
        shape = [d if isinstance(d, int) else (batch if axis == 0 else 0) for axis, d in enumerate(dims)]
        return np.zeros(shape, dtype=np.float32)

    def step(self, ids: np.ndarray, total: int, past=None) -> tuple[np.ndarray, list]:
        """Logits [B, T, V] and present tensors for new tokens ``ids`` [B, T]; ``total`` counts past + new tokens."""
        start = total - ids.shape[1]
        session = self.first if past is None and self.first is not None else self.session
        outputs = session.run([self.logits, *self.present],
                              self._feed(session, ids, total, start, past, past is not None))
        return outputs[0], outputs[1:]


def greedy_check(model, prompt: np.ndarray, steps: int, *, no_cache=None, logits: str = "logits",
                 providers: Sequence[str] = runtime.CPU) -> GreedyCheck:
    """Generate ``steps`` tokens greedily after ``prompt`` [B, T] (int64, no padding) both ways and compare."""
    decoder = CachedDecoder(model, no_cache, logits=logits, providers=providers)
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or steps < 1:
        raise FwlrError("Greedy decoding needs a prompt of token ids [batch, length >= 1] and at least one step.")
    full, cached = prompt, prompt
    worst = 0.0
    past, new = None, prompt
    for _ in range(steps):
        full_logits, _ = decoder.step(full, full.shape[1])
        step_logits, past = decoder.step(new, cached.shape[1], past)
        a, b = full_logits[:, -1], step_logits[:, -1]
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))))
        full = np.concatenate([full, a.argmax(axis=-1)[:, None]], axis=1)
        new = b.argmax(axis=-1)[:, None].astype(np.int64)
        cached = np.concatenate([cached, new], axis=1)
    return GreedyCheck(full, cached, worst)


def decode_speed(model, prompt: np.ndarray, steps: int, *, no_cache=None, logits: str = "logits",
                 providers: Sequence[str] = runtime.CPU, threads: int | None = None) -> dict:
    """Greedy decoding through the KV cache at the prompt's batch size: the prompt's (prefill) seconds, then
    ``steps`` one-token steps; returns prefill seconds, decode seconds and decode tokens per second (per row).

    Sessions are built before the clock starts; one untimed warm-up step runs first.
    """
    import time

    options = runtime.session_options()
    if threads is not None:
        options.intra_op_num_threads = threads
    decoder = CachedDecoder(model, no_cache, logits=logits, providers=providers, options=options)
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or steps < 1:
        raise FwlrError("Decode timing needs a prompt of token ids [batch, length >= 1] and at least one step.")
    warm, past = decoder.step(prompt, prompt.shape[1])
    decoder.step(warm[:, -1].argmax(axis=-1)[:, None].astype(np.int64), prompt.shape[1] + 1, past)
    start = time.perf_counter()
    out, past = decoder.step(prompt, prompt.shape[1])
    prefill = time.perf_counter() - start
    total = prompt.shape[1]
    start = time.perf_counter()
    for _ in range(steps):
        new = out[:, -1].argmax(axis=-1)[:, None].astype(np.int64)
        total += 1
        out, past = decoder.step(new, total, past)
    decode = time.perf_counter() - start
    return {"prefill_seconds": prefill, "decode_seconds": decode, "tokens_per_second": steps / decode,
            "steps": steps, "batch": int(prompt.shape[0])}
