"""Test-session settings.

BLAS thread pools spin while waiting; next to ONNX Runtime's own threads on a small (2-core) machine they
oversubscribe the cores and made single SVDs 50x slower in our measurements. Tests use one BLAS thread.
Set before numpy is first imported (pytest imports this file before any test module).
"""

import os
import tempfile

for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

# Measured latencies (cost.latency, cost.kron_speed) are cached per machine under XDG_CACHE_HOME; tests that
# time for real (the default Kronecker shape choice) keep theirs out of the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="onnx_fwlr_test_cache_")
