"""Fine-tune the factors of a compressed model by distillation against the original, over the ONNX graph.

The closed-form factors are a starting point; a short distillation on the calibration data recovers much of
what truncation lost (DESIGN §3, "Fine-tuning without the framework"). No training framework: the student's
forward pass runs in ONNX Runtime, its backward pass is ``GradientRunner`` (numpy VJP rules), the optimiser
is Adam in numpy, and the teacher is the original model in ONNX Runtime.

What is trained (``trainable_factors``): in the compressed model's main graph,
  1. factor weights: float initializers absent from the original (by name) that only MatMul, Gemm or Add
     nodes read: the A and B of every factorised site and the bias corrections;
  2. site biases: a float initializer of the original that is the C input of a Gemm reading a factor weight,
     or the constant operand of an Add applied directly to a factor node's output, when nothing else reads it.
Everything else stays frozen. The trainable initializers become graph inputs of an internal training copy,
so one ONNX Runtime session serves every step (the current weights are fed each step).

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
from tqdm.auto import tqdm

from onnx_fwlr.autodiff import losses as fisher
from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.io.data import find_mask_input, model_inputs, open_data
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.stats.fisher import default_output
from onnx_fwlr.io.model import load_model, max_runtime_ir_version, tensor_array

LOSSES = ("mse", "kl")
SCHEDULES = ("cosine", "linear")
VAL_FRACTION = 0.1  # share of the calibration samples held back for validation when none is given
TEACHER_CACHE_BYTES = 512 * 2**20  # teacher outputs are kept in memory up to this size, else recomputed
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


# ---------------------------------------------------------------------------------------------- what is trained

def trainable_factors(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[str]:
    """Names of the compressed model's initializers that refine trains (rule in the module docstring)."""
    graph = compressed.graph
    before = {t.name for t in original.graph.initializer}
    floats = {t.name for t in graph.initializer if t.data_type in _FLOAT_TYPES}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    factors = [t.name for t in graph.initializer if t.name in floats and t.name not in before
               and readers.get(t.name) and all(n.op_type in ("MatMul", "Gemm", "Add") for n in readers[t.name])]
    factor_set = set(factors)
    factor_outputs = {o for n in graph.node if factor_set & set(n.input) for o in n.output}
    biases = []
    for node in graph.node:
        if node.op_type == "Gemm" and factor_set & set(node.input[:2]) and len(node.input) > 2:
            candidates = [node.input[2]]
        elif node.op_type == "Add" and factor_outputs & set(node.input):
            candidates = [name for name in node.input if name not in factor_outputs]
        else:
            continue
        biases += [c for c in candidates if c in floats and c not in factor_set and len(readers.get(c, [])) == 1]
    return factors + sorted(set(biases) - factor_set, key=biases.index)


def training_model(compressed: onnx.ModelProto, trainable: list[str]) -> onnx.ModelProto:
    """A copy of the model whose trainable initializers are graph inputs (fed each step, same session)."""
    model = onnx.ModelProto()
    model.CopyFrom(compressed)
    graph = model.graph
    wanted = set(trainable)
    moved = [t for t in graph.initializer if t.name in wanted]
    kept = [t for t in graph.initializer if t.name not in wanted]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    listed = {i.name for i in graph.input}
    for tensor in moved:
        if tensor.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return model


def _runtime_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized model with the IR version lowered to what the installed onnxruntime reads."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = min(copy.ir_version, max_runtime_ir_version())
    return copy.SerializeToString()


def _session(model: onnx.ModelProto, providers):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(_runtime_bytes(model), options, providers=list(providers))


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model, with tensor `name` added to its outputs when it is an intermediate."""
    if name in {o.name for o in model.graph.output}:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


# ---------------------------------------------------------------------------------------------- losses (numpy)

def _class_rows(z: np.ndarray, target: fisher.SeedTarget) -> np.ndarray:
    """z as float64 [rows, classes] (class axis last; opset < 13 softmax flattens at the axis)."""
    if target.legacy_2d:
        axis = target.axis % z.ndim
        return z.reshape(int(np.prod(z.shape[:axis], dtype=np.int64)), -1).astype(np.float64)
    moved = np.moveaxis(z, target.axis, -1)
    return moved.reshape(-1, moved.shape[-1]).astype(np.float64)


def _rows_back(rows: np.ndarray, like: np.ndarray, target: fisher.SeedTarget) -> np.ndarray:
    if target.legacy_2d:
        return rows.reshape(like.shape)
    return np.moveaxis(rows.reshape(np.moveaxis(like, target.axis, -1).shape), -1, target.axis)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _row_weights(weight, count: int) -> np.ndarray:
    if weight is None:
        return np.ones(count)
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    return w if w.size == count else np.ones(count)


def mse_loss(student: np.ndarray, teacher: np.ndarray, weight=None) -> tuple[float, np.ndarray]:
    """Mean squared error and its gradient w.r.t. the student; `weight` [leading axes] weights positions
    (an attention mask: padding counts for nothing)."""
    diff = student.astype(np.float64) - teacher.astype(np.float64)
    if weight is None or diff.shape[:np.ndim(weight)] != np.shape(weight):
        w = np.ones(())
    else:
        w = np.asarray(weight, dtype=np.float64)
    w = w.reshape(w.shape + (1,) * (diff.ndim - w.ndim))
    denominator = max(float(np.broadcast_to(w, diff.shape).sum()), 1e-12)
    loss = float(np.sum(w * diff * diff) / denominator)
    return loss, 2.0 * w * diff / denominator


def kl_loss(student: np.ndarray, teacher: np.ndarray, target: fisher.SeedTarget, weight=None) -> tuple[float, np.ndarray]:
    """Mean KL(teacher ‖ student) over rows of logits, and its gradient w.r.t. the student logits (p_s − p_t)."""
    log_s, log_t = _log_softmax(_class_rows(student, target)), _log_softmax(_class_rows(teacher, target))
    w = _row_weights(weight if not target.legacy_2d else None, log_s.shape[0])
    total = max(float(w.sum()), 1e-12)
    p_t = np.exp(log_t)
    loss = float(np.sum(w * np.sum(p_t * (log_t - log_s), axis=1)) / total)
    grad = (np.exp(log_s) - p_t) * (w[:, None] / total)
    return loss, _rows_back(grad, student, target)


def ce_loss(student: np.ndarray, labels: np.ndarray, target: fisher.SeedTarget) -> tuple[float, np.ndarray]:
    """Mean cross-entropy against integer labels, and its gradient w.r.t. the logits (p − onehot)/rows."""
    log_s = _log_softmax(_class_rows(student, target))
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    rows, classes = log_s.shape
    if labels.shape[0] != rows:
        raise FwlrError(f"got {labels.shape[0]} labels for {rows} predictions; give one class index per prediction.")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise FwlrError(f"labels must lie in [0, {classes}); fix the label encoding.")
    picked = log_s[np.arange(rows), labels]
    grad = np.exp(log_s)
    grad[np.arange(rows), labels] -= 1.0
    return float(-picked.mean()), _rows_back(grad / rows, student, target)


def mean_cosine(student: np.ndarray, teacher: np.ndarray) -> tuple[float, int]:
    """Sum of per-sample cosines of the flattened tensors, and the sample count (to average over batches)."""
    a = student.reshape(student.shape[0], -1).astype(np.float64)
    b = teacher.reshape(teacher.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300), 1.0)
    return float(np.clip(cos, -1, 1).sum()), a.shape[0]


@dataclass
class Objective:
    """The refine loss: `kind` distillation on `target.tensor` plus `label_weight` × cross-entropy."""

    kind: str
    target: fisher.SeedTarget
    label_weight: float = 0.0

    def __call__(self, student, teacher, labels=None, weight=None) -> tuple[float, np.ndarray]:
        if self.kind == "mse":
            loss, grad = mse_loss(student, teacher, weight)
        else:
            loss, grad = kl_loss(student, teacher, self.target, weight)
        if self.label_weight and labels is not None:
            ce, ce_grad = ce_loss(student, labels, self.target)
            loss, grad = loss + self.label_weight * ce, grad + self.label_weight * ce_grad
        seed_dtype = np.float64 if student.dtype == np.float64 else np.float32
        return loss, grad.astype(seed_dtype)


# ---------------------------------------------------------------------------------------------- optimiser (numpy)

def learning_rate(step: int, steps: int, lr: float, schedule: str = "cosine") -> float:
    """Learning rate of step 1..steps: linear warm-up over the first 5 % (at most 50 steps), then cosine or
    linear decay towards zero (never exactly zero on the last step)."""
    warmup = min(50, max(1, steps // 20))
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / (steps - warmup + 1)
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Adam:
    """Adam (Kingma & Ba) on float64 master weights and moments.

    float64 because an update lr·m/√v ≈ 1e-4 · 1e-2 relative would round away in float32 weights, and the
    factors are few parameters by construction (three float64 copies of a compressed model's factors).
    """

    def __init__(self, params: dict[str, np.ndarray], beta1=0.9, beta2=0.999, eps=1e-8):
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.beta1, self.beta2, self.eps, self.t = beta1, beta2, eps, 0

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for name, p in self.params.items():
            g = grads[name].astype(np.float64)
            self.m[name] = self.beta1 * self.m[name] + (1 - self.beta1) * g
            self.v[name] = self.beta2 * self.v[name] + (1 - self.beta2) * g * g
            p -= lr * (self.m[name] / c1) / (np.sqrt(self.v[name] / c2) + self.eps)


# ---------------------------------------------------------------------------------------------- student / teacher

class Student:
    """Loss and factor gradients of the compressed model on one batch.

    Forward in ONNX Runtime (one session for the training copy; ``forward`` may be swapped, e.g. for a
    float64 reference evaluator in tests), backward with ``GradientRunner`` over only the needed tensors.
    """

    def __init__(self, compressed: onnx.ModelProto, trainable: list[str], objective: Objective,
                 mask_input: str | None = None, providers=("CPUExecutionProvider",)):
        self.trainable = list(trainable)
        self.objective = objective
        self.mask_input = mask_input
        self.providers = providers
        self.model = training_model(compressed, trainable)
        self.runner = GradientRunner(self.model, objective.target.tensor, self.trainable, providers=providers)
        self.dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                       for t in compressed.graph.initializer if t.name in set(trainable)}
        self.forward = self.runner.forward
        self._predict_session = None

    def feed(self, feed: dict, weights: dict[str, np.ndarray]) -> dict:
        return {**feed, **{k: np.asarray(v, dtype=self.dtypes[k]) for k, v in weights.items()}}

    def _weight(self, feed, z):
        mask = feed.get(self.mask_input) if self.mask_input else None
        return mask if mask is not None and z.ndim >= 3 and z.shape[:2] == mask.shape else None

    def loss_and_grads(self, feed, weights, teacher, labels=None) -> tuple[float, dict[str, np.ndarray]]:
        values = self.forward(self.feed(feed, weights))
        z = values[self.objective.target.tensor]
        loss, seed = self.objective(z, teacher, labels, self._weight(feed, z))
        return loss, self.runner.backward(values, seed)

    def predict(self, feed, weights) -> np.ndarray:
        """The loss tensor alone (no intermediates): for evaluation."""
        if self._predict_session is None:
            self._predict_session = _session(self.model, self.providers)
        names = {i.name for i in self._predict_session.get_inputs()}
        full = self.feed(feed, weights)
        return self._predict_session.run([self.objective.target.tensor], {k: v for k, v in full.items() if k in names})[0]

    def evaluate(self, batches, teachers, weights) -> dict:
        """Mean loss (per sample), mean cosine to the teacher and, with labels, accuracy."""
        loss_sum = cos_sum = 0.0
        count = correct = labelled = 0
        for (feed, labels), teacher in zip(batches, teachers):
            z = self.predict(feed, weights)
            loss, _ = self.objective(z, teacher, labels, self._weight(feed, z))
            n = z.shape[0] if z.ndim else 1
            loss_sum += loss * n
            c, _ = mean_cosine(z, teacher)
            cos_sum += c
            count += n
            if labels is not None and z.ndim == 2:
                correct += int(np.sum(np.argmax(z, axis=-1) == np.asarray(labels).reshape(-1)))
                labelled += len(labels)
        metrics = {"loss": loss_sum / max(count, 1), "cosine": cos_sum / max(count, 1)}
        if labelled:
            metrics["accuracy"] = correct / labelled
        return metrics


class Teacher:
    """The original model's value of the loss tensor, from its own ONNX Runtime session."""

    def __init__(self, original: onnx.ModelProto, tensor: str, providers=("CPUExecutionProvider",)):
        known = {o for n in original.graph.node for o in n.output} | {i.name for i in original.graph.input}
        if tensor not in known:
            raise FwlrError(f"tensor '{tensor}' of the compressed model is not in the original model; pass the "
                            "original the compressed model was made from.")
        self.tensor = tensor
        self.session = _session(_with_output(original, tensor), providers)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, feed: dict) -> np.ndarray:
        return self.session.run([self.tensor], {k: v for k, v in feed.items() if k in self.inputs})[0]


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
                        "or pass validation data (--val).")
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
        if self.improved:
            lines.append(f"best step {self.best_step} of {self.steps} run ({self.stopped}); {self.seconds:.1f} s")
        else:
            lines.append(f"no improvement on validation in {self.steps} steps ({self.stopped}); the input weights "
                         f"are returned unchanged; {self.seconds:.1f} s")
        return "\n".join(lines)

    def plot(self, path):
        """Train and validation loss against step (and validation cosine), as a PNG."""
        from onnx_fwlr.evaluate.plots import _pyplot

        plt = _pyplot()
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
        raise FwlrError(f"--steps {steps} is out of range; it must be a positive integer.")
    if not (lr > 0 and math.isfinite(lr)):
        raise FwlrError(f"--lr {lr} is out of range; give a positive learning rate such as 1e-4.")
    if batch_size < 1:
        raise FwlrError(f"--batch-size {batch_size} is out of range; it must be a positive integer.")
    if loss is not None and loss not in LOSSES:
        raise FwlrError(f"unknown refine loss '{loss}'; choose one of {', '.join(LOSSES)}.")
    if not (label_weight >= 0 and math.isfinite(label_weight)):
        raise FwlrError(f"--label-weight {label_weight} is out of range; give a number >= 0.")
    if eval_every < 1 or patience < 1:
        raise FwlrError("eval_every and patience must be positive integers.")
    if schedule not in SCHEDULES:
        raise FwlrError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}.")


def default_loss(target: fisher.SeedTarget, output: str, labelled: bool) -> str:
    """'kl' for logits or probabilities (a final (Log)Softmax, an output named like logits, or labelled data);
    else 'mse' (hidden states, embeddings). fisher.default_loss treats every 2-D output as logits, which
    would wrongly distil a [batch, dim] sentence embedding with KL."""
    return "kl" if target.classifier or "logit" in output.lower() or labelled else "mse"


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
    progress: bool = True,
    providers=("CPUExecutionProvider",),
) -> tuple[onnx.ModelProto, RefineReport]:
    """Distil the factors of `compressed` against `original` on `calibration` data; returns the refined model
    (never worse on validation than `compressed`) and a RefineReport.

    Validation: `validation` data, else a seeded 10 % of the calibration samples (at least one batch), which
    then are not trained on. Evaluated every `eval_every` steps; stops after `patience` evaluations without
    improvement. Inputs are paths or ModelProtos and are never modified.
    """
    _check_arguments(steps, lr, batch_size, loss, label_weight, eval_every, patience, schedule)
    start = time.perf_counter()
    original, compressed = load_model(original), load_model(compressed)
    trainable = trainable_factors(original, compressed)
    if not trainable:
        raise FwlrError("the compressed model has no factor weights that the original lacks; pass the original "
                        "model first and a model compressed from it second.")
    out_name = default_output(compressed, output, "--output-name")
    if out_name not in {o.name for o in original.graph.output}:
        raise FwlrError(f"output '{out_name}' of the compressed model is not an output of the original; pass the "
                        "original the compressed model was made from.")
    target = fisher.find_seed_target(compressed, out_name)
    rng = np.random.default_rng(seed)

    pool = _load(calibration, compressed, batch_size, "calibration")
    if validation is None:
        train_units, val_units = split_units(pool, batch_size, rng)
        val_pool, val_source = pool, f"{len(val_units)} held-back calibration {'samples' if pool.joined else 'batches'}"
    else:
        val_pool = _load(validation, compressed, batch_size, "validation")
        train_units, val_units = list(range(pool.units)), list(range(val_pool.units))
        val_source = "validation data"
    kind = loss or default_loss(target, out_name, pool.labelled)
    if label_weight > 0 and not pool.labelled:
        raise FwlrError("--label-weight needs labels; add a 'labels' key to the calibration .npz or drop it.")

    objective = Objective(kind, target, label_weight)
    student = Student(compressed, trainable, objective, find_mask_input(model_inputs(compressed)), providers)
    teacher = Teacher(original, target.tensor, providers)
    train_teacher = TeacherCache(teacher, pool)
    val_teacher = train_teacher if val_pool is pool else TeacherCache(teacher, val_pool)
    val_chunks = val_pool.chunks(val_units, batch_size)
    val_batches = [b for chunk in val_chunks for b in val_pool.take(chunk)]

    def evaluate(weights):
        teachers = [val_teacher(chunk, feed) for chunk, (feed, _) in zip(val_chunks, val_batches)]
        return student.evaluate(val_batches, teachers, weights)

    initial = {t.name: tensor_array(compressed, t) for t in compressed.graph.initializer if t.name in set(trainable)}
    adam = Adam(initial)
    report = RefineReport(kind, out_name, target.tensor, trainable, int(sum(v.size for v in initial.values())),
                          pool.count(train_units), val_pool.count(val_units), val_source, lr, batch_size, schedule,
                          seed)
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
        feed, labels = pool.take(chunk)[0]
        loss_value, grads = student.loss_and_grads(feed, adam.params, train_teacher(chunk, feed), labels)
        if not math.isfinite(loss_value) or not all(np.all(np.isfinite(g)) for g in grads.values()):
            report.steps, report.stopped = step, "diverged"
            break
        adam.step(grads, learning_rate(step, steps, lr, schedule))
        report.step_seconds += time.perf_counter() - tick
        window.append(loss_value)
        report.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4g}", val=f"{best_loss:.4g}", ms=f"{1e3 * (time.perf_counter() - tick):.0f}")
        if step % eval_every and step != steps:
            continue
        metrics = evaluate(adam.params)
        report.curve.append((step, float(np.mean(window)), metrics["loss"], metrics["cosine"]))
        window = []
        if math.isfinite(metrics["loss"]) and metrics["loss"] < best_loss:
            best_loss, report.best_step, report.after, stale = metrics["loss"], step, metrics, 0
            best_weights = {k: v.copy() for k, v in adam.params.items()}
        else:
            stale += 1
            if stale >= patience:
                report.stopped = "early stop"
                break
    bar.close()
    report.seconds = time.perf_counter() - start
    return _with_weights(compressed, best_weights, student.dtypes), report


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
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(weights[tensor.name], dtype=dtypes[tensor.name]),
                                                    tensor.name))
    return model
