"""Helpers for testing and benchmarking txkernel with real processes."""
