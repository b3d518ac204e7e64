"""onnx_fwlr.io.runtime (the one way sessions are made) and onnx_fwlr.io.onnx_utils (shared ONNX facts)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import load_model
from onnx_fwlr.io.onnx_utils import (
    FLOAT_TYPES,
    ORT_FLOAT_TYPES,
    default_opset,
    walk_graphs,
)
from onnx_fwlr.io.runtime import (
    error_text,
    make_session,
    max_runtime_ir_version,
    session_options,
)

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def matmul_model(ir_version=8):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


def test_too_new_ir_version_is_lowered_for_protos_and_paths(tmp_path):
    model = matmul_model(ir_version=max_runtime_ir_version() + 5)
    (y,) = make_session(model).run(None, {"x": X})
    np.testing.assert_allclose(y, X @ W, rtol=1e-6)
    assert model.ir_version == max_runtime_ir_version() + 5  # lowered in the bytes only
    path = tmp_path / "new.onnx"
    onnx.save(model, path)
    (y,) = make_session(path).run(None, {"x": X})
    np.testing.assert_allclose(y, X @ W, rtol=1e-6)


def test_lazily_loaded_model_runs_from_a_temporary_file_beside_its_data(tmp_path):
    model = matmul_model(ir_version=onnx.IR_VERSION)  # newer than onnxruntime reads, where onnx is ahead
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    lazy = load_model(tmp_path / "m.onnx", lazy=True)
    (y,) = make_session(lazy).run(None, {"x": X})
    np.testing.assert_allclose(y, X @ W, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # the temporary file is gone


def test_load_failure_is_one_sentence_with_a_role_and_ors_own_error_without(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(FwlrError, match=r"^ONNX Runtime cannot load the original model: .*; check that") as info:
        make_session(path, role="original model")
    assert "\n" not in str(info.value) and "[ONNXRuntimeError]" not in str(info.value)
    with pytest.raises(Exception) as raw:
        make_session(path)
    assert not isinstance(raw.value, FwlrError)


def test_session_options_carry_each_callers_choices(tmp_path):
    default = session_options()
    assert default.log_severity_level == 4 and default.intra_op_num_threads == 0  # fatal only: errors are exceptions
    chosen = session_options(threads=2, spinning=False, quiet=False, optimize=False,
                             profile_prefix=str(tmp_path / "ort"))
    assert chosen.intra_op_num_threads == 2 and chosen.log_severity_level == ort.SessionOptions().log_severity_level
    assert chosen.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert chosen.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert chosen.enable_profiling and chosen.profile_file_prefix == str(tmp_path / "ort")


def test_error_text_drops_ort_prefix_and_joins_lines():
    error = RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model failed.\n  Bad node 'x'.")
    assert error_text(error) == "Load model failed. Bad node 'x'"


def test_float_types_agree_with_what_onnxruntime_reports():
    for elem, numpy_name in FLOAT_TYPES.items():
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                                  [helper.make_tensor_value_info("x", elem, [1])],
                                  [helper.make_tensor_value_info("y", elem, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        assert make_session(model).get_outputs()[0].type in ORT_FLOAT_TYPES
        assert numpy_name == str(helper.tensor_dtype_to_np_dtype(elem))


def test_walk_graphs_is_depth_first_and_default_opset_reads_the_onnx_domain():
    inner = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "inner", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    branch = helper.make_graph([helper.make_node("If", ["c"], ["z"], then_branch=inner, else_branch=inner)],
                               "branch", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    main = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=inner)], "main",
                             [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(main, opset_imports=[helper.make_opsetid("com.x", 1), helper.make_opsetid("ai.onnx", 15)])
    # make_node sorts attributes by name: else_branch comes before then_branch
    assert [g.name for g in walk_graphs(model)] == ["main", "inner", "branch", "inner", "inner"]
    assert default_opset(model) == 15
    del model.opset_import[1]
    assert default_opset(model) == 0
