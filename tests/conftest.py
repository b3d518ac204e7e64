"""Test-session settings.

BLAS thread pools spin while waiting; next to ONNX Runtime's own threads on a small (2-core) machine they
oversubscribe the cores and made single SVDs 50x slower in our measurements. Tests use one BLAS thread.
Set before numpy is first imported (pytest imports this file before any test module).
"""

import os

for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")
