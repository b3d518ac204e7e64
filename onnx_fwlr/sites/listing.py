"""`onnx-fwlr inspect`: what can be factorised, what cannot, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from onnx_fwlr.io.model import load_model
from onnx_fwlr.evaluate.report import format_table
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.sites.find import Site, Skipped, model_parameters, validate_regex


@dataclass
class Listing:
    sites: list[Site]
    skipped: list[Skipped]
    model_params: int

    def to_dict(self) -> dict:
        return {
            "model_params": self.model_params,
            "sites": [
                {"name": s.name, "weight": s.weight, "op_type": s.uses[0].op_type, "K": s.K, "N": s.N,
                 "params": s.params, "dtype": s.dtype, "nodes": [u.node_name for u in s.uses]}
                for s in self.sites
            ],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def format(self) -> str:
        rows = [
            [s.name, s.uses[0].op_type, s.weight, f"{s.K}x{s.N}", f"{s.params:,}",
             f"{100 * s.params / max(self.model_params, 1):.1f}%", s.dtype + (f" ({len(s.uses)} uses)" if len(s.uses) > 1 else "")]
            for s in self.sites
        ]
        total = sum(s.params for s in self.sites)
        lines = [
            format_table(["site", "op", "weight", "K x N", "params", "of model", "dtype"], rows, align="lllrrrl"),
            f"{len(self.sites)} factorisable site(s) holding {total:,} of {self.model_params:,} parameters "
            f"({100 * total / max(self.model_params, 1):.1f}%)",
        ]
        if self.skipped:
            skipped_rows = [[s.node, s.op_type, s.weight or "", s.reason] for s in self.skipped]
            lines += ["", "not factorised:", format_table(["node", "op", "weight", "reason"], skipped_rows)]
        return "\n".join(lines)


def inspect_model(model, include: str | None = None, exclude: str | None = None) -> Listing:
    validate_regex(include, "--include")
    validate_regex(exclude, "--exclude")
    model = load_model(model)
    sites, skipped = find_all_sites(model, include, exclude, fisher=False)
    return Listing(sites, skipped, model_parameters(model))
