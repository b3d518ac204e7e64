"""Arrays set aside on disk for later in the run, in one anonymous temporary file (no name: nothing to clean up)."""

from __future__ import annotations

import tempfile
import threading

import numpy as np


class SpillFile:
    """One anonymous temporary file that arrays are appended to and read back from.

    It has no name in the file system (on POSIX it is unlinked as it is made), so nothing can remove it from
    under a running compression (a cleanup of the temporary folder by another process did: a FileNotFoundError
    in the middle of a SmolLM2 run, when spilled factors were named files), and a run that is killed leaves
    nothing behind. It is closed when the last object holding it goes: whatever reads it back holds it."""

    def __init__(self, prefix: str = "onnx-fwlr-"):
        self._file = tempfile.TemporaryFile(prefix=prefix)
        self._end = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._end

    def append(self, array: np.ndarray) -> int:
        """Write the C-order bytes of `array`; returns their offset."""
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        with self._lock:
            offset = self._end
            self._file.seek(offset)
            self._file.write(data)
            self._end += data.nbytes
        return offset

    def read(self, offset: int, dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The array of `dtype` and `shape` written at `offset` (or its leading rows), as a new array."""
        out = np.empty(shape, dtype=dtype)
        with self._lock:
            self._file.seek(offset)
            done = self._file.readinto(memoryview(out).cast("B"))
        if done != out.nbytes:
            raise OSError(f"spill file ended early: {done} of {out.nbytes} bytes at offset {offset}")
        return out
