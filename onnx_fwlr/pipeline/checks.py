"""How a RunConfig's option groups combine, checked once before any work (RunConfig.__post_init__)."""

from __future__ import annotations

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.registry import METHODS
from onnx_fwlr.pipeline.budget import Budget
from onnx_fwlr.pipeline.defaults import default_method, one_shot
from onnx_fwlr.pipeline.quantized import check_budget, check_options
from onnx_fwlr.pipeline.speed import check_speed_options


def check_config(config) -> None:
    """One sentence for the first problem: data the run would read more than once, then the budget, then (with
    `quantize`) the options that do not combine with it and the quantizer's own options."""
    data, refine = config.data, config.refine
    calibration = data.calibration
    if refine.steps is not None and (calibration is None or isinstance(calibration, str) and calibration == "random"):
        raise FwlrError("`refine_steps` trains on the calibration data; pass `calibration` (.npz or a folder of .npz).")
    if one_shot(calibration) and (config.method.sequential or refine.steps is not None):
        step = "`sequential` reads it once per depth" if config.method.sequential else \
            "`refine_steps` reads it once per epoch"
        raise FwlrError(f"`calibration` is a generator or reader that can be read only once, but {step}; pass a "
                        "list of feed dicts, a .npz path or a folder of them.")
    if config.quantize.mode is None:
        check_low_rank(config)
        check_without_quantize(config)
        return
    check_quantize_combination(config)
    quantize, method = config.quantize, quantize_method(config)
    check_options(quantize.mode, quantize.block_size, method, quantize.embeddings, quantize.int8,
                  quantize.factor_dtype, 8, 0)
    budget = config.budget
    check_budget(quantize.mode, method, budget.target_size, budget.ratio, budget.rank or 0, budget.target_latency)


def check_low_rank(config) -> None:
    """The budget, then the speed options and `forms` against the method the run will use."""
    options = config.budget
    budget = Budget(options.ratio, options.rank, options.target_size, options.max_error, dict(options.ranks),
                    target_latency=options.target_latency)
    budget.check()
    methods = config.structured.methods
    structured = config.structured.asked or (not methods and config.method.method == "kron")
    method = methods[0] if methods else config.method.method
    if method is None:
        method = default_method(config.data.calibration, config.data.stats, structured)
    if method in METHODS:  # an unknown one is named by pipeline.compress.check_method
        check_speed_options(budget, config.speed.rank_multiple, method, structured)
    if config.structured.forms != "default" and not structured:
        raise FwlrError("`forms` measured chooses the ONNX form of structured sites; add `method` kron or `dope` "
                        "(plain low rank: `rank_multiple` auto).")


def quantize_method(config) -> str:
    """The weighting of `quantize`'s corrections: the caller's, or the default every run derives
    (pipeline.defaults.default_method: kfac with calibration data or gradient statistics, whiten with
    activation statistics, svd without data)."""
    return config.method.method or default_method(config.data.calibration, config.data.stats)


def check_quantize_combination(config) -> None:
    """The options of plain low rank that `quantize` has no use for (its byte budget allocates per site)."""
    structured, budget = config.structured, config.budget
    if config.method.executor is not None:
        raise FwlrError("`executor`, `ray_address` and `shards` spread low-rank compression; drop them with "
                        "`quantize`.")
    unsupported = {"`methods`": structured.methods, "`dope`": structured.dope, "`kron_shape`": structured.kron_shape,
                   "`dope_share`": structured.dope_share, "`forms` measured": structured.forms == "measured",
                   "`sequential`": config.method.sequential, "`max_error`": budget.max_error,
                   "`refine_steps`": config.refine.steps, "`keep_attention`": config.sites.keep_attention,
                   "`ranks`": budget.ranks, "`allocation` global": config.method.allocation == "global",
                   "`rank_multiple`": config.speed.rank_multiple}
    given = [name for name, value in unsupported.items() if value]
    if given:
        raise FwlrError(f"`quantize` does not combine with {given[0]}; drop it (the byte budget allocates per site).")


def check_without_quantize(config) -> None:
    """The quantizer's own options, given without `quantize`: said, not silently ignored."""
    quantize = config.quantize
    given = [name for name, value in (("`accuracy_level`", quantize.accuracy_level is not None),
                                      ("`merge_corrections`", quantize.merge_corrections)) if value]
    if given:
        raise FwlrError(f"{given[0]} applies to quantized sites; add `quantize` int4|int8|auto or drop it.")
