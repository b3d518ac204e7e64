"""What every graph edit needs: fresh deterministic names, and dropping the tensors a rewrite replaced."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx

from onnx_fwlr.io.onnx_utils import walk_graphs


def names_in(graphs: Iterable[onnx.GraphProto]) -> set[str]:
    """Every tensor, value-info and node name the graphs use (the empty name included)."""
    names: set[str] = set()
    for graph in graphs:
        names.update(t.name for t in graph.initializer)
        names.update(v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info))
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
    return names


class Namer:
    """Fresh, deterministic names: the wanted one, or it with the first free numeric suffix (`w`, `w_1`, ...).
    One namer per rewrite, made before the first edit, so names it hands out never meet the model's."""

    def __init__(self, taken: set[str]):
        self.taken = taken

    @classmethod
    def of_model(cls, model: onnx.ModelProto) -> Namer:
        return cls(names_in(walk_graphs(model)))

    def __call__(self, wanted: str) -> str:
        name, i = wanted, 1
        while name in self.taken:
            name, i = f"{wanted}_{i}", i + 1
        self.taken.add(name)
        return name

    def free_prefix(self, wanted: str, names_of: Callable[[str], list[str]]) -> str:
        """`wanted`, or it with the first free numeric suffix, such that no name `names_of(prefix)` yields is
        taken; reserves them all (for builders that derive many names from one prefix)."""
        candidate, i = wanted, 1
        while True:
            names = names_of(candidate)
            if not any(n in self.taken for n in names):
                self.taken.update(names)
                return candidate
            candidate, i = f"{wanted}_{i}", i + 1


def remove_tensors(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop replaced weights and their stale graph-input and value-info entries (old IR lists weights as inputs)."""
    if not names:
        return
    for field in (graph.initializer, graph.input, graph.value_info):
        # deleted in place, from the back: rebuilding the field would copy every weight (protobuf's extend copies)
        for index in reversed([i for i, entry in enumerate(field) if entry.name in names]):
            del field[index]
