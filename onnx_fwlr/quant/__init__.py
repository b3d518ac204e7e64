"""Quantized main branch plus an importance-weighted low-rank correction of its error (docs/quantization.md).

ortquant: thin wrappers over onnxruntime.quantization, and deq(Q(W)) exactly as ONNX Runtime computes it;
compensate: the residual's weighted best rank-r fit (numpy only); budget: per-site options and the greedy
byte allocation (numpy only); embedding: loss-unit statistics of embedding tables; graph: the rewrite.
"""
