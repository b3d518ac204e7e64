"""The one place that opens ONNX Runtime sessions.

Every stage runs models in ONNX Runtime (calibration, gradients, refine, validation, profiling); they differ in
session options, never in how a model reaches ORT. Here: the IR version is lowered to what the installed
onnxruntime reads (new onnx writes IR versions ORT does not know yet), a lazily loaded model is handed over as
a file beside its external data, and a failure can become one plain sentence.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Sequence

import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import external_base, structure_file

CPU = ("CPUExecutionProvider",)


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
            ort.InferenceSession(probe.SerializeToString(), providers=list(CPU))
            return ir_version
        except Exception:  # noqa: BLE001 - any refusal means "too new"
            continue
    return 7


def runtime_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version in place when the installed onnxruntime could not load it."""
    model.ir_version = min(model.ir_version, max_runtime_ir_version())
    return model


def runtime_model_bytes(model: onnx.ModelProto) -> bytes:
    """The serialised model with the IR version lowered to what ORT reads; the lowering is in the bytes only:
    the caller's model is lowered during serialisation and restored after (no copy: a large model is not held
    twice), and left untouched when ORT reads its IR version."""
    ir_version = model.ir_version
    model.ir_version = min(ir_version, max_runtime_ir_version())
    try:
        return model.SerializeToString()
    except ValueError as error:
        raise FwlrError(f"the model is too large to hand to ONNX Runtime from memory ({error}); save it with "
                        "external data and pass its path.") from None
    finally:
        model.ir_version = ir_version


@contextlib.contextmanager
def runtime_source(model: onnx.ModelProto):
    """What to give onnxruntime.InferenceSession for a ModelProto: its bytes (runtime_model_bytes), or for a
    lazily loaded model the path of a temporary copy of its structure beside its external data (ORT reads
    external data only relative to a model file). Create the session inside the `with`."""
    if external_base(model) is None:
        yield runtime_model_bytes(model)
        return
    with structure_file(model, max_ir_version=max_runtime_ir_version()) as path:
        yield path


def session_options(*, threads: int | None = None, spinning: bool = True, quiet: bool = True, optimize: bool = True,
                    profile_prefix: str | None = None, external_data_dir: str | os.PathLike | None = None,
                    arena: bool = True, shapes_first: bool = False):
    """ONNX Runtime session options from the choices callers make.

    threads: intra-op threads (None or 0: ORT's default). spinning=False stops idle ORT threads from spinning,
    for callers that run numpy between ORT calls. quiet: ORT logs nothing (its errors come back as exceptions);
    quiet=False: its default logger's level (silence_onnxruntime). optimize=False disables graph optimisation
    (shapes of the graph as written). profile_prefix: write ORT's per-op profile there.
    external_data_dir: where external data lives when the model is given as bytes. arena=False: ORT frees each
    run's buffers instead of keeping them in its memory arena, which only grows when the input shapes vary from
    run to run (batches cut to their length; 186 MB less in refine on all-MiniLM-L6-v2).
    shapes_first: ORT's priority-based node order, which runs a Shape node as soon as its input exists. In its
    default order the Shape nodes appended at the end of a graph (autodiff.backward exposes the shapes the
    backward pass reads that way) run last, so each tensor they read stays alive until the run ends: on
    SmolLM2's Fisher pass 192 MiB per sample of 128 tokens (docs/llm.md). Same numbers: only the order changes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if quiet:  # ORT's failures come back as exceptions, which callers turn into sentences; its log lines never
        options.log_severity_level = 4
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not arena:
        options.enable_cpu_mem_arena = False
    if shapes_first:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads is not None:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if external_data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(external_data_dir))
    return options


def silence_onnxruntime() -> None:
    """Keep ONNX Runtime's own log lines (its default logger, used by sessions that ONNX Runtime's quantizers
    and tools make themselves) out of the terminal: the command line reports failures as one sentence."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)


def make_session(model: onnx.ModelProto | str | os.PathLike, options=None, providers: Sequence[str] = CPU,
                 role: str | None = None):
    """An InferenceSession for a ModelProto or a model file path, whatever its IR version.

    options: from session_options() (None: its defaults). role (e.g. "original model"): name the model in the
    FwlrError a load failure becomes; None lets ORT's own exception through.
    """
    import onnxruntime as ort

    if options is None:
        options = session_options()
    try:
        if isinstance(model, onnx.ModelProto):
            with runtime_source(model) as source:
                return _without_model_bytes(ort.InferenceSession(source, options, providers=list(providers)))
        path = os.fspath(model)
        try:
            return ort.InferenceSession(path, options, providers=list(providers))
        except Exception as error:  # retried only for a too-new IR version
            if "Unsupported model IR version" not in str(error):
                raise
        return ort.InferenceSession(runtime_model_bytes(onnx.load(path)), options, providers=list(providers))
    except FwlrError:
        raise
    except Exception as error:  # ORT raises many types; the user needs one sentence
        if role is None:
            raise
        raise FwlrError(f"ONNX Runtime cannot load the {role}: {error_text(error)}; check that it is a valid "
                        "ONNX model.") from None


def _without_model_bytes(session):
    """The session, without the serialised model onnxruntime's Python wrapper keeps (as large as the model, for
    every session made from bytes; ORT's own source marks it "bad as we're holding the memory indefinitely").
    It serves only to re-create the session when another execution provider fails and ORT falls back, which a
    CPU-only session never does: only those let it go."""
    if list(session.get_providers()) == list(CPU) and getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session


def release_free_memory() -> None:
    """Hand the memory freed by ORT sessions and batch intermediates back to the operating system (glibc keeps
    freed heap pages otherwise: after the MiniLM Fisher pass about 190 MB that the next stages did not reuse);
    nothing elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# glibc serves blocks above this many bytes with their own mmap, handed back to the system when freed.
MMAP_THRESHOLD = 128 << 10
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_large_blocks_promptly() -> None:
    """Keep glibc's mmap threshold fixed at MMAP_THRESHOLD for the rest of the process. Left dynamic, glibc raises
    it to the largest block freed so far (up to 32 MB), after which a pass's per-sample arrays (forward values,
    cotangents: tens of MB each) come from the heap and stay resident after they are freed: measured on
    SmolLM2's Fisher pass, 123 MiB more peak (docs/llm.md). Nothing elsewhere than glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


def error_text(error: BaseException) -> str:
    """ORT's exception as one line, without its error-code prefix, C++ source location and boilerplate."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(error))
    text = re.sub(r"^\S+\.(cc|h):\d+ .*?\) ", "", text)  # ORT's source location and C++ signature
    text = text.replace("Please fix either the inputs/outputs or the model.", "")
    return " ".join(text.split()).rstrip(" .") or type(error).__name__
