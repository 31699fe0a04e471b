"""Benchmarks of bridged against a socat baseline.

Run ``python -m bench`` from the repository root (see bench/RESULTS.md).
"""
