"""Fuzzing harnesses for rhizome_proto (see README.md); ``invariants`` also runs under pytest."""
