"""Distillation of a compressed model's factors against the original: ``refine`` and the names its callers use."""

from onnx_fwlr.refine.loop import RefineReport, refine
from onnx_fwlr.refine.losses import LOSSES, Objective
from onnx_fwlr.refine.optim import SCHEDULES, learning_rate
from onnx_fwlr.refine.trainable import Student, Teacher, trainable_factors

__all__ = ["LOSSES", "SCHEDULES", "Objective", "RefineReport", "Student", "Teacher", "learning_rate", "refine",
           "trainable_factors"]
