"""Compare an original and a compressed ONNX model on the same data in ONNX Runtime.

Both models run on every batch; per-output error metrics and accuracies are folded into running sums as
the batches go by, so memory stays flat however much data there is. `Validation.check` turns the metrics
into a list of violated tolerances (empty = pass) and `format_validation` prints them as a table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.outputs import batch_axes as find_batch_axes
from onnx_fwlr.evaluate.outputs import common_prefix as common_prefix_of
from onnx_fwlr.evaluate.outputs import score_outputs
from onnx_fwlr.io import runtime
from onnx_fwlr.io.onnx_utils import ORT_FLOAT_TYPES


@dataclass
class OutputMetrics:
    """How far the compressed model's output strays from the original's, over all samples."""

    name: str
    max_abs_error: float
    mean_abs_error: float
    rel_l2_error: float  # ‖orig − comp‖ / ‖orig‖ over all elements
    mean_cosine: float  # per-sample cosine similarity of the flattened outputs, averaged
    min_cosine: float  # the worst sample
    nan_count: int  # NaNs in the compressed output
    inf_count: int  # Infs in the compressed output
    top1_agreement: float | None  # fraction of samples with equal argmax; None if not logit-like
    sequence: dict | None = None  # class scores per step [batch, T, classes]: _SequenceStats.result()

    @property
    def nonfinite_count(self) -> int:
        return self.nan_count + self.inf_count


@dataclass
class Validation:
    """Result of `compare_models`. Call `check(...)` for the failed tolerances; `passed(...)` for a bool."""

    outputs: list[OutputMetrics]
    num_samples: int
    label_output: str | None = None  # the output scored against labels
    original_accuracy: float | None = None
    compressed_accuracy: float | None = None
    num_batches: int = 0
    unjudged: dict = field(default_factory=dict)  # output -> why it was set aside (its shape changed)
    prefix_compared: list = field(default_factory=list)  # outputs compared over the common prefix only

    @property
    def accuracy_drop(self) -> float | None:
        """Original minus compressed accuracy, as a fraction (0.01 = one percentage point)."""
        if self.original_accuracy is None or self.compressed_accuracy is None:
            return None
        return self.original_accuracy - self.compressed_accuracy

    def check(
        self,
        min_cosine: float | None = None,
        max_rel_error: float | None = None,
        max_accuracy_drop: float | None = None,
    ) -> list[str]:
        """Sentences naming each violated tolerance; an empty list means the compressed model passes.

        NaN or Inf in a compressed output always fails. `min_cosine` applies to each output's mean
        per-sample cosine, `max_rel_error` to its relative L2 error, `max_accuracy_drop` (in percentage
        points, 0 to 100, as the report prints the drop) to the label accuracy and needs labels.
        """
        from onnx_fwlr.evaluate.tolerance import check_tolerances

        check_tolerances(min_cosine, max_rel_error, max_accuracy_drop)
        failures = _nothing_judged(self)
        for out in self.outputs:
            if out.nonfinite_count:
                failures.append(
                    f"output '{out.name}' of the compressed model has {out.nan_count} NaN and "
                    f"{out.inf_count} Inf values."
                )
            if min_cosine is not None and not out.mean_cosine >= min_cosine:
                failures.append(
                    f"output '{out.name}' has mean cosine similarity {out.mean_cosine:.6f}, "
                    f"below the minimum {min_cosine:g}."
                )
            if max_rel_error is not None and not out.rel_l2_error <= max_rel_error:
                failures.append(
                    f"output '{out.name}' has relative L2 error {out.rel_l2_error:.6g}, "
                    f"above the maximum {max_rel_error:g}."
                )
        if max_accuracy_drop is not None:
            if self.accuracy_drop is None:
                raise FwlrError(
                    "A maximum accuracy drop needs labels: pass labels for the validation data "
                    "or drop the accuracy tolerance."
                )
            if not 100 * self.accuracy_drop <= max_accuracy_drop + 1e-9:  # points; exact for equal counts
                failures.append(
                    f"accuracy on '{self.label_output}' dropped by {100 * self.accuracy_drop:.2f} points "
                    f"({100 * self.original_accuracy:.2f} % -> {100 * self.compressed_accuracy:.2f} %), "
                    f"more than the allowed {max_accuracy_drop:.2f}."
                )
        return failures

    def passed(self, **tolerances) -> bool:
        """True when `check(**tolerances)` finds nothing wrong."""
        return not self.check(**tolerances)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; non-finite numbers become None (their counts say what happened)."""
        data = asdict(self) | {"accuracy_drop": self.accuracy_drop}
        for key in ("unjudged", "prefix_compared"):  # only when something was set aside or cut
            if not data[key]:
                del data[key]
        return _json_safe(data)


# Long: one streaming pass over both models; splitting it would scatter the per-batch state.
def compare_models(
    original: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    labels: np.ndarray | Sequence[int] | None = None,
    outputs: Sequence[str] | None = None,
    label_output: str | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: bool = True,
    common_prefix: bool = False,
    total: int | None = None,
    set_aside: bool = False,
    batch_axes: dict[str, int] | None = None,
) -> Validation:
    """Run both models on every batch and measure how far the compressed outputs stray.

    `batches` yields feed dicts (leading axis = samples); `labels` are class ids aligned with the
    concatenated samples and are scored on `label_output` (default: the first logit-like output).
    `outputs` defaults to every float output the two models share. An output whose shape differs between
    the models (its length depends on what the model computes, e.g. audio) is an error unless
    `common_prefix`: then both are compared over the sizes they share. Top-1 agreement is measured only on
    class scores (evaluate.outputs.score_outputs): on an embedding it means nothing. `total`: the number of
    batches, when known, for the progress bar. `set_aside`: an output whose shape changed (and that no common
    prefix reconciles) is not an error but left out of the comparison, with the reason in
    `Validation.unjudged`, so a finished compression is judged on what can be judged. An output whose sample
    axis is not 0 (`batch_axes`: name -> axis, else found from the model's symbolic dimensions) is compared
    per sample along that axis.
    """
    original_session = _session(original, providers, "original")
    compressed_session = _session(compressed, providers, "compressed")
    names = _output_names(original_session, compressed_session, outputs)
    labels = _as_labels(labels)
    if label_output is not None and label_output not in names:
        raise FwlrError(
            f"Output '{label_output}' to score against labels is not among the compared outputs {names}."
        )

    scores = score_outputs(original)
    stats = {name: _OutputStats(scores is None or name in scores) for name in names}
    unjudged: dict[str, str] = {}
    prefixed: set[str] = set()
    axes = _checked_batch_axes(original, batch_axes, names)
    correct = np.zeros(2, dtype=np.int64)  # samples the original / compressed model gets right
    num_samples = 0
    num_batches = 0
    for feed in tqdm(batches, total=total, desc="validate", unit="batch", disable=not progress, leave=False):
        reference = _run(original_session, feed, names, "original", num_batches)
        candidate = _run(compressed_session, feed, names, "compressed", num_batches)
        batch_size = _batch_size(feed)
        for name, ref, out in zip(names, reference, candidate):
            if name in unjudged:
                continue
            if axes.get(name):
                ref, out = _samples_first(name, ref, out, axes[name])
            if ref.shape != out.shape:
                shared = _shared_part(name, ref, out, common_prefix, set_aside, unjudged)
                if shared is None:
                    continue
                ref, out = shared
                prefixed.add(name)
            stats[name].update(ref, out)
        if labels is not None:
            label_output = label_output or _first_logit_output(names, reference)
            index = names.index(label_output)
            batch_labels = _batch_labels(labels, num_samples, batch_size)
            correct += _count_correct(label_output, reference[index], candidate[index], batch_labels)
        num_samples += batch_size
        num_batches += 1

    if num_batches == 0:
        raise FwlrError("The validation data has no batches; give at least one sample.")
    validation = Validation(
        outputs=[stats[name].result(name) for name in names if name not in unjudged],
        num_samples=num_samples,
        num_batches=num_batches,
        unjudged=unjudged,
        prefix_compared=sorted(prefixed - set(unjudged)),
    )
    if labels is not None:
        if len(labels) != num_samples:
            raise FwlrError(
                f"There are {len(labels)} labels for {num_samples} samples; give one label per sample."
            )
        validation.label_output = label_output
        validation.original_accuracy = int(correct[0]) / num_samples
        validation.compressed_accuracy = int(correct[1]) / num_samples
    return validation


def format_validation(v: Validation, failures: Sequence[str], verdict: str | None = None) -> str:
    """Plain-text table, one row per output, then accuracies and a final `PASS` / `FAIL: reasons` line
    (or `verdict`, the line evaluate.tolerance.Verdict writes)."""
    header = ["output", "max abs", "mean abs", "rel L2", "cos mean", "cos min", "top-1 agree", "NaN/Inf"]
    rows = [
        [
            out.name,
            f"{out.max_abs_error:.4g}",
            f"{out.mean_abs_error:.4g}",
            f"{out.rel_l2_error:.4g}",
            f"{out.mean_cosine:.6f}",
            f"{out.min_cosine:.6f}",
            "-" if out.top1_agreement is None else f"{100 * out.top1_agreement:.2f} %",
            f"{out.nan_count}/{out.inf_count}",
        ]
        for out in v.outputs
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    batches = "batch" if v.num_batches == 1 else "batches"
    lines = [f"Compared {v.num_samples} samples in {v.num_batches} {batches}.", line(header)]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend(line(row) for row in rows)
    if v.accuracy_drop is not None:
        lines.append(
            f"Accuracy on '{v.label_output}': original {100 * v.original_accuracy:.2f} %, "
            f"compressed {100 * v.compressed_accuracy:.2f} % (drop {100 * v.accuracy_drop:.2f} points)."
        )
    lines.extend(_sequence_lines(v))
    lines.extend(_set_aside_lines(v))
    lines.append(verdict if verdict is not None else "PASS" if not failures else "FAIL: " + " ".join(failures))
    return "\n".join(lines)


def _sequence_lines(v: Validation) -> list[str]:
    """Per-step and decoded agreement of each sequence-of-class-scores output."""
    return [f"output '{o.name}' as sequences [batch, T, classes]: per-step argmax agreement "
            f"{100 * o.sequence['step_top1_agreement']:.2f} %, greedy/CTC-decoded sequences identical for "
            f"{o.sequence['decoded_same']}/{o.sequence['samples']} samples "
            f"({100 * o.sequence['decoded_agreement']:.2f} %)" for o in v.outputs if o.sequence]


def _checked_batch_axes(model, given: dict[str, int] | None, names: list[str]) -> dict[str, int]:
    """The sample axis of each compared output that has one other than 0 (evaluate.outputs.batch_axes)."""
    unknown = sorted(set(given or {}) - set(names))
    if unknown:
        raise FwlrError(f"`batch_axes` names {', '.join(unknown)}, which is not a compared output; choose from "
                        f"{', '.join(names)}.")
    return {name: axis for name, axis in find_batch_axes(model, given).items() if name in names}


def _samples_first(name: str, ref: np.ndarray, out: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    if not -ref.ndim <= axis < ref.ndim or ref.ndim != out.ndim:
        raise FwlrError(f"`batch_axes` gives output '{name}' axis {axis}, but it has {ref.ndim} axes; give an "
                        "axis it has.")
    return np.moveaxis(ref, axis, 0), np.moveaxis(out, axis, 0)


def _set_aside_lines(v: Validation) -> list[str]:
    """What the verdict does not cover: outputs set aside (their shape changed) or compared over a prefix."""
    lines = [f"not judged: {reason}" for reason in v.unjudged.values()]
    if v.prefix_compared:
        lines.append(f"compared over the common prefix only (the length changed): {', '.join(v.prefix_compared)}")
    if v.unjudged and v.outputs:
        lines.append(f"the verdict below covers {', '.join(o.name for o in v.outputs)} only")
    return lines


def _nothing_judged(v: Validation) -> list[str]:
    """A failure when every output was set aside: a verdict over nothing is no PASS."""
    if v.outputs or not v.unjudged:
        return []
    return ["no output could be compared: every output's shape changed (see 'not judged'); compare the outputs "
            "whose length changed over their common prefix (`common_prefix`) or judge them by their task."]


def _shared_part(name: str, ref: np.ndarray, out: np.ndarray, common_prefix: bool, set_aside: bool,
                 unjudged: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The parts of an output whose shape changed that can be compared (common prefix), or None after
    recording why it is set aside (`set_aside`); without `set_aside` a mismatch is an error."""
    shared = common_prefix_of(ref, out) if common_prefix else None
    if shared is not None:
        return shared
    if not set_aside:
        _same_shape(name, ref, out, common_prefix)  # raises the one-sentence error
    why = ("their ranks differ, so no common prefix exists" if common_prefix
           else "pass `common_prefix` to compare the part both have")
    unjudged[name] = (f"output '{name}' has shape {ref.shape} in the original model but {out.shape} in the "
                      f"compressed one ({why})")
    return None


def _same_shape(name: str, ref: np.ndarray, out: np.ndarray, common_prefix: bool):
    shared = common_prefix_of(ref, out) if common_prefix else None
    if shared is None:
        fix = ("" if common_prefix else "pass `common_prefix` to compare variable-length outputs over the part both "
               "have, or ")
        raise FwlrError(f"Output '{name}' has shape {ref.shape} in the original model but {out.shape} in the "
                        f"compressed one; {fix}choose other outputs with `outputs`.")
    return shared


class _OutputStats:
    """Running sums for one output; float64 so the result does not depend on how data is batched."""

    def __init__(self, scores: bool = True):
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_sq_diff = 0.0
        self.sum_sq_ref = 0.0
        self.num_elements = 0
        self.sum_cosine = 0.0
        self.min_cosine = math.inf
        self.num_rows = 0
        self.nan_count = 0
        self.inf_count = 0
        self.agree = 0
        self.logit_like = scores  # class scores by the graph; the shape must agree too ([batch, classes])
        self.sequence = _SequenceStats() if scores else None  # the same per step, [batch, T, classes]

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs are counted, not warned
            self._update(ref, out)

    def _update(self, ref: np.ndarray, out: np.ndarray) -> None:
        self.nan_count += int(np.isnan(out).sum())
        self.inf_count += int(np.isinf(out).sum())
        ref = ref.astype(np.float64)
        out = out.astype(np.float64)
        diff = np.abs(ref - out)
        if diff.size:
            self.max_abs = float(np.maximum(self.max_abs, diff.max()))  # np.maximum keeps NaN
        self.sum_abs += float(diff.sum())
        self.sum_sq_diff += float(np.square(diff).sum())
        self.sum_sq_ref += float(np.square(ref).sum())
        self.num_elements += diff.size
        cosines = _rowwise_cosine(_per_sample(ref), _per_sample(out))
        self.sum_cosine += float(cosines.sum())
        if cosines.size:
            self.min_cosine = float(np.minimum(self.min_cosine, cosines.min()))
        self.num_rows += len(cosines)
        self.logit_like = self.logit_like and _is_logit_like(ref)
        if self.logit_like:
            self.agree += int(np.sum(_top1(ref) == _top1(out)))
        if self.sequence is not None:
            self.sequence = self.sequence.update(ref, out)

    def result(self, name: str) -> OutputMetrics:
        return OutputMetrics(
            name=name,
            max_abs_error=self.max_abs,
            mean_abs_error=self.sum_abs / max(self.num_elements, 1),
            rel_l2_error=_ratio(math.sqrt(self.sum_sq_diff), math.sqrt(self.sum_sq_ref)),
            mean_cosine=self.sum_cosine / max(self.num_rows, 1),
            min_cosine=self.min_cosine if self.num_rows else 1.0,
            nan_count=self.nan_count,
            inf_count=self.inf_count,
            top1_agreement=self.agree / max(self.num_rows, 1) if self.logit_like else None,
            sequence=self.sequence.result() if self.sequence is not None and self.sequence.samples else None,
        )


class _SequenceStats:
    """Class scores per step ([batch, T, classes]: a recognizer's or tagger's output) judged as the task reads
    them: the share of steps whose argmax agrees, and the share of samples whose greedy decoding agrees
    (argmax per step, repeats collapsed, class 0 taken as the CTC blank and dropped), the text an OCR or
    speech model would print."""

    BLANK = 0

    def __init__(self):
        self.steps = self.steps_agree = self.samples = self.decoded_agree = 0

    def update(self, ref: np.ndarray, out: np.ndarray):
        """Self with this batch added, or None once an output is not [batch, T, classes]."""
        if ref.ndim != 3 or ref.shape[-1] < 2 or ref.shape != out.shape:
            return None
        a, b = np.argmax(ref, axis=-1), np.argmax(out, axis=-1)
        self.steps += a.size
        self.steps_agree += int(np.sum(a == b))
        self.samples += a.shape[0]
        self.decoded_agree += sum(_greedy_decode(x) == _greedy_decode(y) for x, y in zip(a, b))
        return self

    def result(self) -> dict:
        return {"step_top1_agreement": self.steps_agree / self.steps, "decoded_agreement":
                self.decoded_agree / self.samples, "decoded_same": self.decoded_agree, "samples": self.samples}


def _greedy_decode(ids: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC decoding of one sample's per-step argmax: repeats collapsed, blanks (class 0) dropped."""
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    return tuple(int(i) for i in ids[keep] if i != _SequenceStats.BLANK)


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair; two zero rows count as identical (1), one zero row as unrelated (0)."""
    norm_a = np.linalg.norm(a, axis=1)
    norm_b = np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    denominator = norm_a * norm_b
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.clip(dot / denominator, -1.0, 1.0)
    return np.where(denominator == 0, np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0), cosine)


def _ratio(error: float, reference: float) -> float:
    if reference == 0:
        return 0.0 if error == 0 else math.inf
    return error / reference


def _per_sample(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim == 0 else x.reshape(x.shape[0], -1)


def _is_logit_like(x: np.ndarray) -> bool:
    return x.ndim == 2 and x.shape[1] > 1


def _top1(x: np.ndarray) -> np.ndarray:
    return np.argmax(x, axis=-1)


def _batch_labels(labels: np.ndarray, start: int, batch_size: int) -> np.ndarray:
    batch_labels = labels[start : start + batch_size]
    if len(batch_labels) != batch_size:
        raise FwlrError(f"There are {len(labels)} labels but more samples; give one label per sample.")
    return batch_labels


def _count_correct(name: str, ref: np.ndarray, out: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if not _is_logit_like(ref):
        raise FwlrError(
            f"Output '{name}' is not shaped [batch, classes], so it cannot be scored against labels; "
            "name a logits output."
        )
    classes = ref.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):  # as the Fisher loss refuses them
        raise FwlrError(f"Labels must lie in [0, {classes}) for output '{name}' with {classes} classes (got "
                        f"{labels.min()} to {labels.max()}); fix the label encoding.")
    return np.array([np.sum(_top1(ref) == labels), np.sum(_top1(out) == labels)], dtype=np.int64)


def _first_logit_output(names: list[str], arrays: list[np.ndarray]) -> str:
    for name, array in zip(names, arrays):
        if _is_logit_like(array):
            return name
    raise FwlrError(
        "Labels were given but no compared output looks like logits [batch, classes]; "
        "name the output to score or drop the labels."
    )


def _as_labels(labels) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FwlrError(
            f"Labels must be a 1-D array of integer class ids, got shape {labels.shape} and dtype "
            f"{labels.dtype}; convert them to one class id per sample."
        )
    return labels


def _batch_size(feed: Mapping[str, np.ndarray]) -> int:
    first = np.asarray(next(iter(feed.values())))
    return int(first.shape[0]) if first.ndim else 1


def _session(model, providers: Sequence[str], role: str) -> ort.InferenceSession:
    """ORT session from a path (ORT finds external data next to it) or an in-memory ModelProto, whatever its
    IR version; ORT logs errors only (its warnings are not ours to show)."""
    if not isinstance(model, onnx.ModelProto) and not os.path.isfile(os.fspath(model)):
        raise FwlrError(f"The {role} model file '{os.fspath(model)}' does not exist; check the path.")
    return runtime.make_session(model, runtime.session_options(), providers, role=f"{role} model")


def _output_names(original: ort.InferenceSession, compressed: ort.InferenceSession, requested) -> list[str]:
    original_types = {o.name: o.type for o in original.get_outputs()}
    compressed_types = {o.name: o.type for o in compressed.get_outputs()}
    if requested is None:
        names = [
            name
            for name, kind in original_types.items()
            if kind in ORT_FLOAT_TYPES and compressed_types.get(name) in ORT_FLOAT_TYPES
        ]
        if not names:
            raise FwlrError(
                "The two models share no floating-point output to compare; give models with the same outputs."
            )
        return names
    for name in requested:
        for role, types in (("original", original_types), ("compressed", compressed_types)):
            if name not in types:
                raise FwlrError(
                    f"Output '{name}' is not an output of the {role} model; choose from {sorted(types)}."
                )
            if types[name] not in ORT_FLOAT_TYPES:
                raise FwlrError(
                    f"Output '{name}' of the {role} model is {types[name]}, not floating point; "
                    "compare float outputs only."
                )
    return list(requested)


def _run(session: ort.InferenceSession, feed, names: list[str], role: str, batch_index: int) -> list:
    """Run one batch, feeding only the inputs this model declares (data files may hold extra arrays)."""
    wanted = [i.name for i in session.get_inputs()]
    missing = [name for name in wanted if name not in feed]
    if missing:
        raise FwlrError(
            f"The validation data lacks input(s) {missing} of the {role} model; "
            f"give arrays named after the model inputs {wanted}."
        )
    try:
        return session.run(names, {name: feed[name] for name in wanted})
    except Exception as error:
        raise FwlrError(
            f"ONNX Runtime rejected batch {batch_index} for the {role} model: {runtime.error_text(error)}; "
            "check that the data's shapes and dtypes match the model inputs."
        ) from error


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
