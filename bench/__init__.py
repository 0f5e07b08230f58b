"""Benchmarks: moetrt against transformers and the memory-bandwidth roofline (`make bench`)."""
