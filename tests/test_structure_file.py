"""ONNX Runtime sessions of a lazily loaded model with tensors in memory (a compression's factors) go through
io.model.structure_file: the structure beside the external data, the in-memory tensors in a temporary data file
of their own, never a copy of the model with its tensors (it held their bytes twice more while the session was
made). Same outputs as the old whole copy, nothing left in the folder, the memory bound asserted on sizes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.io import model as modelio
from onnx_fwlr.io import runtime

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(26)


def lazy_model_with_factors(folder: Path) -> onnx.ModelProto:
    """y = x @ W (W on disk, loaded lazily) + (x @ A) @ B + shift (B, A, shift in memory: A, above 1 MiB, starts
    at an alignment boundary in a data file, shift stays inline)."""
    folder.mkdir()
    W = numpy_helper.from_array(RNG.standard_normal((64, 48)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])], [W])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    lazy = modelio.load_model(folder / "m.onnx", lazy=True)
    lazy.graph.initializer.extend([
        numpy_helper.from_array(RNG.standard_normal((4200, 48)).astype(np.float32) / 100, "B"),  # 0.77 MiB
        numpy_helper.from_array(RNG.standard_normal((64, 4200)).astype(np.float32), "A"),  # 1.03 MiB: aligned
        numpy_helper.from_array(RNG.standard_normal(48).astype(np.float32), "shift"),  # 192 bytes: stays inline
    ])
    nodes = [helper.make_node("MatMul", ["x", "A"], ["xa"]), helper.make_node("MatMul", ["xa", "B"], ["corr"]),
             helper.make_node("Add", ["y", "corr"], ["y2"]), helper.make_node("Add", ["y2", "shift"], ["out"])]
    lazy.graph.node.extend(nodes)
    del lazy.graph.output[:]
    lazy.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 48]))
    return lazy


def old_structure_session(model: onnx.ModelProto):
    """The old path: the model copied whole (tensors included) and serialised beside its external data."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    modelio._drop_base(copy)
    path = modelio.external_base(model) / "old_whole_copy.onnx"
    path.write_bytes(copy.SerializeToString())
    try:
        return runtime.make_session(str(path))
    finally:
        path.unlink()


def test_sessions_give_the_same_outputs_as_the_whole_copy(tmp_path):
    model = lazy_model_with_factors(tmp_path / "src")
    x = {"x": RNG.standard_normal((5, 64)).astype(np.float32)}
    got = runtime.make_session(model).run(None, x)[0]
    want = old_structure_session(model).run(None, x)[0]
    np.testing.assert_array_equal(got, want)
    assert sorted(os.listdir(tmp_path / "src")) == ["m.onnx", "m.onnx.data"]  # nothing left beside the data


def test_the_structure_file_holds_no_tensor_bytes_and_goes_with_its_data(tmp_path):
    model = lazy_model_with_factors(tmp_path / "src")
    in_memory = sum(len(t.raw_data) for t in model.graph.initializer)
    with modelio.structure_file(model, max_ir_version=9) as path:
        written = onnx.load(path, load_external_data=False)
        data = Path(path + ".data")
        assert Path(path).stat().st_size < 4096 < in_memory  # the structure only
        assert written.ir_version == 9 and not any(p.key == modelio.BASE_DIR_KEY for p in written.metadata_props)
        where = {t.name: {e.key: e.value for e in t.external_data} for t in written.graph.initializer}
        assert where["W"]["location"] == "m.onnx.data"  # the lazily loaded weight stays in its own file
        assert where["B"] == {"location": data.name, "offset": "0", "length": str(4200 * 48 * 4)}
        offset = int(where["A"]["offset"])
        assert where["A"]["location"] == data.name and offset % modelio.ALIGNMENT == 0 and offset >= 4200 * 48 * 4
        assert where["shift"] == {} and len(written.graph.initializer[-1].raw_data) == 48 * 4  # small: inline
        onnx.checker.check_model(path)
        assert data.stat().st_size == offset + 64 * 4200 * 4
    assert sorted(os.listdir(tmp_path / "src")) == ["m.onnx", "m.onnx.data"]
    with pytest.raises(RuntimeError, match="inside"):
        with modelio.structure_file(model):
            raise RuntimeError("an error inside the with")
    assert sorted(os.listdir(tmp_path / "src")) == ["m.onnx", "m.onnx.data"]
    assert sum(len(t.raw_data) for t in model.graph.initializer) == in_memory  # the model itself is unchanged


CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx_fwlr.io import model as modelio

    def status(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) << 10 for line in handle if line.startswith(key + ":"))

    folder, count, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
                              [numpy_helper.from_array(np.ones(16, np.float32), "w")])
    onnx.save_model(helper.make_model(graph), str(folder / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    model = modelio.load_model(folder / "m.onnx", lazy=True)
    for i in range(count):  # one tensor at a time: building the model peaks one tensor above it
        model.graph.initializer.append(numpy_helper.from_array(np.full(size // 4, i, np.float32), f"f{i}"))
    resident = status("VmRSS")
    with modelio.structure_file(model) as path:
        written = Path(path).stat().st_size
    print(json.dumps({"resident": resident, "peak": status("VmHWM"), "written": written}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_a_structure_file_holds_no_second_copy_of_the_tensors(tmp_path):
    """256 MiB of tensors in memory beside a lazily loaded model: its structure file peaks less than a quarter
    of them above the resident model (the whole copy and its serialised bytes cost twice them)."""
    count, size = 32, 8 << 20
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(count), str(size)],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    measured = json.loads(result.stdout)
    tensors = count * size
    assert measured["resident"] > tensors  # the model really holds its bytes
    assert measured["peak"] - measured["resident"] < tensors / 4
    assert measured["written"] < 64 << 10
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
