"""Benchmarks: speed and load figures measured against a baseline in the same run (run as `python -m benchmarks.NAME`)."""
