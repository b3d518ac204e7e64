"""onnx_fwlr: importance-weighted low-rank compression of ONNX models."""

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import load_model, save_model
from onnx_fwlr.pipeline.compress import calibrate, compress, validate
from onnx_fwlr.version import __version__

__all__ = ["compress", "calibrate", "validate", "load_model", "save_model", "FwlrError", "__version__"]
