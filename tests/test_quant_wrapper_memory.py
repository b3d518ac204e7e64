"""The wrappers around ONNX Runtime's block quantizer (quant.ortquant) hold one copy of the weight beyond what
they return: the tensors the quantizer made are copied out of its scratch graph (a message taken from a graph kept
the graph's protobuf arena, with the weight's float bytes, alive as long as the quantized weight), and
deq(Q(W)) is made from the unpacked bytes straight in float32 (an int32 copy of the weight came first). The same
numbers as the integer path, asserted bit for bit; the memory asserted on sizes in a child process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnx_fwlr.quant import ortquant

ROOT = Path(__file__).resolve().parents[1]


def integer_path(q: ortquant.QuantizedWeight) -> np.ndarray:
    """deq(Q(W)) float32 as the wrapper made it before: (q − zero point) in int32, then float32, times the scale."""
    attrs = {a.name: helper.get_attribute_value(a) for a in q.node.attribute}
    K, N, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    arrays = [numpy_helper.to_array(t) for t in q.tensors]
    scales = arrays[1].reshape(N, -1).astype(np.float32)
    blocks = scales.shape[1]
    values = ortquant._unpack(arrays[0].reshape(N, blocks, -1), bits, block)
    zero = (ortquant._unpack(arrays[2].reshape(N, -1), bits, blocks) if len(arrays) > 2
            else np.full((N, blocks), 1 << (bits - 1), dtype=np.int32))
    W = (values - zero[:, :, None]).astype(np.float32) * scales[:, :, None]
    return W.reshape(N, -1)[:, :K].T


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("K", [64, 80])  # 80: the last block of each column is padded
def test_dequantized_numbers_are_the_integer_paths(bits, symmetric, K):
    W = np.random.default_rng(bits + K).standard_normal((K, 24)).astype(np.float32)
    q = ortquant.quantize_matmul_weight(W, ortquant.nbits(bits, 32, symmetric), "w")
    want = integer_path(q)
    got = ortquant.dequantize_matmul_weight(q, float64=False)
    assert got.dtype == np.float32 and got.shape == (K, 24)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ortquant.dequantize_matmul_weight(q), want.astype(np.float64))


def test_made_tensors_are_their_own_messages():
    W = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    q = ortquant.quantize_matmul_weight(W, ortquant.nbits(4, 32), "w")
    assert [t.name for t in q.tensors] == list(q.node.input[1:])
    q.tensors[0].name = "renamed"  # a copy: renaming it touches nothing else (rewrite renames them)
    assert q.node.input[1] != "renamed" and q.tensors[0].name == "renamed"


CHILD = textwrap.dedent("""
    import ctypes, gc, json, sys
    import numpy as np
    from onnx_fwlr.quant import ortquant

    def status(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) << 10 for line in handle if line.startswith(key + ":"))

    def settle():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return status("VmRSS")

    scheme = ortquant.nbits(4, 32)
    ortquant.dequantize_matmul_weight(ortquant.quantize_matmul_weight(np.ones((64, 64), np.float32), scheme, "w"))
    K, N = int(sys.argv[1]), int(sys.argv[2])
    W = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    before = settle()
    q = ortquant.quantize_matmul_weight(W, scheme, "w")
    held = settle() - before  # what the quantized weight keeps
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
    start = settle()
    deq = ortquant.dequantize_matmul_weight(q, float64=False)
    print(json.dumps({"held": held, "dequantize_peak": status("VmHWM") - start, "weight": W.nbytes}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets VmHWM through /proc (Linux)")
def test_the_quantized_weight_holds_no_copy_of_the_float_weight_and_dequantizing_makes_one():
    """64 MiB of float32 weight: the quantized weight keeps its 4-bit numbers and scales (about a seventh of it),
    not the scratch graph's float copy (before: +64 MiB); dequantizing peaks at one float32 copy plus the
    unpacked bytes, under 1.5 × the weight (before: an int32 copy beside the float32 one, over 2 ×)."""
    result = subprocess.run([sys.executable, "-c", CHILD, "1024", "16384"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    measured = json.loads(result.stdout)
    weight = measured["weight"]
    assert measured["held"] < weight / 4
    assert weight <= measured["dequantize_peak"] < 1.5 * weight


@pytest.mark.parametrize("bits,symmetric,K", [(4, False, 96), (4, True, 96), (8, False, 96), (4, False, 64),
                                              (8, True, 40)])
def test_a_wide_weight_quantized_in_column_pieces_is_the_whole_call(bits, symmetric, K):
    """Pieces of 32 columns (the last one 4), joined along N: the same node and the same tensor bytes as one
    call of ONNX Runtime's quantizer (an odd count of blocks per column checks the 4-bit zero points' packing;
    K 40 pads the last block)."""
    W = np.random.default_rng(bits + K).standard_normal((K, 100)).astype(np.float32)
    scheme = ortquant.nbits(bits, 32, symmetric)
    whole = ortquant.quantize_matmul_weight(W, scheme, "w", columns=100)
    pieces = ortquant.quantize_matmul_weight(W, scheme, "w", columns=32)
    assert pieces.node.SerializeToString() == whole.node.SerializeToString()
    assert [t.SerializeToString() for t in pieces.tensors] == [t.SerializeToString() for t in whole.tensors]
