"""Benchmark scripts: each prints a table; ratios are measured side by side in one run."""
