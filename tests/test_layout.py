"""The shape docs/architecture.md draws, checked on the source: the maths imports no ONNX, the graph layer no
statistics, every import follows the layers, nothing below the CLI prints or exits, and each registry has its
tests."""

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


# ------------------------------------------------------------------------------------------ the layers
# What each package may import (besides itself, `errors` and `tables`), over every import in every module,
# function-level ones included. Bottom to top: io, methods | autodiff | sites | evaluate (fidelity) | stats |
# rewrite | quant (its graph edits use rewrite's Gemm tail) | refine | cost (latency, forms, profiling, limits,
# FLOPs) | pipeline | workflows | cli.
LEAVES = {"errors", "tables", "version"}
ALLOWED = {
    "io": set(),
    "methods": set(),
    "autodiff": {"io"},
    "sites": {"autodiff", "io"},
    "evaluate": {"autodiff", "io", "sites"},
    "stats": {"autodiff", "evaluate", "io", "sites"},
    "quant": {"autodiff", "io", "methods", "rewrite", "sites", "stats"},
    "rewrite": {"io", "methods", "sites"},
    "refine": {"autodiff", "evaluate", "io", "methods", "rewrite", "sites", "stats"},
    "cost": {"io", "methods", "quant", "rewrite", "sites"},
    "pipeline": {"autodiff", "cost", "evaluate", "io", "methods", "quant", "refine", "rewrite", "sites", "stats",
                 "version"},
    "workflows": {"cost", "evaluate", "io", "methods", "pipeline", "quant", "refine", "rewrite", "sites", "stats"},
    "cli": {"cost", "evaluate", "io", "methods", "pipeline", "quant", "refine", "sites", "stats", "version",
            "workflows"},
    "(top)": {"cli", "io", "pipeline", "version"},
    "api": {"cli", "io", "pipeline", "workflows"},  # onnx_fwlr/api.py: the public names scripts import
}


def _package(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else "(top)"


def _targets(path: Path) -> list[tuple[int, str]]:
    """(line, package) of every onnx_fwlr import in the module, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "onnx_fwlr":
                found.append((node.lineno, parts[1] if len(parts) > 1 else "(top)"))
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_follows_the_layers(path):
    own = _package(path)
    if own in LEAVES or path.stem in LEAVES and own == "(top)":
        allowed = set()
    else:
        allowed = ALLOWED[path.stem if own == "(top)" and path.stem in ALLOWED else own]
    bad = [f"{path.name}:{line} imports onnx_fwlr.{target}" for line, target in _targets(path)
           if target not in allowed | LEAVES | {own}]
    assert not bad, bad


def test_the_layers_have_no_cycles():
    """The matrix itself is a partial order (a package never reaches itself through others)."""
    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in ALLOWED.get(start, ()))

    assert [p for p in ALLOWED if reaches(p, p)] == []


def test_every_package_is_in_the_matrix():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED) - {"(top)", "api"}


# Short names kept where the module's own name is a parameter of the functions that use it.
ALIASES = {("pipeline/speed.py", "lat"), ("pipeline/quantized_speed.py", "lat"), ("pipeline/speed.py", "alloc"),
           ("pipeline/budget.py", "alloc"), ("pipeline/build.py", "alloc")}


def test_no_module_is_imported_under_another_name():
    """`from onnx_fwlr.x import module as other`: a reader looks for `other` and finds nothing."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("onnx_fwlr"):
                folder = PACKAGE.parent.joinpath(*node.module.split("."))
                for alias in node.names:
                    is_module = (folder / f"{alias.name}.py").exists() or (folder / alias.name).is_dir()
                    where = (str(path.relative_to(PACKAGE)), alias.asname)
                    if is_module and alias.asname not in (None, alias.name) and where not in ALIASES:
                        bad.append(f"{where[0]}:{node.lineno} {node.module}.{alias.name} as {alias.asname}")
    assert not bad, bad


def test_no_module_imports_another_packages_private_names():
    """`from onnx_fwlr.other.module import _name`: a helper other packages need is public (sites.find's
    constant_tensors, node_attribute, ...); a package's own modules may share private names."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("onnx_fwlr."):
                target = node.module.split(".")[1]
                bad += [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__") and target != own]
    assert not bad, bad


TOOLS = PACKAGE.parent / "tools"
# Tools that still add a folder to sys.path, and why: the tests' model builders they share (not a package), and
# the export scripts' own torch virtual environments, which do not have onnx_fwlr installed.
TOOLS_EDITING_SYS_PATH = {"synthetic_transformer.py", "bench_shipped.py", "export_decoder.py", "export_minilm.py",
                          "export_smollm2.py"}
# Tools that wrap the pipeline's stages to measure each one (memory per stage): they need its modules by name.
TOOLS_WRAPPING_STAGES = {"trace_llm_memory.py"}


@pytest.mark.parametrize("path", sorted(TOOLS.glob("*.py")), ids=lambda p: p.name)
def test_tools_use_the_public_api(path):
    """`python tools/x.py` runs with the package installed, no sys.path edits; the pipeline's, workflows' and
    CLI's modules are reached through `onnx_fwlr` or `onnx_fwlr.api` only (components a benchmark times, e.g.
    methods or cost, it may import)."""
    tree = ast.parse(path.read_text())
    edits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
             and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    internal = [f"{n.lineno}: {n.module}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                and n.module.split(".")[:2] in (["onnx_fwlr", "pipeline"], ["onnx_fwlr", "workflows"],
                                                ["onnx_fwlr", "cli"])]
    if path.name not in TOOLS_EDITING_SYS_PATH:
        assert not edits, f"{path.name} edits sys.path at lines {edits}"
    # hash_matrix also runs older checkouts (no api.cli_main)
    if path.name not in TOOLS_WRAPPING_STAGES | {"hash_matrix.py"}:
        assert not internal, f"{path.name} imports {internal}; import from onnx_fwlr.api"


def test_docstrings_cite_no_document_the_repository_lacks():
    bad = [f"{p.relative_to(PACKAGE)}" for p in sorted(PACKAGE.rglob("*.py")) if "DESIGN" in p.read_text()]
    assert not bad, bad


# ------------------------------------------------------------------------------------------ the registries
def test_method_registry_is_what_every_caller_offers():
    from onnx_fwlr.cli.main import build_parser
    from onnx_fwlr.methods.registry import METHODS

    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    choices = next(a.choices for a in compress._actions if a.dest == "method")
    assert list(choices) == list(METHODS)
    from onnx_fwlr.methods.registry import ACTIVATIONS, GRADIENTS

    for name, method in METHODS.items():  # every entry says which statistics it reads
        assert set(method.needs) <= {ACTIVATIONS, GRADIENTS}, name


def test_every_vjp_rule_is_exercised_by_a_test():
    """Finite differences in tests/test_vjp*.py for most; the decoder ops (RMSNormalization, Sin, Cos, Trilu)
    through test_decoder's gradient checks, the scatters through structured training."""
    from onnx_fwlr.autodiff.vjp import RULES

    tests = "".join(p.read_text() for p in (PACKAGE.parent / "tests").glob("test_*.py"))
    untested = [op for op in RULES if f'"{op}"' not in tests]
    assert not untested, f"ops without a test: {untested}"


def test_every_quantized_format_has_a_round_trip_test():
    """Each format file under quant/formats/ is registered, and every op it recognises has a test."""
    from onnx_fwlr.quant.formats import FORMATS

    files = {p.stem for p in (PACKAGE / "quant" / "formats").glob("*.py")} - {"__init__", "common"}
    modules = {f.matchers[next(iter(f.matchers))].__module__.rsplit(".", 1)[1] for f in FORMATS.values()}
    assert modules == files, "every file under quant/formats/ (but common.py) is one FORMAT listed in FORMATS"
    tests = (PACKAGE.parent / "tests" / "test_dequantize.py").read_text()
    untested = [op for f in FORMATS.values() for _, op in f.matchers if op not in tests]
    assert not untested, f"quantized formats without a test in tests/test_dequantize.py: {untested}"
