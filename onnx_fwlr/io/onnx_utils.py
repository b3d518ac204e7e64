"""Small facts about ONNX graphs that every stage needs: the default domain's opset, float types, subgraphs."""

from __future__ import annotations

import onnx

# The names ONNX gives its own operator domain.
DEFAULT_DOMAINS = ("", "ai.onnx")

# Floating-point tensor element types, with the numpy dtype name each becomes.
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}

# The same types as ONNX Runtime spells them in a session's input/output metadata ("tensor(float)", ...).
ORT_FLOAT_TYPES = tuple(f"tensor({onnx.TensorProto.DataType.Name(t).lower()})" for t in FLOAT_TYPES)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset for ONNX's own operators; 0 when it imports none (then it has no such operators)."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)


def walk_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """Main graph first, then every subgraph depth-first, in node and attribute order."""
    graphs: list[onnx.GraphProto] = []

    def visit(graph: onnx.GraphProto) -> None:
        graphs.append(graph)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)

    visit(model.graph)
    return graphs
