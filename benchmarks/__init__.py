"""Benchmarks: separate commands that measure, never timed assertions in the test suite."""
