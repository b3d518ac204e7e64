"""`onnx-fwlr inspect`: what can be factorised, what cannot, and why."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from onnx_fwlr.io.model import load_model
from onnx_fwlr.quant.dequantize import detect_quantized
from onnx_fwlr.sites.find import Site, Skipped, model_parameters, validate_regex
from onnx_fwlr.sites.left_alone import left_alone
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.tables import format_table


@dataclass
class Listing:
    sites: list[Site]
    skipped: list[Skipped]
    model_params: int
    quantized: list = field(default_factory=list)  # QuantizedSite: quantized weight uses and other quantized ops
    left_alone: list = field(default_factory=list)  # Skipped: weights no command factorises, with the reason

    def to_dict(self) -> dict:
        return {
            "model_params": self.model_params,
            "sites": [
                {"name": s.name, "weight": s.weight, "op_type": s.uses[0].op_type, "K": s.K, "N": s.N,
                 "params": s.params, "dtype": s.dtype, "nodes": [u.node_name for u in s.uses]}
                for s in self.sites
            ],
            "skipped": [asdict(s) for s in self.skipped],
            "left_alone": [asdict(s) for s in self.left_alone],
            "quantized": [
                {"node": q.node, "op_type": q.op_type, "weight": q.weight, "K": q.K, "N": q.N,
                 "float_op": q.consumer, "scheme": asdict(q.scheme) if q.scheme else None,
                 "dequantized_by_compress": q.scheme is not None, "reason": q.reason}
                for q in self.quantized
            ],
        }

    def format(self) -> str:
        rows = [
            [
                s.name,
                s.uses[0].op_type,
                s.weight,
                f"{s.K}x{s.N}",
                f"{s.params:,}",
                f"{100 * s.params / max(self.model_params, 1):.1f}%",
                s.dtype + (f" ({len(s.uses)} uses)" if len(s.uses) > 1 else ""),
            ]
            for s in self.sites
        ]
        total = sum(s.params for s in self.sites)
        lines = [
            format_table(["site", "op", "weight", "K x N", "params", "of model", "dtype"], rows, align="lllrrrl"),
            self._headline(total),
        ]
        lines += self._format_quantized()
        if self.skipped:
            skipped_rows = [[s.node, s.op_type, s.weight or "", s.reason] for s in self.skipped]
            lines += ["", "not factorised:", format_table(["node", "op", "weight", "reason"], skipped_rows)]
        if self.left_alone:
            rows = [[s.node, s.op_type, s.weight or "", s.reason] for s in self.left_alone]
            lines += ["", "weights left as they are:", format_table(["node", "op", "weight", "reason"], rows)]
        return "\n".join(lines)

    def _headline(self, total: int) -> str:
        """How many sites compress works on: the float ones above, plus each quantized weight it dequantizes
        (a weight read by several nodes counted once)."""
        float_part = (f"{len(self.sites)} factorisable site(s) holding {total:,} of {self.model_params:,} "
                      f"parameters ({100 * total / max(self.model_params, 1):.1f}%)")
        weights = {(q.graph_index, q.weight) for q in self.quantized if q.scheme is not None}
        quantized = f"{len(weights)} quantized weight(s) that compress dequantizes first (listed below)"
        if not weights:
            return float_part
        if not self.sites:
            return f"{len(weights)} factorisable site(s): {quantized}"
        return f"{len(self.sites) + len(weights)} factorisable site(s): {float_part}, and {quantized}"

    def _format_quantized(self) -> list[str]:
        """Quantized weight uses (what each is and that compress dequantizes it) and quantized ops left alone."""
        from onnx_fwlr.quant.requantize import cannot_requantize

        usable = [q for q in self.quantized if q.scheme is not None and cannot_requantize(q.scheme) is None]
        left = [q if q.scheme is None else dataclasses.replace(q, reason=f"kept as the input has it: "
                                                                        f"{cannot_requantize(q.scheme)}")
                for q in self.quantized if q not in usable]
        lines = []
        if usable:
            rows = [[q.node, q.op_type, q.weight, f"{q.K}x{q.N}", q.scheme.describe(), q.consumer] for q in usable]
            lines += [
                "",
                f"the model is quantized: {len(usable)} quantized weight(s); compress dequantizes each "
                "(float64), compresses it and quantizes it again with the same scheme:",
                format_table(["node", "op", "weight", "K x N", "scheme", "float op"], rows, align="lllrll"),
            ]
        if left:
            lines += [
                "",
                "quantized nodes left as they are:",
                format_table(["node", "op", "reason"], [[q.node, q.op_type, q.reason] for q in left]),
            ]
        return lines


def inspect_model(model, include: str | None = None, exclude: str | None = None) -> Listing:
    validate_regex(include, "`include`")
    validate_regex(exclude, "`exclude`")
    model = load_model(model)
    sites, skipped = find_all_sites(model, include, exclude, fisher=False)
    quantized = detect_quantized(model)
    listed = {s.weight for s in sites} | {s.weight for s in skipped if s.weight}
    return Listing(sites, skipped, model_parameters(model), quantized, left_alone(model, listed, quantized))
