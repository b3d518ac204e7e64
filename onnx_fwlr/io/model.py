"""Reading and writing ONNX models safely: untrusted input, atomic output, loadable IR version."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import external_data_helper, numpy_helper

from onnx_fwlr.errors import FwlrError

# Above this serialized size protobuf cannot hold the model in one message; keep weights outside.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Above this many bytes of external data a model is loaded lazily: structure in memory, weights read per site.
# 256 MiB: a 135 M-parameter decoder's 650 MB of weights are then neither held in memory nor serialised for ONNX
# Runtime on every session (docs/llm.md, "Memory and K-FAC at scale").
LAZY_THRESHOLD = 256 << 20
# Metadata entry that marks a lazily loaded model and names the folder its external data lives in. Copies of
# the model (CopyFrom) carry it along; save_model removes it from what it writes.
BASE_DIR_KEY = "onnx_fwlr.external_data_dir"
ALIGNMENT = 65536  # tensors of 1 MB or more start at this boundary in written .data files (mmap-friendly)


def load_model(source: str | os.PathLike | onnx.ModelProto, lazy: bool | None = None,
               copy: bool = True) -> onnx.ModelProto:
    """A checked, independent copy of the model.

    External data is loaded into it, unless `lazy` (None = when the external data exceeds LAZY_THRESHOLD):
    then only the structure is in memory and weights are read from the .data files when needed
    (tensor_array, save_model and onnx_fwlr.io.runtime know how). copy=False: a given ModelProto is checked
    and returned itself, for callers that never modify it (a model is not held twice).
    """
    if isinstance(source, onnx.ModelProto):
        model = source
        if copy:
            model = onnx.ModelProto()
            model.CopyFrom(source)
        _check_parsed(model, "the given ModelProto")
        if external_base(model) is None:
            _run_checker(model, "the given ModelProto")
        else:  # lazily loaded: the checker reads the structure from a file beside the external data
            with structure_file(model) as path:
                _run_checker(path, "the given ModelProto")
        return model
    path = Path(source)
    if not path.exists():
        raise FwlrError(f"{path}: file not found; check the path.")
    if not path.is_file():
        raise FwlrError(f"{path}: is not a file; pass the path of a .onnx model file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise FwlrError(
            f"{path}: is not a readable ONNX model ({_first_line(exc)}); the file may be truncated "
            "or of another format: re-export or re-download it."
        ) from None
    _check_parsed(model, str(path))
    check_external_data(model, path.parent)
    if lazy is None:
        lazy = external_bytes(model) > LAZY_THRESHOLD
    if lazy and external_bytes(model) > 0:
        _run_checker(str(path), str(path))
        _set_base(model, path.parent.resolve())
        return model
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise FwlrError(f"{path}: its external data could not be read ({_first_line(exc)}).") from None
    _run_checker(model, str(path))
    return model


def _check_parsed(model: onnx.ModelProto, label: str) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise FwlrError(
            f"{label}: is empty or not an ONNX model (no IR version, graph or opset); pass a .onnx model file."
        )


def _run_checker(model: onnx.ModelProto | str, label: str) -> None:
    """Check in memory, or by path (the C++ checker reads the file itself; nothing is materialised here)."""
    if isinstance(model, onnx.ModelProto) and message_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        model = _structure(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise FwlrError(
            f"{label}: fails the ONNX checker ({_first_line(exc)}); the file may be truncated or malformed: "
            "re-export it."
        ) from None


def _structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the bytes of its large tensors, for the checker (never copied: structure_copy)."""
    copy, _ = structure_copy(model)
    for tensor in external_data_helper._get_all_tensors(copy):
        tensor.ClearField("raw_data")
    return copy


# --- lazily loaded models: weights stay in their .data files ------------------------------------------


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the model keeps in external files."""
    total = 0
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            total += info.length or tensor_nbytes(tensor)
    return total


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _set_base(model: onnx.ModelProto, base: Path) -> None:
    _drop_base(model)
    model.metadata_props.add(key=BASE_DIR_KEY, value=str(base))


def _drop_base(model: onnx.ModelProto) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != BASE_DIR_KEY]
    del model.metadata_props[:]
    for key, value in keep:
        model.metadata_props.add(key=key, value=value)


def external_base(model: onnx.ModelProto) -> Path | None:
    """The folder of a lazily loaded model's external data; None when its weights are all in memory."""
    for prop in model.metadata_props:
        if prop.key == BASE_DIR_KEY:
            return Path(prop.value)
    return None


def external_span(model: onnx.ModelProto, tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    base = external_base(model)
    if base is None:
        raise FwlrError(f"tensor '{tensor.name}' refers to external data but the model was not loaded from a "
                        "path; load it with onnx_fwlr.load_model(path).")
    info = external_data_helper.ExternalDataInfo(tensor)
    return base / info.location, int(info.offset or 0), int(info.length or tensor_nbytes(tensor))


def tensor_array(model: onnx.ModelProto, tensor: onnx.TensorProto, copy: bool = True) -> np.ndarray:
    """The tensor's values. A lazily loaded tensor is memory-mapped at its offset (a read-only view when
    copy=False, so only the pages used are read)."""
    if not external_data_helper.uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = external_span(model, tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    if length == 0 or 0 in shape:
        return np.zeros(shape, dtype=dtype)
    values = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return np.array(values) if copy else values


def iter_tensor_bytes(model: onnx.ModelProto, tensor: onnx.TensorProto, chunk: int = 1 << 24):
    """The tensor's raw little-endian bytes in chunks: hashing or copying a huge tensor without holding it."""
    if not external_data_helper.uses_external_data(tensor):
        yield np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()
        return
    path, offset, length = external_span(model, tensor)
    with open(path, "rb") as source:
        source.seek(offset)
        while length > 0:
            block = source.read(min(chunk, length))
            if not block:
                raise FwlrError(f"external data file {path} ended early while reading '{tensor.name}'.")
            length -= len(block)
            yield block


@contextlib.contextmanager
def structure_file(model: onnx.ModelProto, max_ir_version: int | None = None):
    """The path of a temporary copy of a lazily loaded model's structure, written beside its external data
    (readers such as ORT and the C++ checker find external data only relative to a model file, and protobuf
    cannot serialise more than 2 GB). max_ir_version: lower the copy's IR version to it. Use the path inside.

    The copy never holds the bytes of the large tensors (structure_copy, as save_model writes): lazily loaded
    ones keep pointing at their own files, and those held in memory (a compression's factors, 1 KiB or more)
    are written one at a time to a temporary data file beside it, removed with it. Copying the model whole and
    serialising the copy held those tensors' bytes twice more while a session was made (docs/llm.md)."""
    base = external_base(model)
    if base is None:
        raise RuntimeError("structure_file needs a lazily loaded model (one with external data on disk).")
    try:
        handle, name = tempfile.mkstemp(prefix=".fwlr-session-", suffix=".onnx", dir=base)
    except OSError as exc:
        raise FwlrError(f"could not write a temporary model file in {base} ({_first_line(exc)}); ONNX Runtime "
                        "reads external data only beside a model file: make that folder writable.") from None
    data_name = name + ".data"
    try:
        os.close(handle)
        structure = _write_external(model, Path(data_name), os.path.basename(data_name), lazy=False)
        if max_ir_version is not None:
            structure.ir_version = min(structure.ir_version, max_ir_version)
        Path(name).write_bytes(structure.SerializeToString())
        del structure
        yield name
    finally:
        for path in (name, data_name):
            with contextlib.suppress(OSError):
                os.unlink(path)


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that leave the model's folder, or files too short for their tensors."""
    base = base_dir.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        if location.is_absolute() or ".." in location.parts:
            raise FwlrError(
                f"tensor '{tensor.name}' points its external data at '{info.location}', outside the model's "
                "folder; refusing to read it (move the data file beside the model and use a relative location)."
            )
        data_path = (base / location).resolve()
        if base not in data_path.parents:
            raise FwlrError(f"tensor '{tensor.name}' points its external data outside the model's folder; refusing.")
        if not data_path.is_file():
            raise FwlrError(
                f"tensor '{tensor.name}' needs external data file '{info.location}', which is missing; "
                "copy it beside the model."
            )
        end = (info.offset or 0) + (info.length or 0)
        if info.length and data_path.stat().st_size < end:
            raise FwlrError(
                f"external data file '{info.location}' is shorter than tensor '{tensor.name}' needs "
                "(truncated download?); copy the complete file."
            )


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike] = (), force: bool = False) -> Path:
    """Validate an output path before any work is done, so a mistake costs nothing."""
    out = Path(output)
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and out.resolve() == Path(source).resolve():
            raise FwlrError(f"output {out} is the input model; choose another output path (-o).")
    if out.exists() and not force:
        raise FwlrError(f"{out} already exists; pass `force` to overwrite it.")
    if out.exists() and out.is_dir():
        raise FwlrError(f"{out} is a folder; give a file path for the output model.")
    if not out.parent.exists():
        raise FwlrError(f"folder {out.parent} does not exist; create it first or choose another output path.")
    return out


def check_paths_apart(outputs: list[tuple[str, str | None, str]], inputs: list[tuple[str, str | None, str]],
                      force: bool = False) -> None:
    """Before any work: no output path may be, or alias (a link to), an input or another output, whatever
    `force` says; an existing output file needs `force`; every output's folder must exist and take a file.

    outputs and inputs are (label, path, kind): label the flag ("--json") or what the input is ("the input
    model"); kind "model" (an input's external .data files count as inputs too; an output model may write
    `<path>.data` beside it), "file", "folder" or "data" (an input that is a file or a folder of files;
    'random' is no path). A path None or '-' (stdout) is skipped; a list of paths is several inputs.
    """
    taken = [(flag, path) for flag, value, kind in inputs for path in _input_paths(value, kind)]
    for flag, value, kind in outputs:
        if value is None or value == "-":
            continue
        out = Path(value)
        for written in [out] + ([out.with_name(out.name + ".data")] if kind == "model" else []):
            for source_flag, source in taken:
                if _same_path(written, source):
                    what = "is" if written == out else f"would write {written.name}, which is"
                    raise FwlrError(f"{flag} {value} {what} {source_flag} ({source}); no output may replace an "
                                    f"input or another output, even with --force: choose another path for {flag}.")
        taken.append((f"the {flag} output", out))
        _check_target(flag, out, kind, force)


def _input_paths(value, kind: str) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _input_paths(v, kind)]
    if kind == "data" and str(value) == "random":
        return []
    path = Path(value)
    paths = [path]
    if kind == "model" and path.is_file():
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - not a readable model: loading it later says so in one sentence
            return paths
        paths += [path.parent / external_data_helper.ExternalDataInfo(t).location
                  for t in external_data_helper._get_all_tensors(model)
                  if external_data_helper.uses_external_data(t)]
    return paths


def _same_path(a: Path, b: Path) -> bool:
    """The same file or folder: equal once resolved (symbolic links followed), or one inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_target(flag: str, out: Path, kind: str, force: bool) -> None:
    if kind == "folder":
        if out.exists() and not out.is_dir():
            raise FwlrError(f"{flag} {out} is a file; give a folder.")
        _check_writable(flag, out if out.is_dir() else out.parent)
        return
    if out.is_dir():
        raise FwlrError(f"{flag} {out} is a folder; give a file path.")
    if out.exists() and not force:
        raise FwlrError(f"{flag} {out} already exists; pass --force to overwrite it, or choose another path.")
    _check_writable(flag, out.parent)


def _check_writable(flag: str, folder: Path) -> None:
    """The folder exists and a file can be created in it (tried, not guessed from permission bits)."""
    if not folder.is_dir():
        raise FwlrError(f"{flag}: folder {folder} does not exist; create it first or choose another path.")
    try:
        handle, name = tempfile.mkstemp(prefix=".fwlr-write-check-", dir=folder)
    except OSError as exc:
        raise FwlrError(f"{flag}: folder {folder} cannot be written ({_first_line(exc)}); choose another "
                        "path.") from None
    os.close(handle)
    os.unlink(name)


def save_model(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write atomically: everything goes to a temporary folder beside the output, then is moved into place.

    external_data None = automatic (when the model is too large for one protobuf message, or was loaded
    lazily). The data file is `<output name>.data` (relative location), written fresh, tensor by tensor: from
    each tensor's bytes in the model, or streamed in chunks from a lazily loaded tensor's source file; the .onnx
    is a copy of the structure that never held those bytes (structure_copy). So saving costs at most one
    tensor's bytes beyond the model (copying the model first cost 2-3 times its tensors: the 1.1 B decoder's
    save peaked at 9 GB; docs/llm.md, "Saving").
    """
    out = Path(output)
    lazy = external_base(model) is not None
    if external_data is None:
        external_data = lazy or message_bytes(model) > EXTERNAL_DATA_THRESHOLD
    from onnx_fwlr.io.runtime import runtime_compatible  # here: io.runtime builds on this module

    runtime_compatible(model)  # written files load in the installed onnxruntime
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_model = tmp_dir / out.name
        data_name = out.name + ".data"
        if external_data:
            structure = _write_external(model, tmp_dir / data_name, data_name)
            onnx.save_model(structure, str(tmp_model))
            data_out = out.parent / data_name
            if data_out.exists():
                data_out.unlink()  # never leave a stale file for a reader to append to or mistake
            os.replace(tmp_dir / data_name, data_out)
        elif lazy:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)  # a lazily loaded model's structure: its weights are read in below
            _drop_base(to_save)
            for tensor in external_data_helper._get_all_tensors(to_save):
                if external_data_helper.uses_external_data(tensor):
                    tensor.raw_data = b"".join(iter_tensor_bytes(model, tensor))
                    del tensor.external_data[:]
                    tensor.data_location = onnx.TensorProto.DEFAULT
            onnx.save_model(to_save, str(tmp_model))
        else:  # written whole: serialised as it is, not copied first
            tmp_model.write_bytes(model.SerializeToString())
        os.replace(tmp_model, out)
    except OSError as exc:
        raise FwlrError(
            f"could not write {out} ({_first_line(exc)}); check the folder's free space and rights."
        ) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if external_data and message_bytes(model) > EXTERNAL_DATA_THRESHOLD // 4:
        _run_checker(str(out), str(out))  # large models are checked on the path, where the C++ checker reads it
    return out


def message_bytes(model: onnx.ModelProto) -> int:
    """The model's serialised size (what model.ByteSize() says), also above protobuf's 2 GB limit, without
    serialising it: the structure without its large tensors' bytes is measured and their encoded size added.
    (ByteSize serialises the whole message, into a buffer up to twice its size: a 1 GB model's call peaked 2 GB
    above it; above 2 GB it raised EncodeError.)"""
    copy, extra = structure_copy(model)
    try:
        return copy.ByteSize() + extra
    except EncodeError:  # over 2 GB without the large tensors: only small or sparse tensors, very many of them
        return 1 << 31


# --- a model's structure without its tensor bytes -------------------------------------------------------
# Field by field, so the bytes of the tensors save_model moves to its data file are never copied (protobuf keeps a
# copied message's bytes in its arena until the whole copy is freed, even after ClearField). The tensors
# stripped are exactly those external_layout places; unknown fields are carried, so the copy serialises as
# CopyFrom's would.


def raw_data_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes in the tensor's raw_data, from its shape and type (reading raw_data copies it); sub-byte and string
    types are measured."""
    if tensor.data_type not in _WHOLE_BYTE_TYPES:
        return len(tensor.raw_data)
    return tensor_nbytes(tensor)


# Types whose raw_data holds exactly one numpy item per element (tensor_nbytes is exact for them).
_WHOLE_BYTE_TYPES = frozenset((
    onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
    onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128, onnx.TensorProto.BFLOAT16))


def _moved(tensor: onnx.TensorProto, size_threshold: int) -> int | None:
    """The raw bytes save_model moves out of this tensor (None: it stays as it is)."""
    if external_data_helper.uses_external_data(tensor) or not tensor.HasField("raw_data"):
        return None
    length = raw_data_bytes(tensor)
    return length if length >= size_threshold else None


def structure_copy(model: onnx.ModelProto, size_threshold: int = 1024) -> tuple[onnx.ModelProto, int]:
    """A copy of the model without the raw bytes of the tensors save_model moves to its data file (the
    external_layout ones held in memory), and how many more bytes the model serialises to than the copy."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip=("graph", "functions"))
    extra = 0
    if model.HasField("graph"):
        copy.graph.SetInParent()
        extra += _nested(copy.graph, _copy_graph(model.graph, copy.graph, True, size_threshold))
    for function in model.functions:
        target = copy.functions.add()
        _copy_fields(function, target, skip=("node",))
        inner = sum(_nested_node(node, target.node.add(), False, size_threshold) for node in function.node)
        extra += _nested(target, inner)
    return copy, extra


def _copy_graph(graph: onnx.GraphProto, target: onnx.GraphProto, initializers: bool, size_threshold: int) -> int:
    """Copy a graph; initializers: strip its (and its subgraphs') initializers too, as _get_all_tensors reaches
    them from the main graph only."""
    _copy_fields(graph, target, skip=("initializer", "node"))
    extra = 0
    for tensor in graph.initializer:
        copied = target.initializer.add()
        extra += _nested(copied, _copy_tensor(tensor, copied, size_threshold if initializers else None))
    for node in graph.node:
        extra += _nested_node(node, target.node.add(), initializers, size_threshold)
    return extra


def _nested_node(node: onnx.NodeProto, target: onnx.NodeProto, initializers: bool, size_threshold: int) -> int:
    _copy_fields(node, target, skip=("attribute",))
    extra = 0
    for attribute in node.attribute:
        copied = target.attribute.add()
        extra += _nested(copied, _copy_attribute(attribute, copied, initializers, size_threshold))
    return _nested(target, extra)


def _copy_attribute(attribute: onnx.AttributeProto, target: onnx.AttributeProto, initializers: bool,
                    size_threshold: int) -> int:
    _copy_fields(attribute, target, skip=("t", "tensors", "g", "graphs"))
    extra = 0
    if attribute.HasField("t"):
        target.t.SetInParent()
        extra += _nested(target.t, _copy_tensor(attribute.t, target.t, size_threshold))
    for tensor in attribute.tensors:
        copied = target.tensors.add()
        extra += _nested(copied, _copy_tensor(tensor, copied, size_threshold))
    if attribute.HasField("g"):
        target.g.SetInParent()
        if attribute.type == onnx.AttributeProto.GRAPH:
            extra += _nested(target.g, _copy_graph(attribute.g, target.g, initializers, size_threshold))
        else:
            target.g.CopyFrom(attribute.g)
    for graph in attribute.graphs:
        copied = target.graphs.add()
        if attribute.type == onnx.AttributeProto.GRAPHS:
            extra += _nested(copied, _copy_graph(graph, copied, initializers, size_threshold))
        else:
            copied.CopyFrom(graph)
    return extra


def _copy_tensor(tensor: onnx.TensorProto, target: onnx.TensorProto, size_threshold: int | None) -> int:
    """Copy a tensor; without its raw bytes when save_model moves them (size_threshold None: never). Returns
    the bytes left out: raw_data's field tag, length and bytes."""
    length = None if size_threshold is None else _moved(tensor, size_threshold)
    if length is None:
        target.CopyFrom(tensor)
        return 0
    _copy_fields(tensor, target, skip=("raw_data",))
    return 1 + _varint_bytes(length) + length


def _nested(target, extra: int) -> int:
    """What a message `extra` bytes short of its original adds to its parent's shortfall: those bytes, and the
    longer length prefix it is written with."""
    if not extra:
        return 0
    size = target.ByteSize()
    return extra + _varint_bytes(size + extra) - _varint_bytes(size)


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _copy_fields(source, target, skip: tuple[str, ...]) -> None:
    """Copy every field set in `source` but those named in `skip`, and its unknown fields."""
    for field in source.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        if field.is_repeated:
            values = getattr(source, field.name)
            if len(values):
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.message_type is not None:
                getattr(target, field.name).SetInParent()  # set, even when empty, as CopyFrom sets it
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))
    unknown = UnknownFieldSet(source)
    if len(unknown):
        target.MergeFromString(_encode_unknown(unknown))


def _encode_unknown(fields) -> bytes:
    """Unknown fields as protobuf wrote them (tag, then varint / fixed / length-prefixed / group data)."""
    out = bytearray()
    for field in fields:
        out += _varint((field.field_number << 3) | field.wire_type)
        if field.wire_type == 0:
            out += _varint(field.data)
        elif field.wire_type == 1:
            out += int(field.data).to_bytes(8, "little")
        elif field.wire_type == 2:
            out += _varint(len(field.data)) + bytes(field.data)
        elif field.wire_type == 3:
            out += _encode_unknown(field.data) + _varint((field.field_number << 3) | 4)
        elif field.wire_type == 5:
            out += int(field.data).to_bytes(4, "little")
    return bytes(out)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def external_layout(model: onnx.ModelProto, size_threshold: int = 1024):
    """(tensor, offset, length) of every tensor save_model moves into the data file, in file order: each lazily
    loaded tensor and each of size_threshold bytes or more; those of 1 MiB or more start at an ALIGNMENT
    boundary. One rule for writing the file (_write_external) and for predicting its size (byte budgets).
    Lengths come from shapes and types (raw_data_bytes): no tensor's bytes are read."""
    for _, tensor, offset, length in _layout(model, size_threshold):
        yield tensor, offset, length


def _layout(model: onnx.ModelProto, size_threshold: int, lazy: bool = True):
    """external_layout with each tensor's position among external_data_helper._get_all_tensors(model); `lazy`
    False: the tensors held in memory only (lazily loaded ones stay where they are)."""
    offset = 0
    for position, tensor in enumerate(external_data_helper._get_all_tensors(model)):
        external = external_data_helper.uses_external_data(tensor)
        if external and not lazy:
            continue
        length = tensor_nbytes(tensor) if external else _moved(tensor, size_threshold)
        if length is None:
            continue
        if length >= 1 << 20:
            offset += -offset % ALIGNMENT
        yield position, tensor, offset, length
        offset += length


def _write_external(model: onnx.ModelProto, data_path: Path, location: str, size_threshold: int = 1024,
                    lazy: bool = True) -> onnx.ModelProto:
    """Write every moved tensor of `model` (external_layout) into one fresh data file, one tensor at a time, and
    return the structure to save beside it: a copy that never held those bytes, its tensors pointing at them.
    `lazy` False: only the tensors held in memory; lazily loaded ones keep pointing at their own files (a
    structure file beside them, for ONNX Runtime)."""
    structure, _ = structure_copy(model, size_threshold)
    _drop_base(structure)
    targets = list(external_data_helper._get_all_tensors(structure))
    with open(data_path, "wb") as data:  # "wb" truncates: onnx.save would append to an existing file
        for position, tensor, offset, length in _layout(model, size_threshold, lazy):
            data.write(b"\0" * (offset - data.tell()))
            if external_data_helper.uses_external_data(tensor):
                for block in iter_tensor_bytes(model, tensor):
                    data.write(block)
            else:
                raw = tensor.raw_data  # one tensor's bytes at a time
                if len(raw) != length:
                    raise FwlrError(f"tensor '{tensor.name}' holds {len(raw):,} bytes of raw data; its shape and "
                                    f"type need {length:,}: the model is malformed.")
                data.write(raw)
                del raw
            target = targets[position]
            del target.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                target.external_data.add(key=key, value=value)
            target.data_location = onnx.TensorProto.EXTERNAL
    return structure


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a model file plus its external data files."""
    path = Path(path)
    size = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        external_data_helper.ExternalDataInfo(t).location
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    }
    return size + sum((path.parent / loc).stat().st_size for loc in sorted(locations))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
