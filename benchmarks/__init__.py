"""Benchmarks: scripts (`python benchmarks/X.py`) and the inference benchmark package behind `clipseg bench`."""
