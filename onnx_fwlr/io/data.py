"""Calibration and validation data: where batches come from, and checking them against the model's inputs.

Sources: a `.npz` file (keys = input names, leading axis = samples; an optional `labels` key), a folder of
`.npz` files, any iterable of feed dicts, an ONNX Runtime CalibrationDataReader (`get_next()` returning a
feed dict or None), or "random" (synthetic inputs from the model's types: a smoke test, never a measurement).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from onnx_fwlr.errors import FwlrError

LABELS_KEY = "labels"
MASK_NAMES = ("attention_mask",)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, str or None for symbolic ones


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs by old exporters are optional)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(dtype), dims))
    return specs


class Batches:
    """An iterable of (feed, labels or None), checked against the model's inputs batch by batch."""

    def __init__(self, source, specs: list[InputSpec], description: str, smoke_test: bool = False):
        self._source = source  # a callable returning a fresh iterator of raw dicts
        self.specs = specs
        self.description = description
        self.smoke_test = smoke_test

    def __iter__(self) -> Iterator[tuple[dict, np.ndarray | None]]:
        for index, raw in enumerate(self._source()):
            yield check_batch(raw, self.specs, f"{self.description}, batch {index}")


class SizedBatches(Batches):
    """Batches whose count is known before reading them: progress bars show a total and an ETA."""

    def __init__(self, source, specs, description, total: int, smoke_test: bool = False):
        super().__init__(source, specs, description, smoke_test)
        self.total = total

    def __len__(self) -> int:
        return self.total


def _sized(batches: Batches, total: int | None, shard) -> Batches:
    """The batches with their count when it is known (a shard keeps every count-th batch)."""
    if total is None:
        return batches
    if shard is not None:
        total = len(range(shard[0], total, shard[1]))
    return SizedBatches(batches._source, batches.specs, batches.description, total, batches.smoke_test)


def input_batch_axes(specs: list[InputSpec]) -> dict[str, int]:
    """Input name -> its sample axis where it is not 0: the axis whose symbolic dimension has the name of the
    first input's axis 0 (an LSTM's initial state [layers, batch, H] next to x [batch, T, F] -> 1)."""
    batch = specs[0].shape[0] if specs and specs[0].shape and isinstance(specs[0].shape[0], str) else None
    axes = {}
    for spec in specs[1:] if batch else []:
        if spec.shape.count(batch) == 1 and spec.shape.index(batch) != 0:
            axes[spec.name] = spec.shape.index(batch)
    return axes


def npz_batch_count(path: Path, batch_size: int, limit: int | None = None,
                    axes: dict[str, int] | None = None) -> int | None:
    """How many batches an .npz gives, from its array headers alone (None when they cannot be read); `axes`:
    the sample axis of inputs whose samples are not on axis 0."""
    import zipfile

    try:
        counts = []
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape = read(member)[0]
                    axis = (axes or {}).get(name.removesuffix(".npy"), 0)
                    counts.append(shape[axis] if len(shape) > axis else 0)
    except Exception:  # noqa: BLE001 - unknown count: reading the data later names any problem
        return None
    samples = min(counts) if counts else 0
    samples = min(samples, limit) if limit is not None else samples
    return -(-samples // batch_size)


def open_data(
    source,
    model: onnx.ModelProto,
    batch_size: int = 32,
    shapes: dict | None = None,
    random_batches: int = 8,
    seed: int = 0,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Batches:
    """Turn any supported source into checked batches. `limit` caps the samples of .npz sources;
    `shard=(i, n)` keeps the i-th of n interleaved parts of the batches (for calibration spread over processes)."""
    specs = model_inputs(model)
    axes = input_batch_axes(specs)
    if batch_size < 1:
        raise FwlrError(f"`batch_size` {batch_size} is out of range; it must be a positive integer.")
    if isinstance(source, str) and source == "random":
        return SizedBatches(lambda: _random_batches(specs, shapes or {}, batch_size, random_batches, seed), specs,
                            "random data (smoke test)", random_batches, smoke_test=True)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise FwlrError(f"{path}: folder holds no .npz files; put one batch per .npz file in it.")
            make = lambda: (batch for f in files for batch in _npz_batches(f, batch_size, None, axes))  # noqa: E731
            counts = [npz_batch_count(f, batch_size, None, axes) for f in files]
            total = None if None in counts else sum(counts)
            return _sized(Batches(_sharded(make, shard), specs, str(path)), total, shard)
        if not path.exists():
            raise FwlrError(f"{path}: data file not found; check the path.")
        if path.suffix != ".npz":
            raise FwlrError(f"{path}: calibration data must be a .npz file (keys = input names) or a folder of them.")
        return _sized(Batches(_sharded(lambda: _npz_batches(path, batch_size, limit, axes), shard), specs,
                              str(path)), npz_batch_count(path, batch_size, limit, axes), shard)
    if hasattr(source, "get_next"):
        reader = source
        return Batches(lambda: iter(reader.get_next, None), specs, "CalibrationDataReader")
    if isinstance(source, dict):
        raise FwlrError("pass calibration data as a list of feed dicts (or a .npz path), not a single dict.")
    try:
        items = list(source)
    except TypeError:
        raise FwlrError(
            f"calibration data of type {type(source).__name__} is not supported; pass a .npz path, a folder, "
            "an iterable of feed dicts or a CalibrationDataReader."
        ) from None
    return _sized(Batches(_sharded(lambda: iter(items), shard), specs, "feed dicts"), len(items), shard)


def _sharded(make, shard):
    if shard is None:
        return make
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise FwlrError(f"`shard` {index}/{count} is invalid; use i/n with 0 <= i < n.")
    return lambda: (batch for i, batch in enumerate(make()) if i % count == index)


def _plain_array(archive, key: str, path) -> np.ndarray:
    """One array of an .npz; object arrays (pickled Python objects) are refused, never unpickled."""
    try:
        return archive[key]
    except ValueError:
        raise FwlrError(f"{path}: array '{key}' holds Python objects (dtype object), which are not read (they "
                        "would need unpickling); save plain numeric arrays, e.g. np.stack of equal-length rows."
                        ) from None


def _npz_batches(path: Path, batch_size: int, limit: int | None, axes: dict[str, int] | None = None):
    """Batches of `batch_size` samples, each array cut along its sample axis (0, or `axes`' for inputs whose
    samples are on another axis)."""
    axes = axes or {}
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure to open means "not a usable npz"
        raise FwlrError(f"{path}: could not be read as .npz ({exc}); save it with numpy.savez.") from None
    with archive:
        arrays = {key: _plain_array(archive, key, path) for key in archive.files}
    if not arrays:
        raise FwlrError(f"{path}: holds no arrays; save the model inputs under their input names.")
    counts = {key: a.shape[axes.get(key, 0)] if a.ndim > axes.get(key, 0) else 0 for key, a in arrays.items()}
    n = min(counts.values())
    if len(set(counts.values())) > 1:
        where = "the leading axis must be samples in all" + (
            f" (samples on axis {', '.join(f'{k}: {v}' for k, v in sorted(axes.items()))}, as the model's "
            "symbolic dimensions say)" if axes else "")
        raise FwlrError(f"{path}: arrays disagree on the number of samples ({counts}); {where}.")
    if limit is not None:
        n = min(n, limit)
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        yield {key: a[(slice(None),) * axes.get(key, 0) + (rows,)] for key, a in arrays.items()}


def check_batch(raw: dict, specs: list[InputSpec], where: str) -> tuple[dict, np.ndarray | None]:
    """One batch made safe to feed: exact names, dtypes and ranks, no NaN/Inf; labels split off."""
    if not isinstance(raw, dict):
        raise FwlrError(f"{where}: expected a dict of input name -> array, got {type(raw).__name__}.")
    raw = dict(raw)
    labels = raw.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise FwlrError(f"{where}: unknown input name(s) {unknown}; the model's inputs are {names}.")
    missing = [n for n in names if n not in raw]
    if missing:
        raise FwlrError(f"{where}: missing input(s) {missing}; the model needs {names}.")
    feed = {}
    for spec in specs:
        value = np.asarray(raw[spec.name])
        if value.dtype != spec.dtype:
            raise FwlrError(
                f"{where}: input '{spec.name}' has dtype {value.dtype} but the model expects {spec.dtype}; "
                f"convert it with .astype(numpy.{spec.dtype})."
            )
        if spec.shape and value.ndim != len(spec.shape):
            raise FwlrError(
                f"{where}: input '{spec.name}' has {value.ndim} dimensions {list(value.shape)} but the model expects "
                f"{len(spec.shape)} {list(spec.shape)}."
            )
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise FwlrError(
                    f"{where}: input '{spec.name}' has size {got} on axis {axis} but the model fixes it at {want}."
                )
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise FwlrError(f"{where}: input '{spec.name}' contains NaN or Inf; replace or drop those samples and "
                            "try again.")
        feed[spec.name] = value
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise FwlrError(f"{where}: 'labels' must hold integer class indices, got dtype {labels.dtype}.")
    return feed, labels


def find_mask_input(specs: list[InputSpec], name: str | None = None) -> str | None:
    """The attention-mask-like input whose zeros mark padding (by name, or the one the user names)."""
    names = [s.name for s in specs]
    if name is not None:
        if name not in names:
            raise FwlrError(f"`mask_input` '{name}' is not an input of the model; its inputs are {names}.")
        return name
    return next((n for n in names if n in MASK_NAMES), None)


def find_token_input(specs: list[InputSpec]) -> str | None:
    """The token-id input of a language model: 'input_ids', else the only 2-D integer input that is not a mask."""
    names = [s.name for s in specs]
    if "input_ids" in names:
        return "input_ids"
    candidates = [s.name for s in specs if s.dtype.kind in "iu" and len(s.shape) == 2 and s.name not in MASK_NAMES]
    return candidates[0] if len(candidates) == 1 else None


def _random_batches(specs, shapes, batch_size, count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield synthetic_feed(specs, shapes, batch_size, rng)


def synthetic_feed(specs: list[InputSpec], shapes: dict | None, batch_size: int | None, seed) -> dict:
    """One batch of random inputs from the declared types (a smoke test or a timing feed, never a measurement).

    Floats are N(0, 1); integers and booleans are ones (valid token ids and attention masks). `shapes`
    ({name: full shape}) fixes symbolic dims; otherwise a symbolic leading dim takes `batch_size` (None: it
    must be given too). `seed` is an int or a numpy Generator (to draw several batches from one stream).
    """
    shapes = shapes or {}
    names = [spec.name for spec in specs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise FwlrError(f"`shapes` names input(s) {', '.join(unknown)} that the model does not have; its inputs are "
                        f"{', '.join(names)}.")
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        dims = _synthetic_dims(spec, shapes.get(spec.name), batch_size)
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        elif spec.dtype.kind in "iub":
            feed[spec.name] = np.ones(dims, dtype=spec.dtype)
        else:
            raise FwlrError(f"input '{spec.name}' has dtype {spec.dtype}, which cannot be synthesised; feed real data.")
    return feed


def _synthetic_dims(spec: InputSpec, given, batch_size: int | None) -> list[int]:
    """The shape to synthesise: the --shape given for the input (checked against the declared one), else the
    declared shape with a symbolic leading dim set to batch_size."""
    if given is not None:
        if spec.shape and len(given) != len(spec.shape):
            raise FwlrError(f"`shapes` for input '{spec.name}' has {len(given)} dimensions but the model declares "
                            f"{len(spec.shape)}; give all {len(spec.shape)}.")
        for axis, (want, have) in enumerate(zip(spec.shape, given)):
            if isinstance(want, int) and want > 0 and want != have:
                raise FwlrError(f"`shapes` for input '{spec.name}' sets dimension {axis} to {have} but the model fixes "
                                f"it at {want}.")
        return list(given)
    dims = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif axis == 0 and batch_size is not None:
            dims.append(batch_size)
        else:
            raise FwlrError(
                f"input '{spec.name}' has a symbolic dimension '{dim}' on axis {axis}; give its size with "
                f"`shapes` {spec.name}:d0,d1,... for random data."
            )
    return dims
