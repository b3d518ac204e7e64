"""The public Python API for scripts (tools/, notebooks) beyond `onnx_fwlr.compress`: the one run with its typed
options, the low-rank stages a benchmark times one by one, and the helpers the benchmarks share. Scripts import
these names from here, never from `onnx_fwlr.pipeline`, `onnx_fwlr.workflows` or `onnx_fwlr.cli` (whose modules
may move; tests/test_layout.py checks tools/), so a refactoring of the layers keeps every script running.
"""

from onnx_fwlr.cli.main import main as cli_main  # `onnx-fwlr ARGS` in this process: cli_main([...]) -> exit code
from onnx_fwlr.cli.options import parse_size  # noqa: F401 - '20MB', '1.5GiB' -> bytes, as the flags read them
from onnx_fwlr.io.model import file_size, load_model, save_model
from onnx_fwlr.pipeline.compress import *  # noqa: F401,F403 - the stages of earlier releases' API
from onnx_fwlr.pipeline.compress import (  # noqa: F401
    Budget,
    Prepared,
    build,
    calibrate,
    choose_ranks,
    compress,
    ensure_decompositions,
    prepare,
    validate,
)
from onnx_fwlr.pipeline.config import (  # noqa: F401
    BudgetOptions,
    CompareOptions,
    DataOptions,
    FisherOptions,
    MethodOptions,
    QuantizeOptions,
    RefineOptions,
    RunConfig,
    SiteOptions,
    SpeedOptions,
    StructuredOptions,
)
from onnx_fwlr.pipeline.distributed import Executor  # noqa: F401
from onnx_fwlr.pipeline.quantized import build_quantized, fastest_latency, prepare_quantized  # noqa: F401
from onnx_fwlr.pipeline.quantized_input import dequantize_input  # noqa: F401
from onnx_fwlr.pipeline.run import Reuse, run  # noqa: F401
from onnx_fwlr.pipeline.sequential import correct_sequentially  # noqa: F401
from onnx_fwlr.pipeline.speed import latency_budget_ranks, round_for_speed  # noqa: F401
from onnx_fwlr.pipeline.transplant import apply_same_factors  # noqa: F401
from onnx_fwlr.workflows.frontier import fidelity  # noqa: F401

__all__ = ["Budget", "BudgetOptions", "CompareOptions", "DataOptions", "FisherOptions", "MethodOptions", "Prepared",
           "QuantizeOptions", "RefineOptions", "Reuse", "RunConfig", "SiteOptions", "SpeedOptions",
           "StructuredOptions", "apply_same_factors", "build", "build_quantized", "calibrate", "choose_ranks",
           "cli_main", "compress", "correct_sequentially", "dequantize_input", "ensure_decompositions",
           "fastest_latency", "fidelity", "file_size", "latency_budget_ranks", "load_model", "prepare",
           "prepare_quantized", "round_for_speed", "run", "save_model", "validate"]
__all__ += ["Executor", "parse_size"]  # where the work runs (pipeline.distributed); sizes as the CLI reads them
