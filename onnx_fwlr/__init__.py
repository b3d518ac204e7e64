"""onnx_fwlr: importance-weighted low-rank compression of ONNX models."""

__version__ = "0.1.0"

from .api import calibrate, compress, validate  # noqa: E402
from .errors import FwlrError  # noqa: E402
from .modelio import load_model, save_model  # noqa: E402

__all__ = ["compress", "calibrate", "validate", "load_model", "save_model", "FwlrError", "__version__"]
