"""Benchmark scripts and the in-process federation they run on."""
