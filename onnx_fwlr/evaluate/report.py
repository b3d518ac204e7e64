"""What a compression run did, as data (for --json) and as terminal tables."""

from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass, field

import onnx

from onnx_fwlr.io.onnx_utils import walk_graphs
from onnx_fwlr.sites.find import Skipped
from onnx_fwlr.tables import format_table

QUANTIZED_ALLOCATIONS = {"budget": "each site's storage chosen under the byte budget (least loss per byte)",
                         "latency": "each site's storage chosen for the latency target",
                         "uniform": "one storage for every site"}


@dataclass
class SiteResult:
    name: str
    weight: str
    op_type: str
    K: int
    N: int
    rank: int | None  # what `rank_of` says it counts; None = kept dense
    params_before: int
    params_after: int
    weighted_error: float | None = None  # dropped σ² in the method's weighted norm (a squared error)
    relative_error: float | None = None  # ‖P (W − W') Q‖_F / ‖P W Q‖_F: relative Frobenius error, not squared
    note: str = ""
    # --quantize: how the site is stored ("fp32", "low rank", "quantized", "quantized + correction") and its
    # bytes as float32 and as stored (its params_after counts stored numbers of every width alike)
    form: str = ""
    bytes_before: int | None = None
    bytes_after: int | None = None
    # what `rank` counts: LOW_RANK (the rank of a factor pair), KRONECKER_TERMS (the terms of a Kronecker sum),
    # CORRECTION (the rank of a quantized site's low-rank correction; 0: none); "" when the site is kept as it is
    rank_of: str = ""


LOW_RANK, KRONECKER_TERMS, CORRECTION = "low rank", "kronecker terms", "correction"  # SiteResult.rank_of


@dataclass
class Report:
    method: str
    allocation: str
    budget: dict
    sites: list[SiteResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    file_size_before: int | None = None
    file_size_after: int | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    validation: dict | None = None
    versions: dict = field(default_factory=dict)
    input_quantization: str = ""  # one line when the input was quantized (pipeline/quantized_input.py)
    tied: list[str] = field(default_factory=list)  # what happened to each LM head tied to its embedding table
    # Objects of the later stages, not fields (to_dict writes their own dicts): the refine.loop.RefineReport of
    # refine_steps, and the evaluate.validation.Validation of the final check on validation data.
    refined = None
    checked = None
    config = None  # the options of the run (pipeline.config.RunConfig.to_dict), written as the report's "config"
    rewritten = None  # --quantize of a float model: the quant.graph.Rewrite that made it (cli --also applies it)

    @property
    def site_params_before(self) -> int:
        return sum(s.params_before for s in self.sites)

    @property
    def site_params_after(self) -> int:
        return sum(s.params_after for s in self.sites)

    @property
    def factorised(self) -> int:
        return sum(1 for s in self.sites if s.rank is not None)

    @property
    def quantized(self) -> bool:
        """A --quantize report: sites are measured in bytes, not parameters."""
        return any(s.bytes_after is not None for s in self.sites)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skipped"] = [asdict(s) for s in self.skipped]
        data["site_params_before"] = self.site_params_before
        data["site_params_after"] = self.site_params_after
        if not data["tied"]:
            del data["tied"]  # reports of models without a tied head stay as they were
        if self.refined is not None:
            data["refine"] = self.refined.to_dict()
        if self.config is not None:
            data["config"] = self.config
        return data

    def format(self) -> str:
        """Per-site table, then the before/after summary (onnxslim style)."""
        parts = [self.format_sites()]
        notes = [f"  {s.name}: {s.note}" for s in self.sites if s.note]
        if notes:
            parts += ["notes:"] + notes
        parts += ["", self.format_summary()]
        if self.skipped:
            parts += ["", f"{len(self.skipped)} MatMul/Gemm node(s) not factorised; `onnx-fwlr inspect` lists why."]
        if self.calibration.get("set_aside_bytes"):
            size = self.calibration["set_aside_bytes"] / 2**30
            parts += [f"calibration ran one pass, set {size:.1f} GiB of site inputs and gradients aside on disk and "
                      f"folded them in {self.calibration['groups']} groups of sites whose statistics fit in "
                      "`stats_memory`"]
        if self.calibration.get("passes", 1) > 1:
            parts += [f"calibration read the data {self.calibration['passes']} times, once per group of site inputs "
                      "whose Grams fit in `stats_memory`"]
        if self.input_quantization:
            parts.append(self.input_quantization)
        parts += [f"tied: {line}" for line in self.tied]
        parts += [f"warning: {w}" for w in self.warnings]
        return "\n".join(parts)

    def format_sites(self) -> str:
        rows, unit = [], "bytes" if self.quantized else "params"
        for s in self.sites:
            before, after = (s.bytes_before, s.bytes_after) if self.quantized else (s.params_before, s.params_after)
            rows.append([
                s.name, f"{s.K}x{s.N}", "dense" if s.rank is None else str(s.rank),
                f"{before:,}", f"{after:,}",
                "" if s.relative_error is None else f"{s.relative_error:.3g}",
                "" if s.weighted_error is None else f"{s.weighted_error:.4g}",
            ])
        headers = ["site", "K x N", "rank", f"{unit} before", f"{unit} after", "rel. Frobenius error",
                   "weighted error²"]
        return format_table(headers, rows, align="lllrrrr")

    def format_summary(self) -> str:
        def ratio(a, b):
            return f"{b / a:.3f}" if a else ""

        if self.quantized:
            before, after = (sum(s.bytes_before or 0 for s in self.sites), sum(s.bytes_after or 0 for s in self.sites))
            first = ["weights (bytes)", f"{before:,}", f"{after:,}", ratio(before, after)]
        else:
            first = ["factorised weights (params)", f"{self.site_params_before:,}", f"{self.site_params_after:,}",
                     ratio(self.site_params_before, self.site_params_after)]
        rows = [
            first,
            ["model parameters", f"{self.model_params_before:,}", f"{self.model_params_after:,}",
             ratio(self.model_params_before, self.model_params_after)],
        ]
        if self.file_size_before is not None and self.file_size_after is not None:
            rows.append(["file size (bytes)", f"{self.file_size_before:,}", f"{self.file_size_after:,}",
                         ratio(self.file_size_before, self.file_size_after)])
        for op in sorted(set(self.ops_before) | set(self.ops_after)):
            before, after = self.ops_before.get(op, 0), self.ops_after.get(op, 0)
            if before != after or op in ("MatMul", "Gemm"):
                rows.append([f"{op} nodes", str(before), str(after), ""])
        title = self._quantized_title() if self.quantized else (
            f"method {self.method}, allocation {self.allocation}, {self.factorised}/{len(self.sites)} sites factorised"
        )
        return title + "\n" + format_table(["", "before", "after", "ratio"], rows, align="lrrr")

    def _quantized_title(self) -> str:
        forms = collections.Counter(s.form or "fp32" for s in self.sites)
        kept = forms.pop("fp32", 0)
        counts = ", ".join(f"{n} {form}" for form, n in sorted(forms.items()))
        return (f"method {self.method}, {QUANTIZED_ALLOCATIONS.get(self.allocation, self.allocation)}; "
                f"{len(self.sites) - kept}/{len(self.sites)} sites changed" + (f" ({counts})" if counts else ""))


def relative_frobenius(dropped_energy: float, total_energy: float) -> float:
    """SiteResult.relative_error from squared errors: √(dropped / total), the ‖ΔW‖/‖W‖ users expect."""
    return math.sqrt(max(dropped_energy, 0.0) / total_energy) if total_energy > 0 else 0.0


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type over the main graph and every subgraph."""
    counts = collections.Counter(node.op_type for graph in walk_graphs(model) for node in graph.node)
    return dict(sorted(counts.items()))
