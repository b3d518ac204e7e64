"""The shape DESIGN §6 asks for, checked on the source: the maths imports no ONNX, the graph layer no
statistics, and nothing below the CLI prints or exits."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "onnx_fwlr"
MATHS = ["methods/*.py", "autodiff/vjp*.py", "autodiff/recurrent_vjp.py", "autodiff/losses.py", "quant/compensate.py",
         "quant/budget.py"]
MATHS_MAY_IMPORT = ("numpy", "scipy", "onnx_fwlr.errors", "onnx_fwlr.methods", "onnx_fwlr.autodiff.vjp",
                    "onnx_fwlr.autodiff.vjp_base", "onnx_fwlr.autodiff.vjp_shape", "onnx_fwlr.autodiff.recurrent_vjp",
                    "onnx_fwlr.autodiff.losses")
GRAPH_LAYER = ["io/*.py", "sites/*.py", "rewrite/*.py"]


def _files(patterns):
    return sorted({p for pattern in patterns for p in PACKAGE.glob(pattern) if p.name != "__init__.py"})


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _third_party_or_package(name: str) -> bool:
    return name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"


@pytest.mark.parametrize("path", _files(MATHS), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_maths_imports_numpy_and_scipy_only(path):
    bad = [n for n in _imports(path) if _third_party_or_package(n)
           and not any(n == allowed or n.startswith(allowed + ".") for allowed in MATHS_MAY_IMPORT)]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files(GRAPH_LAYER), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_graph_layer_knows_no_statistics(path):
    # pure maths (e.g. which LSTM attributes the gradient rule supports) is fine; statistics and stages are not
    later_stages = ("onnx_fwlr.stats", "onnx_fwlr.autodiff.backward", "onnx_fwlr.pipeline", "onnx_fwlr.evaluate",
                    "onnx_fwlr.refine", "onnx_fwlr.cli")
    bad = [n for n in _imports(path) if n.startswith(later_stages)]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", [p for p in _files(["*/*.py", "*.py"]) if p.parent.name != "cli"
                                  and p.name != "__main__.py"], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_the_cli_prints_or_exits(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            assert name != "print", f"{path.name}:{node.lineno} prints; use logging.getLogger(__name__)"
            assert not (name == "exit" and owner in ("sys", "os")), f"{path.name}:{node.lineno} exits"
