"""What refine trains, and the two models it runs: the student (compressed, trainable) and the teacher (original).

What is trained (``trainable_factors``): in the compressed model's main graph,
  1. factor weights: float initializers absent from the original (by name), not scalars, that only the ops
     of FACTOR_READERS read at the listed inputs: the A and B of every factorised site, the bias corrections,
     and of structured sites (rewrite.structured) the stored Kronecker / low-rank factors and the doping
     values (their support, integer indices, stays fixed; refine.structured re-selects it between phases);
  2. site biases: a float initializer of the original that is the C input of a Gemm reading a factor weight,
     or the constant operand of an Add applied directly to a factor node's output, when nothing else reads it.
Everything else stays frozen. The trainable initializers become graph inputs of an internal training copy,
so one ONNX Runtime session serves every step (the current weights are fed each step).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io import runtime
from onnx_fwlr.io.onnx_utils import FLOAT_TYPES
from onnx_fwlr.refine.losses import Objective, mean_cosine

# op -> the inputs at which it may read a trainable factor (structured forms derive their layouts with
# Transpose / Reshape / Gather, and scatter the doping values as updates)
FACTOR_READERS = {"MatMul": (0, 1), "Gemm": (0, 1, 2), "Add": (0, 1), "Mul": (0, 1), "Transpose": (0,),
                  "Reshape": (0,), "Gather": (0,), "ScatterND": (2,), "ScatterElements": (2,)}


def trainable_factors(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[str]:
    """Names of the compressed model's initializers that refine trains (rule in the module docstring)."""
    graph = compressed.graph
    before = {t.name for t in original.graph.initializer}
    floats = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, position))

    def read_as_factor(name):
        return readers.get(name) and all(position in FACTOR_READERS.get(n.op_type, ())
                                         for n, position in readers[name])

    factors = [t.name for t in graph.initializer if t.name in floats and t.name not in before and len(t.dims)
               and read_as_factor(t.name)]
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


def _options(quiet: bool = True):
    """numpy runs between ORT calls: spinning ORT threads would steal its cores. No memory arena: batches are cut
    to their length, so shapes vary and an arena would keep the largest buffers of every shape seen."""
    return runtime.session_options(spinning=False, quiet=quiet, arena=False)


def _session(model: onnx.ModelProto, providers):
    return runtime.make_session(model, _options(), providers)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model, with tensor `name` added to its outputs when it is an intermediate."""
    if name in {o.name for o in model.graph.output}:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


def _micro_batches(feed: dict, labels, teacher: np.ndarray, size: int | None):
    """(feed, labels, teacher) in pieces of at most `size` samples along the leading axis they all share;
    whole when they share none or `size` is None."""
    arrays = [*feed.values(), teacher] + ([labels] if labels is not None else [])
    counts = {np.shape(a)[0] if np.ndim(a) else -1 for a in arrays}
    count = counts.pop() if len(counts) == 1 else -1
    if size is None or count <= size:
        yield feed, labels, teacher
        return
    for start in range(0, count, size):
        part = slice(start, start + size)
        yield ({k: v[part] for k, v in feed.items()}, labels[part] if labels is not None else None,
               teacher[part])


class Student:
    """Loss and factor gradients of the compressed model on one batch.

    Forward in ONNX Runtime (one session for the training copy; ``forward`` may be swapped, e.g. for a
    float64 reference evaluator in tests), backward with ``GradientRunner`` over only the needed tensors.
    `micro_batch`: samples per forward and backward pass (None: the whole batch); the intermediates of one
    pass are what a step holds, so memory follows it and not the batch size.
    """

    def __init__(self, compressed: onnx.ModelProto, trainable: list[str], objective: Objective,
                 mask_input: str | None = None, providers=("CPUExecutionProvider",), micro_batch: int | None = None):
        self.trainable = list(trainable)
        self.objective = objective
        self.mask_input = mask_input
        self.providers = providers
        self.micro_batch = micro_batch
        self.model = training_model(compressed, trainable)
        self.runner = GradientRunner(self.model, objective.target.tensor, self.trainable, providers=providers,
                                     session_options=_options(quiet=False))
        self.dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                       for t in compressed.graph.initializer if t.name in set(trainable)}
        self.forward = self.runner.forward
        self._predict_session = None

    def feed(self, feed: dict, weights: dict[str, np.ndarray]) -> dict:
        return {**feed, **{k: np.asarray(v, dtype=self.dtypes[k]) for k, v in weights.items()}}

    def _weight(self, feed, z):
        mask = feed.get(self.mask_input) if self.mask_input else None
        return mask if mask is not None and z.ndim >= 3 and z.shape[:2] == mask.shape else None

    def loss_and_grads(self, feed, weights, teacher, labels=None, cut=None) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients of the batch, summed over its micro-batches: each part's loss divides by the whole
        batch's totals (Objective.totals), so the sums are the batch's loss and gradient up to float rounding.
        `cut(feed, labels)` trims each part's padding (refine.loop passes it where the loss allows)."""
        typed = self.feed({}, weights)
        totals = self.objective.totals(teacher, labels, self._weight(feed, teacher))
        loss, grads = 0.0, {}
        for part, part_labels, part_teacher in _micro_batches(feed, labels, teacher, self.micro_batch):
            if cut is not None:
                part, part_labels = cut(part, part_labels)
            values = self.forward({**part, **typed})
            z = values[self.objective.target.tensor]
            part_loss, seed = self.objective(z, part_teacher, part_labels, self._weight(part, z), totals)
            del z
            part_grads = self.runner.backward(values, seed)
            del values, seed  # this part's intermediates go before the next part runs
            loss += part_loss
            for name, g in part_grads.items():
                grads[name] = grads[name] + g if name in grads else g
        return loss, grads

    def release_model(self) -> None:
        """Open both sessions now and drop the training copy of the model (as large as the model): the steps and
        evaluations then need only the sessions and the constants the backward pass reads."""
        self._open_predict_session()
        self.runner.release_model()
        self.model = None

    def _open_predict_session(self):
        if self._predict_session is None:
            self._predict_session = _session(self.model, self.providers)
        return self._predict_session

    def predict(self, feed, weights) -> np.ndarray:
        """The loss tensor alone (no intermediates): for evaluation."""
        self._open_predict_session()
        names = {i.name for i in self._predict_session.get_inputs()}
        full = self.feed(feed, weights)
        feed = {k: v for k, v in full.items() if k in names}
        return self._predict_session.run([self.objective.target.tensor], feed)[0]

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
            raise FwlrError(
                f"tensor '{tensor}' of the compressed model is not in the original model; pass the "
                "original the compressed model was made from."
            )
        self.tensor = tensor
        self.session = _session(_with_output(original, tensor), providers)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, feed: dict) -> np.ndarray:
        if self.session is None:
            raise RuntimeError("the teacher session was released; cache every output before releasing it")
        return self.session.run([self.tensor], {k: v for k, v in feed.items() if k in self.inputs})[0]

    def release(self) -> None:
        """Free the session (the original's weights) once every output it will be asked for is cached."""
        self.session = None
