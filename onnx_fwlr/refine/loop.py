"""Fine-tune the factors of a compressed model by distillation against the original, over the ONNX graph.

The closed-form factors are a starting point; a short distillation on the calibration data recovers much of
what truncation lost (docs/refine.md). No training framework: the student's
forward pass runs in ONNX Runtime, its backward pass is ``GradientRunner`` (numpy VJP rules), the optimiser
is Adam in numpy, and the teacher is the original model in ONNX Runtime. What is trained: ``trainable``;
the losses: ``losses``; Adam and the schedules: ``optim``; here: the data, the loop and its report.

Never worse than the start: the validation loss of the input model is measured first, the best weights seen
at any evaluation are kept, and the returned model carries the input weights unchanged when nothing beat them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from onnx_fwlr.autodiff import losses
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.batching import padded_inputs, sample_axis_first, trim_padding
from onnx_fwlr.io.data import find_mask_input, model_inputs, open_data
from onnx_fwlr.io.model import load_model, tensor_array
from onnx_fwlr.refine.losses import LOSSES, Objective, default_distillation_loss
from onnx_fwlr.refine.optim import SCHEDULES, Adam, learning_rate
from onnx_fwlr.refine.structured import CoMatrixDropout, doping_tensors, refine_in_phases, stored_sites
from onnx_fwlr.refine.trainable import Student, Teacher, trainable_factors
from onnx_fwlr.stats.fisher import default_output

VAL_FRACTION = 0.1  # share of the calibration samples held back for validation when none is given
TEACHER_CACHE_BYTES = 512 * 2**20  # teacher outputs are kept in memory up to this size, else recomputed
# Samples per forward and backward pass of a training step (Student.micro_batch): a step holds one pass's
# intermediates, so the peak follows this, not `batch_size`. On all-MiniLM-L6-v2 (batches of 32, 30 steps, in the
# pipeline) 4 peaked at 786-790 MiB with 28-29 s of CPU, 8 at 860 MiB / 32 s, 2 at 742 MiB / 34 s.
MICRO_BATCH = 4
# Co-matrix dropout default: off. On the LSTM LM of docs/doped.md ("Training") p = 0.5 and p = 0.25 were worse
# than none at 10x and 20x, after 300 and 1,000 steps.
DOPE_DROPOUT = 0.0


# ---------------------------------------------------------------------------------------------- data in memory

class SamplePool:
    """Samples held in memory. Batches with equal trailing shapes are joined so samples can be reshuffled;
    otherwise (e.g. padding to each batch's longest sentence) the given batches are the units."""

    def __init__(self, batches: list[tuple[dict, np.ndarray | None]]):
        self.batches = batches
        shapes = {tuple((k, v.shape[1:]) for k, v in sorted(feed.items())) for feed, _ in batches}
        has_labels = [labels is not None for _, labels in batches]
        self.labelled = bool(batches) and all(has_labels)
        self.joined = len(shapes) == 1 and all(v.ndim >= 1 for v in batches[0][0].values())
        if self.joined:
            self.arrays = {k: np.concatenate([feed[k] for feed, _ in batches]) for k in batches[0][0]}
            self.labels = np.concatenate([lab for _, lab in batches]) if self.labelled else None
            self.units = len(next(iter(self.arrays.values())))
        else:
            self.units = len(batches)

    def count(self, units) -> int:
        """Samples in these units."""
        if self.joined:
            return len(units)
        return sum(len(next(iter(self.batches[u][0].values()))) for u in units)

    def take(self, units) -> list[tuple[dict, np.ndarray | None]]:
        """The units as batches: one joined batch of samples, or the listed batches."""
        if self.joined:
            units = np.asarray(units)
            return [({k: v[units] for k, v in self.arrays.items()},
                     self.labels[units] if self.labels is not None else None)]
        return [self.batches[int(u)] for u in units]

    def chunks(self, units, batch_size: int) -> list[list[int]]:
        """Units grouped into training/evaluation batches."""
        units = list(units)
        if not self.joined:
            return [[u] for u in units]
        return [units[i:i + batch_size] for i in range(0, len(units), batch_size)]


def _load(source, model, batch_size, what: str) -> SamplePool:
    batches = list(open_data(source, model, batch_size=batch_size))
    if not batches:
        raise FwlrError(f"the {what} data holds no samples; give at least one batch.")
    return SamplePool(batches)


def split_units(pool: SamplePool, batch_size: int, rng) -> tuple[list[int], list[int]]:
    """Seeded held-back slice for validation: 10 % of the units, at least one batch, at most half."""
    if pool.units < 2:
        raise FwlrError("the calibration data is too small to hold back validation samples; give more samples "
                        "or pass validation data (`validation`).")
    order = rng.permutation(pool.units)
    wanted = max(math.ceil(VAL_FRACTION * pool.units), batch_size if pool.joined else 1)
    held = min(wanted, pool.units // 2)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


class TeacherCache:
    """Teacher outputs per unit of a pool, kept in memory while under TEACHER_CACHE_BYTES."""

    def __init__(self, teacher: Teacher, pool: SamplePool, budget: int = TEACHER_CACHE_BYTES):
        self.teacher, self.pool, self.budget = teacher, pool, budget
        self.cache: dict[int, np.ndarray] = {}
        self.bytes = 0

    def __call__(self, units, feed) -> np.ndarray:
        if all(u in self.cache for u in units):
            parts = [self.cache[u] for u in units]
            return np.stack(parts) if self.pool.joined else parts[0]
        z = self.teacher(feed)
        per_unit = list(z) if self.pool.joined and z.ndim and z.shape[0] == len(units) else None
        if not self.pool.joined:
            per_unit = [z]
        if per_unit is not None and self.bytes + z.nbytes <= self.budget:
            for u, value in zip(units, per_unit):
                self.cache[u] = value
            self.bytes += z.nbytes
        return z

    def fill(self, chunks, cut) -> bool:
        """Compute the outputs of these units now, one chunk per batch cut like a training batch, while they fit
        the budget; True when all are cached (then the teacher session is no longer needed)."""
        for chunk in chunks:
            if not all(u in self.cache for u in chunk):
                self(chunk, cut(*self.pool.take(chunk)[0])[0])
            if not all(u in self.cache for u in chunk):
                return False
        return True


# ---------------------------------------------------------------------------------------------- report

@dataclass
class RefineReport:
    """What a refine run did: the curve, the best step and the before/after validation metrics."""

    loss: str
    output: str
    loss_tensor: str
    trainable: list[str]
    trainable_params: int
    train_samples: int
    val_samples: int
    val_source: str
    lr: float
    batch_size: int
    schedule: str
    seed: int
    steps: int = 0
    best_step: int = 0
    stopped: str = ""  # 'steps', 'early stop' or 'diverged'
    curve: list = field(default_factory=list)  # (step, train_loss, val_loss, val_cosine)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the whole call
    step_seconds: float = 0.0  # time inside training steps (forward, backward, Adam), without evaluations
    dope_dropout: float = 0.0  # co-matrix dropout probability (refine.structured)
    dropped: int = 0  # doping terms dropped over all steps and sites
    phases: list = field(default_factory=list)  # with support re-selection: one dict per phase

    @property
    def improved(self) -> bool:
        return self.best_step > 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["improved"] = self.improved
        data["curve"] = [list(row) for row in self.curve]
        return data

    def format(self) -> str:
        keys = [k for k in ("loss", "cosine", "accuracy") if k in self.before]
        width = max(len(k) for k in keys) + 4
        lines = [f"refine: {self.loss} on '{self.loss_tensor}', {len(self.trainable)} tensors "
                 f"({self.trainable_params:,} parameters) trained on {self.train_samples} samples, "
                 f"validated on {self.val_samples} ({self.val_source})",
                 f"{'val metric':<{width}}{'before':>12}{'after':>12}{'change':>12}"]
        for k in keys:
            b, a = self.before[k], self.after[k]
            lines.append(f"{'val ' + k:<{width}}{b:>12.6f}{a:>12.6f}{a - b:>+12.6f}")
        if self.dope_dropout:
            lines.append(f"co-matrix dropout {self.dope_dropout:g}: {self.dropped} doping terms dropped")
        for phase in self.phases[1:]:
            lines.append(f"phase {phase['phase']}: doping support re-selected ({phase['reselected']} entries moved), "
                         f"val loss {phase['before']['loss']:.6f} -> {phase['after']['loss']:.6f}")
        if self.improved:
            lines.append(f"best step {self.best_step} of {self.steps} run ({self.stopped}); {self.seconds:.1f} s")
        else:
            lines.append(f"no improvement on validation in {self.steps} steps ({self.stopped}); the input weights "
                         f"are returned unchanged; {self.seconds:.1f} s")
        return "\n".join(lines)

    def plot(self, path):
        """Train and validation loss against step (and validation cosine), as a PNG."""
        from onnx_fwlr.evaluate.plots import pyplot

        plt = pyplot()
        steps = [row[0] for row in self.curve]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        train = [(s, t) for s, t, _, _ in self.curve if t is not None]
        if train:
            left.plot(*zip(*train), marker=".", label="train (mean since last eval)")
        left.plot(steps, [row[2] for row in self.curve], marker="o", label="validation")
        left.axvline(self.best_step, color="tab:red", lw=1, ls="--", label=f"best step {self.best_step}")
        left.set_xlabel("step")
        left.set_ylabel(f"{self.loss} loss")
        left.set_yscale("log")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        right.plot(steps, [row[3] for row in self.curve], marker="o", color="tab:green")
        right.set_xlabel("step")
        right.set_ylabel("validation mean cosine")
        right.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------- the loop

def _check_arguments(steps, lr, batch_size, loss, label_weight, eval_every, patience, schedule):
    if steps < 1:
        raise FwlrError(f"`steps` {steps} is out of range; it must be a positive integer.")
    if not (lr > 0 and math.isfinite(lr)):
        raise FwlrError(f"`lr` {lr} is out of range; give a positive learning rate such as 1e-4.")
    if batch_size < 1:
        raise FwlrError(f"`batch_size` {batch_size} is out of range; it must be a positive integer.")
    if loss is not None and loss not in LOSSES:
        raise FwlrError(f"unknown refine loss '{loss}'; choose one of {', '.join(LOSSES)}.")
    if not (label_weight >= 0 and math.isfinite(label_weight)):
        raise FwlrError(f"`label_weight` {label_weight} is out of range; give a number >= 0.")
    if eval_every < 1 or patience < 1:
        raise FwlrError("eval_every and patience must be positive integers.")
    if schedule not in SCHEDULES:
        raise FwlrError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}.")


# One BLAS thread for the numpy backward pass between ORT runs: OpenBLAS's spinning threads made each step several
# times slower on a loaded 2-core machine (docs/speed.md, "Compression cost"); ORT keeps its own threads.
@threadpool_limits.wrap(limits=1, user_api="blas")
# Long: the training loop with early stopping; its state (best weights, curve, patience) lives here.
def refine(
    original,
    compressed,
    calibration,
    *,
    validation=None,
    steps: int = 200,
    lr: float = 3e-5,
    batch_size: int = 32,
    loss: str | None = None,
    output: str | None = None,
    label_weight: float = 0.0,
    eval_every: int = 10,
    patience: int = 5,
    schedule: str = "cosine",
    seed: int = 0,
    dope_dropout: float | None = None,
    reselect: int = 0,
    progress: bool = True,
    providers=("CPUExecutionProvider",),
) -> tuple[onnx.ModelProto, RefineReport]:
    """Distil the factors of `compressed` against `original` on `calibration` data; returns the refined model
    (never worse on validation than `compressed`) and a RefineReport.

    Validation: `validation` data, else a seeded 10 % of the calibration samples (at least one batch), which
    then are not trained on. Evaluated every `eval_every` steps; stops after `patience` evaluations without
    improvement. Inputs are paths or ModelProtos and are never modified.

    Structured sites (refine.structured): their factors and doping values are trained; `dope_dropout` drops each
    site's doping term per step with that probability (co-matrix dropout; None: DOPE_DROPOUT); `reselect` R > 0
    splits the steps into R + 1 phases with the doping support re-selected between them.
    """
    _check_arguments(steps, lr, batch_size, loss, label_weight, eval_every, patience, schedule)
    if reselect:
        if not isinstance(reselect, int) or reselect < 0 or reselect >= steps:
            raise FwlrError(f"`reselect` {reselect} is out of range; give a number of re-selections below `steps`.")
        options = dict(validation=validation, lr=lr, loss=loss, output=output, label_weight=label_weight,
                       eval_every=eval_every, patience=patience, schedule=schedule, seed=seed,
                       dope_dropout=dope_dropout, progress=progress, providers=providers)
        return refine_in_phases(refine, load_model(original), load_model(compressed), calibration,
                                phases=reselect + 1, steps=steps, batch_size=batch_size, **options)
    start = time.perf_counter()
    original, compressed = load_model(original, copy=False), load_model(compressed, copy=False)  # only read here
    trainable = trainable_factors(original, compressed)
    if not trainable:
        raise FwlrError("the compressed model has no factor weights that the original lacks; pass the original "
                        "model first and a model compressed from it second.")
    out_name = default_output(compressed, output, "`output`")
    if out_name not in {o.name for o in original.graph.output}:
        raise FwlrError(f"output '{out_name}' of the compressed model is not an output of the original; pass the "
                        "original the compressed model was made from.")
    target = losses.find_seed_target(compressed, out_name)
    rng = np.random.default_rng(seed)

    pool = _load(calibration, compressed, batch_size, "calibration")
    if validation is None:
        train_units, val_units = split_units(pool, batch_size, rng)
        val_pool, val_source = pool, f"{len(val_units)} held-back calibration {'samples' if pool.joined else 'batches'}"
    else:
        val_pool = _load(validation, compressed, batch_size, "validation")
        train_units, val_units = list(range(pool.units)), list(range(val_pool.units))
        val_source = "validation data"
    kind = loss or default_distillation_loss(target, out_name, pool.labelled)
    if label_weight > 0 and not pool.labelled:
        raise FwlrError("`label_weight` needs labels; add a 'labels' key to the calibration .npz or drop it.")

    teacher = Teacher(original, target.tensor, providers)
    train_teacher = TeacherCache(teacher, pool)
    val_teacher = train_teacher if val_pool is pool else TeacherCache(teacher, val_pool)
    val_chunks = val_pool.chunks(val_units, batch_size)
    val_batches = [b for chunk in val_chunks for b in val_pool.take(chunk)]
    cut = _padding_cut(compressed, val_teacher, val_chunks, val_batches)
    val_batches = [cut(*batch) for batch in val_batches]

    # Memory, one model at a time: when every teacher output fits the cache, compute them now and free the
    # original and its session before the student's sessions and the optimiser exist.
    if val_teacher.fill(val_chunks, cut) and train_teacher.fill(pool.chunks(train_units, batch_size), cut):
        teacher.release()
    dropout_p = DOPE_DROPOUT if dope_dropout is None else dope_dropout
    dropout = CoMatrixDropout(doping_tensors(trainable, stored_sites(original, compressed)), dropout_p, seed)
    del original
    objective = Objective(kind, target, label_weight)
    specs = model_inputs(compressed)
    micro_batch = MICRO_BATCH if sample_axis_first(compressed, specs) else None
    student = Student(compressed, trainable, objective, find_mask_input(specs), providers, micro_batch)
    student.release_model()  # its sessions now: the training copy of the model goes before training starts
    adam = Adam({t.name: tensor_array(compressed, t) for t in compressed.graph.initializer if t.name in set(trainable)})

    def evaluate(weights):
        teachers = [val_teacher(chunk, feed) for chunk, (feed, _) in zip(val_chunks, val_batches)]
        return student.evaluate(val_batches, teachers, weights)

    report = RefineReport(kind, out_name, target.tensor, trainable, int(sum(v.size for v in adam.params.values())),
                          pool.count(train_units), val_pool.count(val_units), val_source, lr, batch_size, schedule,
                          seed, dope_dropout=dropout_p if dropout.names else 0.0)
    report.before = evaluate(adam.params)
    report.curve.append((0, None, report.before["loss"], report.before["cosine"]))
    best_loss, best_weights, report.after = report.before["loss"], None, dict(report.before)
    stale, window = 0, []
    order = _batch_stream(pool, train_units, batch_size, rng)
    bar = tqdm(total=steps, desc="refine", unit="step", disable=not progress, leave=False)
    report.stopped = "steps"
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        chunk = next(order)
        feed, labels = cut(*pool.take(chunk)[0])
        dropped = dropout.draw()
        loss_value, grads = student.loss_and_grads(feed, dropout.feed(adam.params, dropped), train_teacher(chunk, feed),
                                                   labels, cut)
        grads = dropout.mask(grads, dropped)
        if not math.isfinite(loss_value) or not all(np.all(np.isfinite(g)) for g in grads.values()):
            report.steps, report.stopped = step, "diverged"
            break
        adam.step(grads, learning_rate(step, steps, lr, schedule))
        report.step_seconds += time.perf_counter() - tick
        window.append(loss_value)
        report.steps = step
        bar.update(1)
        step_ms = 1e3 * (time.perf_counter() - tick)
        bar.set_postfix(loss=f"{loss_value:.4g}", val=f"{best_loss:.4g}", ms=f"{step_ms:.0f}")
        if step % eval_every and step != steps:
            continue
        metrics = evaluate(adam.params)
        report.curve.append((step, float(np.mean(window)), metrics["loss"], metrics["cosine"]))
        window = []
        if math.isfinite(metrics["loss"]) and metrics["loss"] < best_loss:
            best_loss, report.best_step, report.after, stale = metrics["loss"], step, metrics, 0
            best_weights = {k: v.astype(student.dtypes[k]) for k, v in adam.params.items()}  # as they are saved
        else:
            stale += 1
            if stale >= patience:
                report.stopped = "early stop"
                break
    bar.close()
    report.dropped = dropout.dropped_count
    report.seconds = time.perf_counter() - start
    return _with_weights(compressed, best_weights, student.dtypes), report


def _padding_cut(model: onnx.ModelProto, teacher: TeacherCache, chunks, batches):
    """(feed, labels) -> the same without the trailing positions no sample uses (io.batching.trim_padding), or
    unchanged when the loss tensor has a value per position: the teacher cache keeps one value per sample, which
    must not depend on how much of the batch around it was cut. The first validation batch's teacher output
    tells which (and is cached for the evaluations)."""
    specs = model_inputs(model)
    mask_name = find_mask_input(specs)
    names = padded_inputs(specs, mask_name)
    if names and batches:
        feed = batches[0][0]
        z = teacher(chunks[0], feed)
        if not (np.ndim(z) >= 2 and np.shape(z)[:2] == np.shape(feed[mask_name])):
            return lambda feed, labels: trim_padding(feed, labels, mask_name, names)
    return lambda feed, labels: (feed, labels)


def _batch_stream(pool: SamplePool, units: list[int], batch_size: int, rng):
    """Endless seeded epochs over the training units, in training batches."""
    while True:
        shuffled = [units[i] for i in rng.permutation(len(units))]
        yield from pool.chunks(shuffled, batch_size)


def _with_weights(compressed: onnx.ModelProto, weights: dict | None, dtypes: dict) -> onnx.ModelProto:
    """The compressed model with the trained initializers replaced (unchanged when `weights` is None)."""
    model = onnx.ModelProto()
    model.CopyFrom(compressed)
    if weights is None:
        return model
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(
                numpy_helper.from_array(np.asarray(weights[tensor.name], dtype=dtypes[tensor.name]), tensor.name)
            )
    return model
