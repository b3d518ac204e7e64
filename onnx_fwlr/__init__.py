"""onnx_fwlr: importance-weighted low-rank compression of ONNX models.

The API is imported on first use (PEP 562), so that `onnx-fwlr --help` and `--version` answer without loading
onnx, onnxruntime, numpy or scipy, and Ctrl-C in the first second is an ordinary interrupt.
"""

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.version import __version__

__all__ = ["compress", "calibrate", "validate", "load_model", "save_model", "FwlrError", "__version__"]

_LAZY = {"compress": "onnx_fwlr.pipeline.compress", "calibrate": "onnx_fwlr.pipeline.compress",
         "validate": "onnx_fwlr.pipeline.compress", "load_model": "onnx_fwlr.io.model",
         "save_model": "onnx_fwlr.io.model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnx_fwlr' has no attribute {name!r}")
