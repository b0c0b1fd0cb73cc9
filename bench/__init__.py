"""Benchmarks of rhizome-federation between separate processes over 127.0.0.1, each against a
raw-framing baseline measured in the same run: ``python -m bench [--smoke]`` (see README.md)."""
