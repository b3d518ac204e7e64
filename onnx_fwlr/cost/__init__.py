"""What it costs to run a model here: measured latency tables, ONNX forms, profiling, the achievable ratio, FLOPs."""
