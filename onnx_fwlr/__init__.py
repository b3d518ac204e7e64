"""onnx_fwlr: importance-weighted low-rank compression of ONNX models."""

__version__ = "0.1.0"

from .api import compress  # noqa: E402
from .errors import FwlrError  # noqa: E402

__all__ = ["compress", "FwlrError", "__version__"]
