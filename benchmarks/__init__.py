"""Benchmarks: `python -m benchmarks.<name> [--smoke]`; each writes reports/bench/<name>-<device>.json."""
