"""Benchmarks: each module runs on its own private stack; see bench/README.md."""
