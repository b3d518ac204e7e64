"""Workflows over the pipeline, beside the CLI: sweeps, the bytes x fidelity frontier, inspect listings."""
