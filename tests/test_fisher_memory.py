"""The recorded Fisher pass's memory floor (docs/llm.md, "The memory rule"): ONNX Runtime's node order for the
exposed shapes, the site inputs and logits dropped once used, forward values parked on disk until the backward
walk reaches them. Each must leave every number as it was."""

import numpy as np
import onnxruntime as ort
import pytest
from llama_builder import build_tiny, write_tiny_calibration

from onnx_fwlr import compress
from onnx_fwlr.autodiff import backward as backward_module
from onnx_fwlr.io import model as modelio
from onnx_fwlr.io import runtime
from onnx_fwlr.io.data import open_data
from onnx_fwlr.sites.find import find_sites
from onnx_fwlr.stats import fisher


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return build_tiny(folder / "llama.onnx", "none"), write_tiny_calibration(folder)


def _setup(tiny):
    path, calib = tiny
    model = modelio.load_model(path)
    sites = find_sites(model)[0]
    feed, _ = next(iter(open_data(str(calib), model, batch_size=32)))
    _, target, _, _, runner = fisher._gradient_setup(model, sites, None)
    return model, sites, feed, target, runner


def _seed(values, target):
    return np.random.default_rng(0).standard_normal(values[target.tensor].shape).astype(np.float32)


def test_sessions_that_expose_shapes_run_shape_nodes_first():
    """The priority-based order runs a Shape node as soon as its input exists; in ORT's default order the
    backward pass's appended Shape nodes ran last and kept every tensor they read alive to the run's end."""
    assert runtime.session_options().execution_order == ort.ExecutionOrder.DEFAULT
    assert runtime.session_options(shapes_first=True).execution_order == ort.ExecutionOrder.PRIORITY_BASED
    assert fisher._session_options().execution_order == ort.ExecutionOrder.PRIORITY_BASED
    assert fisher._session_options().enable_cpu_mem_arena is False


def test_shape_nodes_first_changes_no_forward_value(tiny):
    model, sites, feed, target, runner = _setup(tiny)
    assert runner._shapes  # the exposed model does read some shapes only
    first = runner.forward(feed)
    _, _, _, _, default_order = fisher._gradient_setup(model, sites, None)
    default_order.session_options = runtime.session_options(spinning=False, quiet=False, arena=False)
    again = default_order.forward(feed)
    assert sorted(first) == sorted(again)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


def test_parked_values_leave_memory_and_give_the_same_cotangents(tiny):
    _, _, feed, target, runner = _setup(tiny)
    values = runner.forward(feed)
    seed = _seed(values, target)
    expected = runner.backward(dict(values), seed)
    read = [name for name in values if name in runner._first_reads()]
    first_bytes = values[min(read, key=lambda n: (runner._first_reads()[n], n))].nbytes
    parked_values = dict(values)
    parked = runner.park(parked_values, resident=first_bytes)
    try:
        resident = [name for name in read if isinstance(parked_values[name], np.ndarray)]
        assert sum(parked_values[name].nbytes for name in resident) <= first_bytes  # the bound, on sizes
        assert len(resident) < len(read) // 2  # the rest wait on disk
        handed = {}
        runner.backward(parked_values, seed, consume=True, emit=lambda n, g: handed.setdefault(n, g))
    finally:
        parked.close()
    assert sorted(handed) == sorted(expected)
    for name, cotangent in expected.items():
        np.testing.assert_array_equal(handed[name], cotangent)
    assert runner.park(dict(values), resident=1 << 40) is None  # everything fits: no file


def test_values_no_step_reads_become_shapes_only(tiny):
    _, sites, feed, target, runner = _setup(tiny)
    values = runner.forward(feed)
    seed = _seed(values, target)
    expected = runner.backward(dict(values), seed)
    dropped = dict(values)
    runner.drop_unread(dropped, keep=[sites[0].uses[0].input])
    assert dropped[target.tensor].shape == values[target.tensor].shape
    assert dropped[target.tensor].base is backward_module._PLACEHOLDER_BASE  # no bytes of its own
    assert dropped[sites[0].uses[0].input] is values[sites[0].uses[0].input]  # kept as asked
    unread = [name for name in values if name not in runner._first_reads() and name not in feed
              and not name.endswith(backward_module._SHAPE_SUFFIX)]
    assert target.tensor in unread and len(unread) > 1  # the logits and site inputs only the statistics read
    got = runner.backward(dropped, seed)
    for name, cotangent in expected.items():
        np.testing.assert_array_equal(got[name], cotangent)


def test_a_recorded_pass_with_every_value_parked_gives_the_same_model(tiny, monkeypatch):
    """The recorded pass (statistics in groups) parks all but PARK_RESIDENT bytes of each sample's forward
    values; with nothing resident the compressed model is byte for byte the one in-memory pass's."""
    path, calib = tiny
    options = dict(ratio=0.6, calibration=str(calib), progress=False)
    one, _ = compress(str(path), **options)
    parks = []
    original = backward_module.GradientRunner.park

    def counting_park(self, values, resident):
        file = original(self, values, resident)
        parks.append((resident, file is not None))
        return file

    monkeypatch.setattr(fisher, "PARK_RESIDENT", 0)
    monkeypatch.setattr(backward_module.GradientRunner, "park", counting_park)
    grouped, report = compress(str(path), stats_memory=200_000, **options)
    assert report.calibration["passes"] == 1 and report.calibration["groups"] > 1
    assert parks and all(resident == 0 and used for resident, used in parks)
    assert grouped.SerializeToString() == one.SerializeToString()


def _all_fetched(runner):
    """The runner as it was before exact products: every value it reads fetched from ONNX Runtime."""
    every = [*runner._values, *runner._products]
    runner._products = {}
    runner._values, runner._shapes = runner._exposure(every)
    runner._fetch = runner._values + [name + backward_module._SHAPE_SUFFIX for name in runner._shapes]
    runner._release = runner._first = None
    return runner


def test_exact_products_are_multiplied_in_numpy_to_the_same_bits(tiny):
    """A SwiGLU's silu(gate) = gate * sigmoid(gate) and silu * up are not fetched from ONNX Runtime (its run
    holds fewer values) but multiplied when read: the same bits as ORT's Mul, and the same cotangents."""
    model, sites, feed, target, runner = _setup(tiny)
    assert len(runner._products) == 2 * 2  # two per layer of the tiny decoder
    assert not set(runner._products) & set(runner.fetch_names)
    lazy = runner.forward(feed, lazy=True)
    assert not set(runner._products) & set(lazy)
    _, _, _, _, fetched = fisher._gradient_setup(model, sites, None)
    fetched = _all_fetched(fetched)
    assert set(runner._products) <= set(fetched.fetch_names)
    reference = fetched.forward(feed)
    for name in runner._products:
        assert runner.shape(lazy, name) == reference[name].shape
        np.testing.assert_array_equal(runner.value(dict(lazy), name), reference[name])
    eager = runner.forward(feed)
    assert runner.value_bytes(lazy) == sum(v.nbytes for v in eager.values())  # what sizes micro-batches
    for name in reference:
        np.testing.assert_array_equal(eager[name], reference[name])
    seed = _seed(reference, target)
    expected = fetched.backward(dict(reference), seed)
    handed = {}
    parked = runner.park(lazy, resident=0)
    try:
        runner.backward(lazy, seed, consume=True, emit=lambda n, g: handed.setdefault(n, g))
    finally:
        parked.close()
    for name, cotangent in expected.items():
        np.testing.assert_array_equal(handed[name], cotangent)
