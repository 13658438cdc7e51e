"""Benchmarks that compare esper_assets against the raw clients in the same run."""
