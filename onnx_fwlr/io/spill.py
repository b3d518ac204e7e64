"""Arrays set aside on disk for later in the run: in one anonymous temporary file (no name: nothing to clean
up), or in a named file that other processes, on other machines of a cluster, reopen by path."""

from __future__ import annotations

import mmap
import os
import pickle
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from onnx_fwlr.errors import FwlrError


class SpillFile:
    """One temporary file that arrays are appended to and read back from.

    By default it has no name in the file system (on POSIX it is unlinked as it is made), so nothing can remove
    it from under a running compression (a cleanup of the temporary folder by another process did: a
    FileNotFoundError in the middle of a SmolLM2 run, when spilled factors were named files), and a run that is
    killed leaves nothing behind. It is closed when the last object holding it goes: whatever reads it back
    holds it.

    With `path` it is a named file (created, or emptied when it exists: a task run again starts it afresh) that
    pickles as its path and size: another process reopens it read-only on its first read (a Ray task folding a
    recorded pass, pipeline.distributed). Whoever chose the path removes the file; `close` makes what was
    written visible to readers on other machines (NFS's close-to-open consistency)."""

    def __init__(self, prefix: str = "onnx-fwlr-", path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self._file = tempfile.TemporaryFile(prefix=prefix) if path is None else open(self.path, "w+b")  # noqa: SIM115
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
            if self._file is None:
                self._file = self._reopen()
            self._file.seek(offset)
            done = self._file.readinto(memoryview(out).cast("B"))
        if done != out.nbytes:
            raise OSError(f"spill file ended early: {done} of {out.nbytes} bytes at offset {offset}")
        return out

    def close(self) -> None:
        """Close the file (a named one stays on disk, to be read elsewhere; an anonymous one is gone)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def adopt(self) -> None:
        """Open the named file in this process and remove its name: what was written stays readable through this
        object, which from now on is an anonymous spill file (nothing left on disk to clean up, the space freed
        when the last holder goes). For the process that reads it last: a Ray driver taking the factors a group
        task spilled (pipeline.distributed)."""
        with self._lock:
            if self._file is None:
                self._file = self._reopen()
            path, self.path = self.path, None
        os.remove(path)

    def _reopen(self):
        if self.path is None:
            raise OSError("an anonymous spill file was read after it was closed")
        try:
            return open(self.path, "rb")  # noqa: SIM115 - held until this object goes
        except OSError as exc:
            raise FwlrError(f"the file set aside at '{self.path}' cannot be read here ({exc.strerror}); every process "
                            "that reads it needs the folder it is in (on a Ray cluster: `ray_shared_dir`, a folder "
                            "every node mounts at the same path).") from None

    def __getstate__(self) -> dict:
        if self.path is None:
            raise TypeError("an anonymous spill file cannot leave its process; give it a path")
        return {"path": self.path, "end": self._end}

    def __setstate__(self, state: dict) -> None:
        self.path, self._end = state["path"], state["end"]
        self._file = None  # opened on the first read
        self._lock = threading.Lock()


# --- an object handed from one process to another through a named file -------------------------------------

ALIGN = 64  # each array's bytes start at a multiple of this in the file


@dataclass(frozen=True)
class HandedOver:
    """An object written to a named file by one process for another to take: its pickle (protocol 5) without
    the arrays' bytes (small, travels on its own), and where each array's bytes lie in the file."""

    path: str
    head: bytes
    spans: tuple[tuple[int, int], ...]


def hand_over(obj, path: str) -> HandedOver:
    """Write `obj`'s arrays to `path` (emptied first: a task run again starts afresh) and return what the
    taker needs besides the file. The arrays are written as they are (float64 stays float64): the taker gets
    the same numbers."""
    buffers = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    spans = []
    with open(path, "wb") as file:
        for buffer in buffers:
            raw = buffer.raw()
            offset = -(-file.tell() // ALIGN) * ALIGN
            file.seek(offset)
            file.write(raw)
            spans.append((offset, raw.nbytes))
    return HandedOver(path, head, tuple(spans))


def take_over(handed: HandedOver):
    """The object handed over, its arrays backed by the file mapped copy-on-write (read as they are touched,
    writable without changing the file); the file's name is removed at once, its space freed when the last
    array goes."""
    with open(handed.path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        mapped = mmap.mmap(file.fileno(), file_size, access=mmap.ACCESS_COPY) if file_size else b""
    os.remove(handed.path)
    view = memoryview(mapped)
    return pickle.loads(handed.head, buffers=[view[offset:offset + length] for offset, length in handed.spans])
