"""The node fuzzing invariants (fuzz/node_harness.py) under Hypothesis, so the suite covers them
where atheris does not build: the seeds, arbitrary step sequences, seeds mutated byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.node_harness import check_node, node_seed_inputs

SEEDS = node_seed_inputs()


@pytest.mark.parametrize("seed", SEEDS)
def test_seeds(seed: bytes) -> None:
    check_node(seed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_steps(data: bytes) -> None:
    check_node(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255))))
def test_mutated_seeds(seed: bytes, edits: list[tuple[int, int]]) -> None:
    data = bytearray(seed)
    for at, value in edits:
        if data:
            data[at % len(data)] = value
    check_node(bytes(data))
