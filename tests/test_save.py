"""save_model without a second copy of the tensor bytes (issue 25: the 1.1 B decoder's save peaked 9 GB): the
structure copy that never held them, the serialised size measured without serialising, and the same files as the
old path (copy the model, then move each tensor's bytes to the data file)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io import model as modelio

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(25)


def _array(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _model_with_tensors_everywhere() -> onnx.ModelProto:
    """Initializers big and small (fp32, fp16, int64), a Constant, an If whose branches hold a Constant and an
    initializer, a function's Constant, a sparse initializer, metadata and unknown fields."""
    initializers = [numpy_helper.from_array(_array(300, 500), "big"), numpy_helper.from_array(_array(3), "small"),
                    numpy_helper.from_array(_array(16, 16), "exactly_1024"),
                    numpy_helper.from_array(_array(600, 600, dtype=np.float16), "half"),
                    numpy_helper.from_array(np.arange(300, dtype=np.int64), "int64")]
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(_array(64, 64), "branch_value"))],
        "branch", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(_array(2000), "branch_init")])
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(_array(40, 40), "constant")),
             helper.make_node("If", ["cond"], ["o"], then_branch=branch, else_branch=branch),
             helper.make_node("MatMul", ["x", "big"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 300]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 500])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    model.metadata_props.add(key="source", value="test")
    model.functions.append(helper.make_function(
        "local", "fn", ["x"], ["y"],
        [helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(_array(50, 50), "function_value"))],
        [helper.make_opsetid("", 17)]))
    sparse = onnx.SparseTensorProto(dims=[2000])
    sparse.values.CopyFrom(numpy_helper.from_array(_array(1000), "sparse_values"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.arange(0, 2000, 2, dtype=np.int64), "sparse_indices"))
    model.graph.sparse_initializer.append(sparse)
    model.MergeFromString(bytes([0x98, 0x06, 5]))  # field 99 (varint 5): unknown to onnx
    model.graph.initializer[0].MergeFromString(bytes([0xA2, 0x06, 3]) + b"abc")  # field 100 (3 bytes)
    return model


@pytest.mark.parametrize("size_threshold", [0, 1024, 5000])
def test_the_structure_copy_measures_the_model_without_its_bytes(size_threshold):
    model = _model_with_tensors_everywhere()
    copy, extra = modelio.structure_copy(model, size_threshold)
    assert copy.ByteSize() + extra == model.ByteSize()
    assert modelio.message_bytes(model) == model.ByteSize()
    moved = {t.name for t, _, _ in modelio.external_layout(model, size_threshold)}
    for tensor in external_data_helper._get_all_tensors(copy):
        assert tensor.HasField("raw_data") == (tensor.name not in moved), tensor.name
    assert ("big" in moved) == (size_threshold <= 600_000) and ("small" in moved) == (size_threshold <= 12)
    assert {"sparse_values", "sparse_indices"}.isdisjoint(moved)  # onnx's external data leaves them inline
    empty = helper.make_model(helper.make_graph([], "g", [], []))
    assert modelio.message_bytes(empty) == empty.ByteSize()


def _save_by_copying(model: onnx.ModelProto, path: Path) -> None:
    """save_model's external-data path until issue 25: copy the model, move each tensor's bytes out of the copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    modelio._drop_base(copy)
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as data:
        offset = 0
        for tensor in external_data_helper._get_all_tensors(copy):
            lazy = external_data_helper.uses_external_data(tensor)
            if not lazy and (not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024):
                continue
            length = modelio.tensor_nbytes(tensor) if lazy else len(tensor.raw_data)
            if length >= 1 << 20:
                offset += -offset % modelio.ALIGNMENT
            data.write(b"\0" * (offset - data.tell()))
            if lazy:
                for block in modelio.iter_tensor_bytes(model, tensor):
                    data.write(block)
            else:
                data.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = TensorProto.EXTERNAL
            offset += length
    onnx.save_model(copy, str(path))


def _save_both_ways(model: onnx.ModelProto, folder: Path) -> tuple[Path, Path]:
    """The model saved by save_model and by copying, as m.onnx (+ m.onnx.data) in two folders."""
    (folder / "new").mkdir()
    (folder / "old").mkdir()
    modelio.save_model(model, folder / "new" / "m.onnx", external_data=True)
    _save_by_copying(model, folder / "old" / "m.onnx")
    return folder / "new" / "m.onnx", folder / "old" / "m.onnx"


def _same_files(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes() and Path(f"{a}.data").read_bytes() == Path(f"{b}.data").read_bytes()


def test_saving_with_external_data_writes_the_files_copying_the_model_wrote(tmp_path):
    model = _model_with_tensors_everywhere()
    before = model.SerializeToString()
    assert _same_files(*_save_both_ways(model, tmp_path))
    assert model.SerializeToString() == before  # the caller's model keeps its bytes
    whole = modelio.save_model(model, tmp_path / "whole.onnx", external_data=False)
    assert whole.read_bytes() == before


def test_a_lazily_loaded_model_with_tensors_added_in_memory_writes_the_same_files(tmp_path):
    """The large-model case of a compress run: weights left on disk (lazily loaded), factors in memory (1 MiB and
    more: aligned), a small tensor kept inline."""
    source = tmp_path / "src" / "m.onnx"
    source.parent.mkdir()
    weights = [numpy_helper.from_array(_array(512, 600), "w0"), numpy_helper.from_array(_array(600, 8), "w1")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], weights)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
                    size_threshold=0)
    lazy = modelio.load_model(source, lazy=True)
    lazy.graph.initializer.extend([numpy_helper.from_array(_array(700, 400), "factor_a"),
                                   numpy_helper.from_array(_array(3, 400), "factor_b"),
                                   numpy_helper.from_array(_array(5), "shift")])
    new, old = _save_both_ways(lazy, tmp_path)
    assert _same_files(new, old)
    written = onnx.load(str(new))
    assert not any(p.key == modelio.BASE_DIR_KEY for p in written.metadata_props)
    np.testing.assert_array_equal(numpy_helper.to_array(written.graph.initializer[2]),
                                  numpy_helper.to_array(lazy.graph.initializer[2]))


def test_raw_data_that_does_not_fit_its_shape_is_refused_and_nothing_is_written(tmp_path):
    tensor = numpy_helper.from_array(_array(300), "w")
    tensor.raw_data = tensor.raw_data[:-4]
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(FwlrError, match="1,196 bytes of raw data; its shape and type need 1,200"):
        modelio.save_model(model, tmp_path / "bad.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnx_fwlr.io import model as modelio
    import onnx_fwlr.io.runtime  # imported by save_model: loaded before measuring

    def status(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) << 10 for line in handle if line.startswith(key + ":"))

    count, size = int(sys.argv[2]), int(sys.argv[3])
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for i in range(count):  # one tensor at a time: building the model peaks one tensor above it
        model.graph.initializer.append(numpy_helper.from_array(np.full(size // 4, i, np.float32), f"w{i}"))
    resident = status("VmRSS")
    modelio.save_model(model, sys.argv[1], external_data=True)
    saved = status("VmHWM")
    measured = modelio.message_bytes(model)
    print(json.dumps({"resident": resident, "saved_peak": saved, "measured_peak": status("VmHWM"),
                      "bytes": measured, "serialised": model.ByteSize()}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_saving_holds_no_second_copy_of_the_tensor_bytes(tmp_path):
    """256 MiB of initializers in memory, 8 MiB each: saving them with external data and measuring the model
    peak less than a quarter of them above the resident model (copying it first cost 2-3 times their bytes)."""
    count, size = 32, 8 << 20
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big.onnx"), str(count), str(size)],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    measured = json.loads(result.stdout)
    tensors = count * size
    assert measured["resident"] > tensors  # the model really holds its bytes
    assert measured["saved_peak"] - measured["resident"] < tensors / 4
    assert measured["measured_peak"] - measured["resident"] < tensors / 4
    assert measured["bytes"] == measured["serialised"]
    assert Path(f"{tmp_path / 'big.onnx'}.data").stat().st_size == tensors
