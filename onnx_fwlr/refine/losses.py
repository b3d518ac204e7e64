"""Distillation objectives of refine, in numpy: each returns the loss and its gradient w.r.t. the student output.

KL and cross-entropy read the output through ``SeedTarget`` (the logits feeding a final (Log)Softmax, and the
class axis), the same view the Fisher seeds use (``onnx_fwlr.autodiff.losses``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_fwlr.autodiff import losses
from onnx_fwlr.errors import FwlrError

LOSSES = ("mse", "kl")


def default_distillation_loss(target: losses.SeedTarget, output: str, labelled: bool) -> str:
    """'kl' for logits or probabilities (a final (Log)Softmax, an output named like logits, or labelled data);
    else 'mse' (hidden states, embeddings).

    Not losses.default_seed_loss: that one picks a Fisher seed and treats every 2-D output as logits, which
    would distil a [batch, dim] sentence embedding with KL; the two rules differ on purpose.
    """
    return "kl" if target.classifier or "logit" in output.lower() or labelled else "mse"


def _class_rows(z: np.ndarray, target: losses.SeedTarget) -> np.ndarray:
    """z as float64 [rows, classes] (class axis last; opset < 13 softmax flattens at the axis)."""
    return losses.class_rows(z, target.axis, target.legacy_2d).astype(np.float64)


def _rows_back(rows: np.ndarray, like: np.ndarray, target: losses.SeedTarget) -> np.ndarray:
    return losses.from_rows(rows, like, target.axis, target.legacy_2d)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _row_weights(weight, count: int) -> np.ndarray:
    if weight is None:
        return np.ones(count)
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    return w if w.size == count else np.ones(count)


def _position_weights(weight, shape) -> np.ndarray:
    """`weight` [leading axes] as float64 broadcastable to `shape` (ones when it does not lead the shape)."""
    if weight is None or tuple(shape[:np.ndim(weight)]) != np.shape(weight):
        w = np.ones(())
    else:
        w = np.asarray(weight, dtype=np.float64)
    return w.reshape(w.shape + (1,) * (len(shape) - w.ndim))


def mse_total(shape, weight=None) -> float:
    """What the mean squared error divides by: the weighted count of elements of a tensor of this shape."""
    return max(float(np.broadcast_to(_position_weights(weight, shape), shape).sum()), 1e-12)


def mse_loss(student: np.ndarray, teacher: np.ndarray, weight=None, total: float | None = None
             ) -> tuple[float, np.ndarray]:
    """Mean squared error and its gradient w.r.t. the student; `weight` [leading axes] weights positions
    (an attention mask: padding counts for nothing). `total`: divide by the whole batch's mse_total instead
    of this part's, so the losses and gradients of micro-batches add up to the batch's."""
    diff = student.astype(np.float64) - teacher.astype(np.float64)
    w = _position_weights(weight, diff.shape)
    denominator = mse_total(diff.shape, weight) if total is None else total
    loss = float(np.sum(w * diff * diff) / denominator)
    return loss, 2.0 * w * diff / denominator


def kl_total(teacher: np.ndarray, target: losses.SeedTarget, weight=None) -> float:
    """What the mean KL divides by: the weighted count of rows of logits."""
    shape = np.shape(teacher)
    axis = target.axis % len(shape)
    rows = int(np.prod(shape[:axis] if target.legacy_2d else shape[:axis] + shape[axis + 1:], dtype=np.int64))
    return max(float(_row_weights(weight if not target.legacy_2d else None, rows).sum()), 1e-12)


def kl_loss(
    student: np.ndarray, teacher: np.ndarray, target: losses.SeedTarget, weight=None, total: float | None = None
) -> tuple[float, np.ndarray]:
    """Mean KL(teacher ‖ student) over rows of logits, and its gradient w.r.t. the student logits (p_s − p_t).
    `total`: the whole batch's kl_total (see mse_loss)."""
    log_s, log_t = _log_softmax(_class_rows(student, target)), _log_softmax(_class_rows(teacher, target))
    w = _row_weights(weight if not target.legacy_2d else None, log_s.shape[0])
    total = max(float(w.sum()), 1e-12) if total is None else total
    p_t = np.exp(log_t)
    loss = float(np.sum(w * np.sum(p_t * (log_t - log_s), axis=1)) / total)
    grad = (np.exp(log_s) - p_t) * (w[:, None] / total)
    return loss, _rows_back(grad, student, target)


def ce_loss(student: np.ndarray, labels: np.ndarray, target: losses.SeedTarget, total: float | None = None
            ) -> tuple[float, np.ndarray]:
    """Mean cross-entropy against integer labels, and its gradient w.r.t. the logits (p − onehot)/rows.
    `total`: the whole batch's number of labels (see mse_loss)."""
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
    if total is None:
        return float(-picked.mean()), _rows_back(grad / rows, student, target)
    return float(-picked.sum() / total), _rows_back(grad / total, student, target)


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
    target: losses.SeedTarget
    label_weight: float = 0.0

    def totals(self, teacher, labels=None, weight=None) -> tuple[float, float | None]:
        """What the distillation and label terms of a whole batch divide by (the teacher is shaped like the
        student output): pass to each micro-batch's call so their losses and gradients add up to the batch's."""
        if self.kind == "mse":
            distil = mse_total(np.shape(teacher), weight)
        else:
            distil = kl_total(teacher, self.target, weight)
        return distil, (float(np.size(labels)) if labels is not None else None)

    def __call__(self, student, teacher, labels=None, weight=None, totals=None) -> tuple[float, np.ndarray]:
        distil, labelled = totals if totals is not None else (None, None)
        if self.kind == "mse":
            loss, grad = mse_loss(student, teacher, weight, distil)
        else:
            loss, grad = kl_loss(student, teacher, self.target, weight, distil)
        if self.label_weight and labels is not None:
            ce, ce_grad = ce_loss(student, labels, self.target, labelled)
            loss, grad = loss + self.label_weight * ce, grad + self.label_weight * ce_grad
        seed_dtype = np.float64 if student.dtype == np.float64 else np.float32
        return loss, grad.astype(seed_dtype)
