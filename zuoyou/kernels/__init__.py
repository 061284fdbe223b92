"""Hand-written CPU kernels that no installable library provides here (see benchmarks/README.md)."""
