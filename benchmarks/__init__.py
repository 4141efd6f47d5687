"""Benchmarks of the refusal pipeline (run ``python -m benchmarks.pipeline --help``)."""
