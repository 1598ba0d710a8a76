"""Benchmarks: every speed claim is a ratio against a baseline measured in the same run."""
