"""What one compress run is asked to do, as typed option groups (one per group of `onnx-fwlr compress --help`).

    config = RunConfig(model="model.onnx", data=DataOptions(calibration="calib.npz"), budget=BudgetOptions(ratio=0.5))
    model, report = run(config)                       # pipeline.run
    config.to_dict() / RunConfig.from_dict(...)       # the JSON of --save-config / --config

Each group is frozen and checks its own values once, when it is made; RunConfig checks how groups combine.
Objects that cannot be written as JSON (a latency model with a fake timer, a form timer, data given as feed
dicts) are passed to `run` beside the config, or given as data to DataOptions (then the config is not saved).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from numbers import Integral, Real

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.pipeline.checks import check_config
from onnx_fwlr.pipeline.distributed import Executor, ray_module
from onnx_fwlr.pipeline.quantized import ACCURACY_MODES

QUANTIZE_MODES = ("int4", "int8", "auto")
CURRENCIES = ("parameters", "bytes", "milliseconds", "output error")


def _check_number(name: str, value, kind) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        wanted = "a whole number" if kind is Integral else "a number"
        raise FwlrError(f"`{name}` must be {wanted}, not the {type(value).__name__} {value!r}.")


@dataclass(frozen=True)
class DataOptions:
    """Calibration (or precomputed statistics), validation data, and how they are read."""

    calibration: object = None  # .npz path, folder, "random", list of feed dicts or a reader
    stats: object = None  # a Statistics object or a stats file from `onnx-fwlr calibrate`
    validation: object = None
    batch_size: int = 32
    mask_input: str | None = None
    shapes: dict | None = None
    stats_memory: int | None = None

    def __post_init__(self):
        _check_number("batch_size", self.batch_size, Integral)
        for name, source in (("calibration", self.calibration), ("validation", self.validation)):
            if isinstance(source, dict):
                raise FwlrError(f"`{name}` takes a list of feed dicts (or a .npz path), not a single dict; wrap it "
                                "in a list.")


@dataclass(frozen=True)
class FisherOptions:
    """The loss whose gradients weight the sites (stats.fisher)."""

    loss: str | None = None
    output: str | None = None
    samples: int = 1
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def fisher_group(options: dict | FisherOptions | None) -> FisherOptions:
    """The `fisher_options` dict of the keyword API as its group; an unknown key is named."""
    if options is None or isinstance(options, FisherOptions):
        return options or FisherOptions()
    known = {f.name for f in dataclasses.fields(FisherOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FwlrError(f"`fisher_options` has no option '{unknown[0]}'; known: {', '.join(sorted(known))}.")
    return FisherOptions(**options)


@dataclass(frozen=True)
class SiteOptions:
    """Which constant MatMul/Gemm weights are candidates."""

    include: str | None = None
    exclude: str | None = None
    keep_attention: bool = False


@dataclass(frozen=True)
class BudgetOptions:
    """How much to keep, in one currency (RunConfig.currency): parameters (`ratio`, `rank`, `ranks`,
    `target_size` without quantization), bytes (`ratio`/`target_size` with `quantize`), milliseconds
    (`target_latency`) or output error (`max_error`)."""

    ratio: float | None = None
    rank: int | None = None
    ranks: dict = field(default_factory=dict)
    target_size: int | None = None
    max_error: float | None = None
    target_latency: float | None = None


@dataclass(frozen=True)
class MethodOptions:
    """The weighting and rank allocation of plain low-rank sites (None: the best the data allows)."""

    method: str | None = None
    allocation: str | None = None
    bias_correction: bool | None = None
    sequential: bool = False
    svd: str = "auto"
    workers: int = 1
    executor: Executor | None = None  # calibration shards and decompositions on a Ray cluster (pipeline.distributed)

    def __post_init__(self):
        _check_number("workers", self.workers, Integral)
        if self.executor is not None:
            self.executor.check()
            if self.executor.kind == "ray":
                ray_module()  # a missing Ray is said first; the cluster is connected when the run starts


@dataclass(frozen=True)
class StructuredOptions:
    """Kronecker and doped structures (pipeline.structured)."""

    methods: tuple | None = None
    dope: float = 0.0
    dope_share: float | None = None
    kron_shape: tuple | str | None = None  # (m1, m2, n1, n2), or "balanced" (by error alone, no timing)
    forms: str = "default"

    def __post_init__(self):
        _check_number("dope", self.dope, Real)

    @property
    def asked(self) -> bool:
        """Whether anything here turns the run structured (so does MethodOptions.method "kron")."""
        return bool(self.methods and len(self.methods) > 1) or "kron" in (self.methods or ()) or bool(self.dope) \
            or self.kron_shape is not None or self.dope_share is not None


@dataclass(frozen=True)
class QuantizeOptions:
    """ONNX Runtime's quantizer plus a low-rank correction per site (pipeline.quantized); mode None: off."""

    mode: str | None = None
    block_size: int = 32
    embeddings: str = "auto"
    int8: str = "dynamic"
    factor_dtype: str = "float16"
    accuracy_level: int | str | None = None  # MatMulNBits' accuracy_level: 0, 4 or "auto" (None: auto when timed)
    merge_corrections: bool = False  # sites reading one activation share their correction's first factor

    def __post_init__(self):
        if self.mode is not None and self.mode not in QUANTIZE_MODES:
            raise FwlrError(f"unknown `quantize` '{self.mode}'; choose one of {', '.join(QUANTIZE_MODES)}.")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_MODES:
            raise FwlrError(f"unknown `accuracy_level` {self.accuracy_level!r}; choose 0 (float compute), 4 (int8 "
                            "activations) or auto (per site, measured here).")


@dataclass(frozen=True)
class RefineOptions:
    """Distillation of the factors against the original after the closed form (refine.loop)."""

    steps: int | None = None
    lr: float = 3e-5
    dope_dropout: float | None = None

    def __post_init__(self):
        _check_number("refine_steps", self.steps, Integral)
        _check_number("refine_lr", self.lr, Real)
        if self.steps is not None and self.steps < 1:  # in its own name, not by refine() at the end
            raise FwlrError(f"`refine_steps` {self.steps} is out of range; it must be a positive number of steps.")


@dataclass(frozen=True)
class SpeedOptions:
    """Ranks the kernels run fast at, and the latency model's timing (pipeline.speed)."""

    rank_multiple: int | str | None = None
    latency_threads: int | None = None
    latency_cache: str | None = None
    latency_check: bool = False  # a quantized input: time the output against it and say how they compare


@dataclass(frozen=True)
class CompareOptions:
    """What validation compares (evaluate.validation.compare_models)."""

    outputs: tuple | None = None
    common_prefix: bool = False
    batch_axes: dict | None = None  # output name -> its sample axis, when not 0 (compare_models)


GROUPS = {"data": DataOptions, "fisher": FisherOptions, "sites": SiteOptions, "budget": BudgetOptions,
          "method": MethodOptions, "structured": StructuredOptions, "quantize": QuantizeOptions,
          "refine": RefineOptions, "speed": SpeedOptions, "compare": CompareOptions}
TUPLE_FIELDS = {("structured", "methods"), ("structured", "kron_shape"), ("compare", "outputs")}


@dataclass(frozen=True)
class RunConfig:
    """One compress run: the model and every option group. Checked once, here, before any work."""

    model: object  # a path or an onnx.ModelProto
    data: DataOptions = field(default_factory=DataOptions)
    fisher: FisherOptions = field(default_factory=FisherOptions)
    sites: SiteOptions = field(default_factory=SiteOptions)
    budget: BudgetOptions = field(default_factory=BudgetOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    structured: StructuredOptions = field(default_factory=StructuredOptions)
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    refine: RefineOptions = field(default_factory=RefineOptions)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    compare: CompareOptions = field(default_factory=CompareOptions)
    progress: bool = True

    def __post_init__(self):
        check_config(self)

    @property
    def currency(self) -> str | None:
        """What the budget counts (CURRENCIES); None without a budget (every site at its fixed rank)."""
        budget = self.budget
        if budget.target_latency is not None:
            return "milliseconds"
        if budget.max_error is not None:
            return "output error"
        if self.quantize.mode is not None:
            return "bytes" if budget.ratio is not None or budget.target_size is not None else None
        if budget.target_size is not None:
            return "bytes"
        return "parameters" if budget.ratio is not None or budget.rank is not None or budget.ranks else None

    @property
    def timed(self) -> bool:
        """Whether the run measures speed here (a latency budget, or ranks rounded by measurement)."""
        return self.budget.target_latency is not None or self.speed.rank_multiple == "auto"

    def to_dict(self, strict: bool = True) -> dict:
        """The config as JSON values. Only a config whose model and data are paths (or "random") can be saved;
        `strict` False (the report's record) writes any other model or data as its type, e.g. "<list>"."""
        result = {"model": _path_value(self.model, "model", strict)}
        for name in GROUPS:
            group = dataclasses.asdict(getattr(self, name))
            for key, value in group.items():
                if isinstance(value, tuple):
                    group[key] = list(value)
            result[name] = group
        for key in ("calibration", "stats", "validation"):
            result["data"][key] = _path_value(getattr(self.data, key), key, strict)
        result["progress"] = self.progress
        result["currency"] = self.currency  # derived (what the budget counts): written for the reader, not read
        return result

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """The config a to_dict() wrote; an unknown group or option is named in one sentence."""
        unknown = sorted(set(values) - set(GROUPS) - {"model", "progress", "currency"})
        if unknown:
            raise FwlrError(f"the config names an unknown option group '{unknown[0]}'; known: "
                            f"{', '.join(['model', *GROUPS, 'progress'])}.")
        groups = {}
        for name, kind in GROUPS.items():
            given = dict(values.get(name) or {})
            known = {f.name for f in dataclasses.fields(kind)}
            extra = sorted(set(given) - known)
            if extra:
                raise FwlrError(f"the config's group '{name}' has no option '{extra[0]}'; known: "
                                f"{', '.join(sorted(known))}.")
            for key in list(given):
                if (name, key) in TUPLE_FIELDS and isinstance(given[key], list):
                    given[key] = tuple(given[key])
            if name == "method" and isinstance(given.get("executor"), dict):
                given["executor"] = Executor(**given["executor"])
            groups[name] = kind(**given)
        if "model" not in values:
            raise FwlrError("the config names no `model`.")
        return cls(model=values["model"], progress=values.get("progress", True), **groups)


def _path_value(value, name: str, strict: bool = True):
    """A path as a string, None as None; anything else cannot be written to a config file."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not strict:
        return f"<{type(value).__name__}>"
    raise FwlrError(f"`{name}` is a {type(value).__name__}, which a config file cannot hold; give a path.")
