"""Reading and writing ONNX models safely: untrusted input, atomic output, loadable IR version."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import FwlrError

# Above this serialized size protobuf cannot hold the model in one message; keep weights outside.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A checked, independent copy of the model, with external data loaded into it."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_parsed(model, "the given ModelProto")
        _run_checker(model, "the given ModelProto")
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


def _run_checker(model: onnx.ModelProto, label: str) -> None:
    try:
        onnx.checker.check_model(model if model.ByteSize() < EXTERNAL_DATA_THRESHOLD else _structure(model))
    except onnx.checker.ValidationError as exc:
        raise FwlrError(
            f"{label}: fails the ONNX checker ({_first_line(exc)}); the file may be truncated or malformed: "
            "re-export it."
        ) from None


def _structure(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in external_data_helper._get_all_tensors(copy):
        tensor.ClearField("raw_data")
    return copy


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


@functools.lru_cache(maxsize=1)
def max_runtime_ir_version() -> int:
    """Highest IR version the installed onnxruntime loads (probed once with a tiny model)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for ir_version in range(onnx.IR_VERSION, 6, -1):
        probe.ir_version = ir_version
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir_version
        except Exception:  # noqa: BLE001 - any refusal means "too new"
            continue
    return 7


def runtime_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version in place when the installed onnxruntime could not load it."""
    model.ir_version = min(model.ir_version, max_runtime_ir_version())
    return model


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike] = (), force: bool = False) -> Path:
    """Validate an output path before any work is done, so a mistake costs nothing."""
    out = Path(output)
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and out.resolve() == Path(source).resolve():
            raise FwlrError(f"output {out} is the input model; choose another output path (-o).")
    if out.exists() and not force:
        raise FwlrError(f"{out} already exists; pass --force (force=True) to overwrite it.")
    if out.exists() and out.is_dir():
        raise FwlrError(f"{out} is a folder; give a file path for the output model.")
    if not out.parent.exists():
        raise FwlrError(f"folder {out.parent} does not exist; create it first or choose another output path.")
    return out


def save_model(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write atomically: everything goes to a temporary folder beside the output, then is moved into place.

    external_data None = automatic (only when the model is too large for one protobuf message).
    The data file is `<output name>.data`, written fresh (onnx appends to an existing one).
    """
    out = Path(output)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    runtime_compatible(model)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_model = tmp_dir / out.name
        data_name = out.name + ".data"
        if external_data:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(
                to_save, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
            os.replace(tmp_dir / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
    except OSError as exc:
        raise FwlrError(f"could not write {out} ({_first_line(exc)}); check the folder's free space and rights.") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


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
