"""The Python API of earlier releases, kept as a thin re-export: the pipeline lives in `onnx_fwlr.pipeline`."""

from onnx_fwlr.pipeline.compress import *  # noqa: F401,F403
from onnx_fwlr.pipeline.compress import Budget, Prepared, build, calibrate, choose_ranks, compress, prepare, validate  # noqa: F401
