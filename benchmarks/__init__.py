"""Load benchmarks."""
