"""Bounded memory for `quantize` on large models: what the allocation needs stays in memory (each option's bytes
and predicted loss, a few numbers per site), what only the build needs (each site's weighting and the plan of
its chosen option) waits on disk.

A site's weighting (the Cholesky factors of its two Grams, float64) is computed once, in site order, so gradient
statistics measured one group of sites at a time (stats.fisher.GroupedFisherStatistics) are measured once per
group; on a large model it is then written to a temporary folder and read back when the build needs it, exact
(pickled float64: the same output bytes as keeping it in memory). Small models keep everything in memory, as
before. The folder belongs to the store: it is removed when the store is closed or collected, and at exit.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import weakref
import zlib
from collections.abc import Callable, Mapping


class SpillStore:
    """Objects by key, in memory or (spilled) as pickles in a temporary folder made on first use."""

    def __init__(self, spill: bool, prefix: str = "onnx-fwlr-quantize-"):
        self.spill = spill
        self._prefix = prefix
        self._memory: dict = {}
        self._files: dict = {}
        self.folder: str | None = None
        self._cleanup = None

    def put(self, key, value) -> None:
        if not self.spill:
            self._memory[key] = value
            return
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix=self._prefix)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        path = os.path.join(self.folder, f"{len(self._files):05d}_{zlib.crc32(repr(key).encode()):08x}.pkl")
        with open(path, "wb") as handle:
            pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
        self._files[key] = path

    def get(self, key):
        """The object (a fresh copy read from disk when spilled); KeyError when never put."""
        if key in self._memory:
            return self._memory[key]
        with open(self._files[key], "rb") as handle:
            return pickle.load(handle)

    def __contains__(self, key) -> bool:
        return key in self._memory or key in self._files

    def held_in_memory(self) -> int:
        """How many objects live in memory (the bounded-memory tests count them)."""
        return len(self._memory)

    def close(self) -> None:
        """Remove the folder now (idempotent)."""
        if self._cleanup is not None:
            self._cleanup()


class LazyMetrics(Mapping):
    """weight -> the site's weighting, computed by `compute(weight)` on first access and put in `store`
    (kept in memory, or spilled); later accesses read it back from there."""

    def __init__(self, weights: list[str], compute: Callable, store: SpillStore):
        self._weights = list(weights)
        self._compute = compute
        self.store = store

    def __getitem__(self, weight: str):
        if weight not in self.store:
            if weight not in self._weights:
                raise KeyError(weight)
            value = self._compute(weight)
            self.store.put(weight, value)
            return value
        return self.store.get(weight)

    def __iter__(self):
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


class StoredPlans(Mapping):
    """weight -> SitePlan for one build, read from `store` under its key (weight, option label) on each access, so a
    spilled build holds one site's plan at a time while the graph is rewritten."""

    def __init__(self, keys: dict[str, tuple], store: SpillStore):
        self._keys = dict(keys)
        self._store = store

    def __getitem__(self, weight: str):
        return self._store.get(self._keys[weight])

    def __contains__(self, weight) -> bool:  # without reading the plan back
        return weight in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
