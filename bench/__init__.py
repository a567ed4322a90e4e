"""Benchmarks: each measures one of our stages against a bare baseline in the same process and run."""
