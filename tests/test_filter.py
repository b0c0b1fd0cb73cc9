"""DeltaFilter matching and negation (PROTOCOL.md "DeltaFilter"; spec section 2.5)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from rhizome_proto import (
    NEGATES_ROLE,
    Delta,
    DeltaFilter,
    NegationIndex,
    Pointer,
    Reference,
    TimestampRange,
    decode,
    negated_targets,
)
from tests.strategies import (
    delta_filters,
    delta_lists,
    deltas,
    deterministic,
    pointers,
    references,
)


def delta(
    delta_id: str = "d1",
    *,
    timestamp: float = 100,
    author: str = "alice",
    system: str = "sys-a",
    pointers: Iterable[Pointer] = (),
) -> Delta:
    return Delta(delta_id, timestamp, author, system, tuple(pointers))


def negation(delta_id: str, *targets: str, timestamp: float = 200) -> Delta:
    return delta(
        delta_id,
        timestamp=timestamp,
        pointers=[Pointer(NEGATES_ROLE, Reference(target)) for target in targets],
    )


D = delta(
    "d1",
    pointers=[
        Pointer("movie", Reference("m1", "reviews")),
        Pointer("actor", Reference("a1")),
        Pointer("text", "m2"),
        Pointer("rating", 5),
    ],
)


# --- fields --------------------------------------------------------------------------------


def test_empty_filter_matches_everything() -> None:
    assert DeltaFilter().matches(D)
    assert DeltaFilter().matches(delta("x", pointers=()))
    assert DeltaFilter().matches(D, lambda _: False)


@pytest.mark.parametrize("field", ["ids", "target_ids", "target_contexts", "authors", "systems"])
def test_empty_tuple_matches_nothing(field: str) -> None:
    assert not replace(DeltaFilter(), **{field: ()}).matches(D)


@pytest.mark.parametrize(
    ("field", "hit", "miss"),
    [
        ("ids", "d1", "d2"),
        ("authors", "alice", "bob"),
        ("systems", "sys-a", "sys-b"),
        ("target_ids", "m1", "m9"),
        ("target_ids", "a1", "reviews"),
        ("target_contexts", "reviews", "m1"),
    ],
)
def test_each_list_field(field: str, hit: str, miss: str) -> None:
    assert replace(DeltaFilter(), **{field: (hit,)}).matches(D)
    assert replace(DeltaFilter(), **{field: (miss, hit)}).matches(D)
    assert not replace(DeltaFilter(), **{field: (miss,)}).matches(D)


def test_list_matching_is_exact() -> None:
    assert not DeltaFilter(ids=("D1",)).matches(D)
    assert not DeltaFilter(ids=("d",)).matches(D)
    assert not DeltaFilter(authors=("alice ",)).matches(D)


def test_target_ids_only_look_at_references() -> None:
    # "m2" and 5 are primitive targets, not references.
    assert not DeltaFilter(target_ids=("m2",)).matches(D)
    assert not DeltaFilter(target_ids=("5",)).matches(D)
    assert not DeltaFilter(target_ids=("m1",)).matches(delta(pointers=[Pointer("m1", "m1")]))


def test_target_contexts_need_a_context() -> None:
    no_context = delta(pointers=[Pointer("actor", Reference("a1"))])
    assert not DeltaFilter(target_contexts=("a1",)).matches(no_context)
    assert not DeltaFilter(target_contexts=("",)).matches(no_context)
    assert not DeltaFilter(target_contexts=("reviews",)).matches(delta(pointers=()))


def test_target_id_and_context_may_come_from_different_pointers() -> None:
    f = DeltaFilter(target_ids=("a1",), target_contexts=("reviews",))
    assert f.matches(D)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (None, None, True),
        (100, None, True),
        (100.0, None, True),
        (99.5, None, True),
        (100.5, None, False),
        (101, None, False),
        (None, 100, True),
        (None, 100.0, True),
        (None, 99, False),
        (None, 99.999, False),
        (100, 100, True),
        (1, 1000, True),
        (101, 1000, False),
        (1, 99, False),
        (200, 1, False),
    ],
)
def test_timestamp_range_is_inclusive(
    start: float | None, end: float | None, expected: bool
) -> None:
    f = DeltaFilter(timestamp_range=TimestampRange(start=start, end=end))
    assert f.matches(D) is expected
    assert f.matches(delta(timestamp=100.0)) is expected


def test_timestamp_range_with_float_timestamps() -> None:
    f = DeltaFilter(timestamp_range=TimestampRange(start=1.5, end=2.5))
    assert f.matches(delta(timestamp=1.5))
    assert f.matches(delta(timestamp=2))
    assert f.matches(delta(timestamp=2.5))
    assert not f.matches(delta(timestamp=2.5000001))
    assert not f.matches(delta(timestamp=1))


def test_combinations_need_every_field_to_match() -> None:
    full = DeltaFilter(
        ids=("d1",),
        authors=("alice",),
        systems=("sys-a",),
        target_ids=("m1",),
        target_contexts=("reviews",),
        timestamp_range=TimestampRange(start=100, end=100),
    )
    assert full.matches(D)
    changes: list[dict[str, Any]] = [
        {"ids": ("d2",)},
        {"authors": ("bob",)},
        {"systems": ("sys-b",)},
        {"target_ids": ("m2",)},
        {"target_contexts": ("ratings",)},
        {"timestamp_range": TimestampRange(start=101)},
    ]
    for change in changes:
        assert not replace(full, **change).matches(D), change
    assert DeltaFilter(authors=("alice",), systems=("sys-a",)).matches(D)
    assert not DeltaFilter(authors=("alice",), systems=("sys-b",)).matches(D)
    assert not DeltaFilter(authors=("bob",), systems=("sys-a",)).matches(D)


def test_select_keeps_order() -> None:
    ds = [delta("c", author="x"), delta("a"), delta("b", author="x"), delta("d")]
    assert DeltaFilter(authors=("x",)).select(ds) == [ds[0], ds[2]]
    assert DeltaFilter().select(ds) == ds
    assert DeltaFilter(ids=()).select(ds) == []
    assert DeltaFilter().select(ds, {"a", "d"}.__contains__) == [ds[0], ds[2]]


def test_timestamp_range_may_start_at_zero() -> None:
    # PROTOCOL.md: timestampRange bounds are numbers; `{"start": 0}` ("from the beginning")
    # must not make the whole hello or sync_request undecodable.
    wire = '{"type":"sync_request","timestamp":1,"filter":{"timestampRange":{"start":0}}}'
    message = decode(wire)
    f = message.filter  # type: ignore[union-attr]
    assert f is not None and f.timestamp_range == TimestampRange(start=0)
    assert f.matches(delta(timestamp=1))
    hello = (
        '{"type":"hello","timestamp":1,"systemId":"c","config":'
        '{"pullFilter":{"timestampRange":{"start":0,"end":0}}}}'
    )
    assert decode(hello).config.pull_filter.timestamp_range.end == 0  # type: ignore[union-attr]


def test_filter_decodes_from_camel_case() -> None:
    wire = (
        '{"type":"sync_request","timestamp":1,"filter":{"ids":["d1"],"targetIds":["m1"],'
        '"targetContexts":["reviews"],"authors":["alice"],"systems":["sys-a"],'
        '"timestampRange":{"start":1,"end":200},"includeNegated":true}}'
    )
    f = decode(wire).filter  # type: ignore[union-attr]
    assert f == DeltaFilter(
        ids=("d1",),
        target_ids=("m1",),
        target_contexts=("reviews",),
        authors=("alice",),
        systems=("sys-a",),
        timestamp_range=TimestampRange(start=1, end=200),
        include_negated=True,
    )
    assert f.matches(D)


# --- negation ------------------------------------------------------------------------------


def visible(index: NegationIndex, ds: Iterable[Delta], **filter_fields: Any) -> set[str]:
    return {d.id for d in DeltaFilter(**filter_fields).select(ds, index.is_negated)}


def test_negated_targets() -> None:
    d = delta(
        pointers=[
            Pointer(NEGATES_ROLE, Reference("a")),
            Pointer(NEGATES_ROLE, Reference("b", "ctx")),
            Pointer(NEGATES_ROLE, "c"),
            Pointer("negate", Reference("d")),
            Pointer("Negates", Reference("e")),
            Pointer("about", Reference("f")),
        ]
    )
    assert negated_targets(d) == ["a", "b"]
    assert NEGATES_ROLE == "negates"


def test_single_negation() -> None:
    ds = [delta("d1"), negation("n1", "d1")]
    index = NegationIndex(ds)
    assert index.is_negated("d1")
    assert not index.is_negated("n1")
    assert visible(index, ds) == {"n1"}
    assert not DeltaFilter().matches(ds[0], index.is_negated)
    assert DeltaFilter().matches(ds[0])  # without a store nothing is negated


def test_double_negation_restores() -> None:
    ds = [delta("d1"), negation("n1", "d1"), negation("n2", "n1")]
    index = NegationIndex(ds)
    assert not index.is_negated("d1")
    assert index.is_negated("n1")
    assert not index.is_negated("n2")
    assert visible(index, ds) == {"d1", "n2"}


def test_triple_negation_negates_again() -> None:
    ds = [delta("d1"), negation("n1", "d1"), negation("n2", "n1"), negation("n3", "n2")]
    index = NegationIndex(ds)
    assert index.is_negated("d1")
    assert not index.is_negated("n1")
    assert index.is_negated("n2")
    assert not index.is_negated("n3")
    assert visible(index, ds) == {"n1", "n3"}


def test_any_negation_in_effect_negates() -> None:
    ds = [delta("d1"), negation("n1", "d1"), negation("n2", "d1"), negation("n3", "n1")]
    index = NegationIndex(ds)
    assert index.is_negated("d1")  # n1 is undone but n2 still stands
    index.add(negation("n4", "n2"))
    assert not index.is_negated("d1")


def test_one_delta_negating_several() -> None:
    index = NegationIndex([negation("n", "a", "b", "c")])
    assert all(index.is_negated(x) for x in "abc")
    assert not index.is_negated("n")
    assert len(index) == 3


def test_negation_arriving_before_its_target() -> None:
    index = NegationIndex()
    index.add(negation("n1", "d1"))
    assert index.is_negated("d1")
    index.add(delta("d1"))
    assert index.is_negated("d1")
    index.add(negation("n2", "n1"))
    assert not index.is_negated("d1")


def test_only_reference_targets_with_role_negates_count() -> None:
    index = NegationIndex(
        [
            delta("x1", pointers=[Pointer(NEGATES_ROLE, "d1")]),
            delta("x2", pointers=[Pointer("negate", Reference("d1"))]),
            delta("x3", pointers=[Pointer("about", Reference("d1"))]),
        ]
    )
    assert not index.is_negated("d1")
    assert len(index) == 0


def test_unknown_ids_are_not_negated() -> None:
    assert not NegationIndex().is_negated("anything")
    assert len(NegationIndex([delta("d1")])) == 0


@pytest.mark.parametrize(
    "edges",
    [
        [("a", "a")],
        [("a", "b"), ("b", "a")],
        [("a", "b"), ("b", "c"), ("c", "a")],
        [("a", "b"), ("b", "a"), ("c", "a"), ("a", "d")],
        [(f"n{i}", f"n{(i + 1) % 260}") for i in range(260)],
    ],
    ids=["self", "two", "three", "mixed", "long"],
)
def test_cycles_terminate(edges: list[tuple[str, str]]) -> None:
    index = NegationIndex(negation(src, dst) for src, dst in edges)
    nodes = sorted({n for edge in edges for n in edge})[:12]
    first = {n: index.is_negated(n) for n in nodes}
    assert all(isinstance(v, bool) for v in first.values())
    # The answer does not depend on what was asked before.
    assert {n: index.is_negated(n) for n in sorted(nodes, reverse=True)} == first


def test_long_chain_terminates() -> None:
    index = NegationIndex(negation(f"n{i + 1}", f"n{i}") for i in range(2000))
    assert isinstance(index.is_negated("n0"), bool)
    assert not index.is_negated("n2000")
    assert index.is_negated("n1999")


def test_include_negated_keeps_negated_deltas() -> None:
    ds = [delta("d1"), negation("n1", "d1"), delta("d2")]
    index = NegationIndex(ds)
    assert visible(index, ds, include_negated=True) == {"d1", "n1", "d2"}
    assert visible(index, ds, include_negated=False) == {"n1", "d2"}
    assert visible(index, ds) == {"n1", "d2"}
    # Negation is applied after, not instead of, the other fields.
    assert visible(index, ds, include_negated=True, ids=("d1",)) == {"d1"}
    assert visible(index, ds, ids=("d1",)) == set()


def test_negators_are_not_excluded_for_negating() -> None:
    ds = [delta("d1"), negation("n1", "d1"), negation("n2", "d1"), negation("n3", "ghost")]
    index = NegationIndex(ds)
    assert visible(index, ds) == {"n1", "n2", "n3"}
    assert visible(index, ds, authors=("alice",)) == {"n1", "n2", "n3"}


def test_is_negated_is_not_exponential() -> None:
    # Each delta negates every earlier one: a walk that does not remember what it already
    # resolved takes 2**n steps here (seconds at n = 24); a peer can send such deltas.
    ids = [f"d{i:03d}" for i in range(24)]
    index = NegationIndex(negation(ids[i], *ids[:i]) for i in range(len(ids)))
    started = time.perf_counter()
    assert [index.is_negated(x) for x in ids] == [True] * (len(ids) - 1) + [False]
    assert time.perf_counter() - started < 0.25


# --- properties against oracles ------------------------------------------------------------

POOL = st.sampled_from(["a", "b", "c", "é"])
SMALL_TIMES = st.integers(min_value=1, max_value=6) | st.sampled_from([1.5, 3.5, 6.0])


def oracle_matches(f: DeltaFilter, d: Delta, negated: set[str]) -> bool:
    """PROTOCOL.md "DeltaFilter", spelled out directly."""
    refs = [p.target for p in d.pointers if type(p.target) is Reference]
    checks: list[bool] = []
    if f.ids is not None:
        checks.append(d.id in set(f.ids))
    if f.authors is not None:
        checks.append(d.author in set(f.authors))
    if f.systems is not None:
        checks.append(d.system in set(f.systems))
    if f.timestamp_range is not None:
        low, high = f.timestamp_range.start, f.timestamp_range.end
        checks.append((low is None or low <= d.timestamp) and (high is None or d.timestamp <= high))
    if f.target_ids is not None:
        checks.append(bool({r.id for r in refs} & set(f.target_ids)))
    if f.target_contexts is not None:
        contexts = {r.context for r in refs if r.context is not None}
        checks.append(bool(contexts & set(f.target_contexts)))
    if f.include_negated is not True:
        checks.append(d.id not in negated)
    return all(checks)


pool_deltas = deltas(
    ids=POOL,
    times=SMALL_TIMES,
    authors=POOL,
    systems=POOL,
    pointer_items=pointers(roles=POOL, targets=references(ids=POOL, contexts=POOL) | POOL),
)
pool_filters = delta_filters(strings=POOL, bounds=SMALL_TIMES)


@deterministic(max_examples=200)
@given(pool_filters, pool_deltas, st.sets(POOL))
def test_matches_equals_oracle(f: DeltaFilter, d: Delta, negated: set[str]) -> None:
    assert f.matches(d, negated.__contains__) is oracle_matches(f, d, negated)
    assert f.matches(d) is oracle_matches(f, d, set())


@deterministic()
@given(delta_filters(), deltas())
def test_matches_equals_oracle_on_arbitrary_values(f: DeltaFilter, d: Delta) -> None:
    assert f.matches(d) is oracle_matches(f, d, set())


@deterministic()
@given(pool_filters, delta_lists(elements=pool_deltas), st.sets(POOL))
def test_select_is_matches_in_order(f: DeltaFilter, ds: list[Delta], negated: set[str]) -> None:
    assert f.select(ds, negated.__contains__) == [d for d in ds if oracle_matches(f, d, negated)]


def oracle_negated(negators: dict[str, set[str]], ids: Iterable[str]) -> dict[str, bool]:
    """Fixed point of: x is negated iff some negator of x is not negated (acyclic graphs)."""
    state = dict.fromkeys(ids, False)
    for _ in range(len(state) + 2):
        new = {x: any(not state[n] for n in negators.get(x, ())) for x in state}
        if new == state:
            return state
        state = new
    raise AssertionError("no fixed point: the negation graph has a cycle")


@st.composite
def negation_dags(draw: Callable[..., Any]) -> tuple[list[Delta], dict[str, set[str]]]:
    """Deltas d0..dN where each may negate only deltas created before it."""
    size = draw(st.integers(min_value=1, max_value=8))
    ids = [f"d{i}" for i in range(size)]
    ds: list[Delta] = []
    negators: dict[str, set[str]] = {}
    for i, delta_id in enumerate(ids):
        targets = draw(st.lists(st.sampled_from(ids[:i]), max_size=3)) if i else []
        noise: list[Pointer] = draw(
            st.lists(
                st.sampled_from(
                    [
                        Pointer("about", Reference(ids[0])),
                        Pointer(NEGATES_ROLE, ids[0]),
                        Pointer(NEGATES_ROLE, Reference("not-in-store")),
                    ]
                ),
                max_size=2,
            )
        )
        ps = [Pointer(NEGATES_ROLE, Reference(t, draw(st.none() | POOL))) for t in targets]
        ds.append(delta(delta_id, timestamp=i + 1, pointers=ps + noise))
        for t in targets:
            negators.setdefault(t, set()).add(delta_id)
    return ds, negators


@deterministic(max_examples=120)
@given(negation_dags(), st.randoms(use_true_random=False))
def test_is_negated_equals_fixed_point_oracle(
    dag: tuple[list[Delta], dict[str, set[str]]], rnd: random.Random
) -> None:
    ds, negators = dag
    expected = oracle_negated(negators, [d.id for d in ds])
    # Insertion order must not matter: negations may arrive before what they negate.
    shuffled = list(ds)
    rnd.shuffle(shuffled)
    for order in (ds, shuffled):
        index = NegationIndex(order)
        assert {x: index.is_negated(x) for x in expected} == expected
    # And the filter leaves out exactly those, keeping negators that are in effect.
    index = NegationIndex(ds)
    kept = {d.id for d in DeltaFilter().select(ds, index.is_negated)}
    assert kept == {x for x, neg in expected.items() if not neg}
    everything = {d.id for d in DeltaFilter(include_negated=True).select(ds, index.is_negated)}
    assert everything == set(expected)
