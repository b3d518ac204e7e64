"""One byte budget across precisions and ranks (numpy only): the quantized path's part of the one allocator.

Each site (or embedding table) has options — dense fp32, int8, int4 at a block size, either of those plus a
rank-r correction, low rank alone — each a methods.allocation.Option with its bytes and its predicted loss (the
dropped weighted energy, in loss units with gradient statistics). methods.allocation.allocate spends the budget
over them: start every site at its smallest option, then take the upgrades along each site's lower convex hull
in (bytes, loss) with the most loss removed per byte until the budget is spent. Under a latency budget
(`--quantize ... --target-latency`) the same options, priced in milliseconds (pipeline.quantized_speed), are
spent by the same allocator (cost=by_ms).
"""

from __future__ import annotations

from onnx_fwlr.methods.allocation import Option


def rank_grid(K: int, N: int, step: int = 8) -> list[int]:
    """Correction ranks tried: multiples of `step` below min(K, N) (kernels like round ranks, docs/speed.md)."""
    return list(range(step, min(K, N), step))


def minimum_bytes(choices: list[list[Option]]) -> int:
    """Bytes of the cheapest option of every site together."""
    return sum(min(o.bytes for o in options) for options in choices)
