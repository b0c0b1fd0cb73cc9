"""Contract tests for ``rhizome_adapters.storage``: ``MemoryStore`` and ``SQLiteStore``."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhizome_adapters.storage import MemoryStore, SQLiteStore, open_store
from rhizome_adapters.storage import Store as StoreProtocol
from rhizome_proto import (
    Delta,
    DeltaFilter,
    DeltaStore,
    InvalidDeltaError,
    LinkConfig,
    NegationIndex,
    Pointer,
    Reference,
    ScanOrder,
    TimestampRange,
)
from tests.node_sim import Network

Store = MemoryStore | SQLiteStore


def delta(
    delta_id: str,
    timestamp: float = 1,
    *,
    author: str = "alice",
    system: str = "s1",
    pointers: tuple[Pointer, ...] = (),
) -> Delta:
    return Delta(id=delta_id, timestamp=timestamp, author=author, system=system, pointers=pointers)


def negation(delta_id: str, target: str, timestamp: float = 1) -> Delta:
    return delta(delta_id, timestamp, pointers=(Pointer("negates", Reference(target)),))


def scan_all(
    store: Store,
    *,
    order: ScanOrder = "sequence",
    limit: int = 37,
    filter: DeltaFilter | None = None,
    from_timestamp: float = 0,
) -> list[tuple[int, Delta]]:
    """Every match, fetched page by page with keyset positions."""
    out: list[tuple[int, Delta]] = []
    after: tuple[float, int] | int | None = None
    while True:
        page = store.scan(
            after=after, filter=filter, from_timestamp=from_timestamp, limit=limit, order=order
        )
        assert len(page) <= limit
        out.extend(page)
        if len(page) < limit:
            return out
        seq, last = page[-1]
        after = seq if order == "sequence" else (last.timestamp, seq)


def ids(pairs: list[tuple[int, Delta]]) -> list[str]:
    return [d.id for _, d in pairs]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "store.db")
    yield s
    s.close()


def test_stores_satisfy_the_protocols(tmp_path: Path) -> None:
    memory: StoreProtocol = MemoryStore()
    with SQLiteStore(tmp_path / "p.db") as sqlite_store:
        on_disk: StoreProtocol = sqlite_store
        core_view: DeltaStore = on_disk
        assert memory.last_sequence() == core_view.last_sequence() == 0


class OnlyDeltaStore:
    """A store showing exactly the members of :class:`DeltaStore` (and ``close``, for the
    simulation's teardown): anything else the node reached for would be an AttributeError."""

    ALLOWED = frozenset(name for name in vars(DeltaStore) if not name.startswith("_")) | {"close"}

    def __init__(self, inner: StoreProtocol) -> None:
        self._inner = inner
        self.used: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name not in self.ALLOWED:
            raise AttributeError(f"the node called {name!r}, which DeltaStore does not have")
        self.used.add(name)
        return getattr(self._inner, name)


def test_the_node_needs_nothing_beyond_delta_store(tmp_path: Path) -> None:
    assert {
        "put_many", "get", "stored_ids", "count", "scan", "scan_raw", "is_negated",
        "last_sequence", "get_meta", "set_meta", "close",
    } == OnlyDeltaStore.ALLOWED  # fmt: skip
    hub = OnlyDeltaStore(SQLiteStore(tmp_path / "hub.db"))
    net = Network()
    try:
        net.add_node("hub", store=cast(DeltaStore, hub))
        for name in ("a", "b"):
            net.add_node(name)
        for _ in range(5):
            net.author("a")
        net.connect("a", "hub", LinkConfig(mode="bidirectional", initial_sync="full"))
        net.deliver()
        for _ in range(5):
            net.author("hub")
        net.connect("b", "hub", LinkConfig(mode="bidirectional", initial_sync="full"))
        net.deliver()
        assert net.ids("a") == net.ids("b") == net.ids("hub")
        assert len(net.ids("hub")) == 10
        assert {"put_many", "scan_raw", "count"} <= hub.used  # the proxy served a sync
    finally:
        net.close()


# --- put / get / contains -------------------------------------------------------------------


def test_put_get_contains_and_sequence_numbers(store: Store) -> None:
    assert store.last_sequence() == 0
    assert len(store) == 0
    assert store.get("a") is None
    assert "a" not in store
    assert store.put(delta("a", 5)) == 1
    assert store.put(delta("b", 3)) == 2
    assert store.get("a") == delta("a", 5)
    assert "a" in store and "b" in store
    assert 1 not in store
    assert store.last_sequence() == 2
    assert len(store) == 2


def test_put_is_idempotent_by_id_and_keeps_the_first(store: Store) -> None:
    assert store.put(delta("a", 5, author="first")) == 1
    assert store.put(delta("a", 9, author="second")) is None
    stored = store.get("a")
    assert stored is not None and stored.author == "first"
    assert store.put(delta("b")) == 2
    assert store.last_sequence() == 2
    assert len(store) == 2


def test_put_many_returns_sequence_numbers_and_none_for_known_ids(store: Store) -> None:
    store.put(delta("a"))
    assert store.put_many([delta("b"), delta("a"), delta("c"), delta("b")]) == [2, None, 3, None]
    assert store.put_many([]) == []
    assert ids(store.scan()) == ["a", "b", "c"]


@pytest.mark.parametrize(
    "bad",
    [
        delta(""),
        delta("x", 0),
        delta("x", -1.5),
        delta("x", float("nan")),
        delta("x", 2**53),
        delta("x", author=""),
        delta("x", pointers=(Pointer("negates", None),)),  # type: ignore[arg-type]
        "not a delta",
        None,
    ],
)
def test_invalid_deltas_are_rejected_and_nothing_is_stored(store: Store, bad: Any) -> None:
    with pytest.raises(InvalidDeltaError):
        store.put(bad)
    with pytest.raises(InvalidDeltaError):
        store.put_many([delta("ok"), bad])
    assert len(store) == 0
    assert store.last_sequence() == 0
    assert "ok" not in store


def test_pointers_given_as_a_list_are_stored_as_a_tuple(store: Store) -> None:
    loose = delta("a", pointers=[Pointer("name", "x")])  # type: ignore[arg-type]
    store.put(loose)
    assert store.get("a") == delta("a", pointers=(Pointer("name", "x"),))


def test_timestamps_keep_their_type(store: Store) -> None:
    store.put_many([delta("int", 1_700_000_000_123), delta("float", 1.0), delta("max", 2**53 - 1)])
    got = {d.id: d.timestamp for _, d in store.scan()}
    assert got == {"int": 1_700_000_000_123, "float": 1.0, "max": 2**53 - 1}
    assert type(got["int"]) is int and type(got["max"]) is int
    assert type(got["float"]) is float
    stored = store.get("int")
    assert stored is not None and type(stored.timestamp) is int


# --- scan -----------------------------------------------------------------------------------


def _random_deltas(n: int, seed: int = 7) -> list[Delta]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts: float = rng.randint(1, 40)
        if rng.random() < 0.3:
            ts = ts + 0.5 if rng.random() < 0.5 else float(ts)
        out.append(delta(f"d{i:04}", ts, author=f"a{i % 3}"))
    return out


@pytest.mark.parametrize("order", ["sequence", "timestamp"])
def test_keyset_pagination_yields_each_delta_once_in_order(store: Store, order: ScanOrder) -> None:
    deltas = _random_deltas(1000)
    store.put_many(deltas)
    got = scan_all(store, order=order, limit=37)
    expected = list(enumerate(deltas, start=1))
    if order == "timestamp":
        expected.sort(key=lambda pair: (pair[1].timestamp, pair[0]))
    assert got == expected


def test_scan_positions(store: Store) -> None:
    store.put_many([delta("a", 3), delta("b", 1), delta("c", 3), delta("d", 2)])
    assert ids(store.scan(after=2)) == ["c", "d"]
    assert ids(store.scan(after=4)) == []
    assert ids(store.scan(after=-3, limit=2)) == ["a", "b"]
    assert ids(store.scan(order="timestamp")) == ["b", "d", "a", "c"]
    assert ids(store.scan(order="timestamp", after=(3, 1))) == ["c"]
    assert ids(store.scan(order="timestamp", after=(2.5, 99))) == ["a", "c"]
    assert ids(store.scan(order="timestamp", after=(3, 0))) == ["a", "c"]
    assert store.scan(limit=0) == []
    assert ids(store.scan(from_timestamp=3)) == ["a", "c"]
    assert ids(store.scan(order="timestamp", from_timestamp=2)) == ["d", "a", "c"]
    assert ids(store.scan(order="timestamp", from_timestamp=2, after=(2, 4))) == ["a", "c"]


def test_scan_rejects_bad_arguments(store: Store) -> None:
    store.put(delta("a"))
    with pytest.raises(ValueError, match="limit"):
        store.scan(limit=-1)
    with pytest.raises(ValueError, match="order"):
        store.scan(order="random")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence number"):
        store.scan(after=(1, 1))
    with pytest.raises(TypeError, match=r"\(timestamp, seq\)"):
        store.scan(after=1, order="timestamp")


# A small world: d2 is negated by d4.
WORLD = [
    delta(
        "d1",
        10,
        author="alice",
        system="s1",
        pointers=(Pointer("n", Reference("e1", "person")),),
    ),
    delta(
        "d2",
        20,
        author="bob",
        system="s2",
        pointers=(Pointer("n", Reference("e2", "place")), Pointer("v", 5)),
    ),
    delta("d3", 30, author="alice", system="s2", pointers=(Pointer("friend", Reference("e1")),)),
    delta("d4", 40, author="carol", system="s1", pointers=(Pointer("negates", Reference("d2")),)),
]

FILTER_CASES: list[tuple[DeltaFilter | None, list[str]]] = [
    (None, ["d1", "d2", "d3", "d4"]),
    (DeltaFilter(), ["d1", "d3", "d4"]),
    (DeltaFilter(include_negated=False), ["d1", "d3", "d4"]),
    (DeltaFilter(include_negated=True), ["d1", "d2", "d3", "d4"]),
    (DeltaFilter(ids=("d1", "d3", "zz")), ["d1", "d3"]),
    (DeltaFilter(ids=("d2",)), []),
    (DeltaFilter(ids=("d2",), include_negated=True), ["d2"]),
    (DeltaFilter(ids=()), []),
    (DeltaFilter(authors=("alice",)), ["d1", "d3"]),
    (DeltaFilter(authors=("bob", "carol"), include_negated=True), ["d2", "d4"]),
    (DeltaFilter(authors=()), []),
    (DeltaFilter(systems=("s1",)), ["d1", "d4"]),
    (DeltaFilter(systems=("s2",)), ["d3"]),
    (DeltaFilter(authors=("alice",), systems=("s2",)), ["d3"]),
    (DeltaFilter(timestamp_range=TimestampRange(start=20, end=30)), ["d3"]),
    (
        DeltaFilter(timestamp_range=TimestampRange(start=20, end=30), include_negated=True),
        ["d2", "d3"],
    ),
    (DeltaFilter(timestamp_range=TimestampRange(start=30)), ["d3", "d4"]),
    (DeltaFilter(timestamp_range=TimestampRange(end=10)), ["d1"]),
    (DeltaFilter(timestamp_range=TimestampRange(start=10.5, end=39.5)), ["d3"]),
    (DeltaFilter(target_ids=("e1",)), ["d1", "d3"]),
    (DeltaFilter(target_ids=("d2",)), ["d4"]),
    (DeltaFilter(target_ids=("e2",)), []),
    (DeltaFilter(target_ids=("e2",), include_negated=True), ["d2"]),
    (DeltaFilter(target_ids=()), []),
    (DeltaFilter(target_contexts=("person", "place")), ["d1"]),
    (DeltaFilter(target_contexts=("person", "place"), include_negated=True), ["d1", "d2"]),
    (DeltaFilter(target_contexts=()), []),
    (DeltaFilter(target_ids=("e1",), target_contexts=("person",)), ["d1"]),
    (DeltaFilter(ids=("d1", "d2", "d3"), authors=("alice", "bob"), systems=("s2",)), ["d3"]),
]


@pytest.mark.parametrize(("flt", "expected"), FILTER_CASES)
@pytest.mark.parametrize("order", ["sequence", "timestamp"])
def test_filters(
    store: Store, flt: DeltaFilter | None, expected: list[str], order: ScanOrder
) -> None:
    store.put_many(WORLD)
    assert ids(store.scan(filter=flt, order=order)) == expected
    assert ids(scan_all(store, filter=flt, order=order, limit=1)) == expected
    assert store.count(flt) == len(expected)


def test_count_with_from_timestamp(store: Store) -> None:
    store.put_many(WORLD)
    assert store.count() == 4
    assert store.count(from_timestamp=20) == 3
    assert store.count(from_timestamp=40.5) == 0
    assert store.count(DeltaFilter(), from_timestamp=20) == 2
    assert store.count(DeltaFilter(include_negated=True), from_timestamp=20) == 3
    assert store.count(DeltaFilter(authors=("alice",)), from_timestamp=11) == 1
    assert store.count(DeltaFilter(target_ids=("e1",)), from_timestamp=11) == 1
    assert ids(store.scan(filter=DeltaFilter(), from_timestamp=20)) == ["d3", "d4"]


def test_long_id_lists(store: Store) -> None:
    store.put_many([delta(f"d{i}", i + 1) for i in range(50)])
    wanted = tuple(f"d{i}" for i in range(0, 2000, 3))  # more ids than bound parameters
    expected = [f"d{i}" for i in range(0, 50, 3)]
    assert ids(scan_all(store, filter=DeltaFilter(ids=wanted), limit=4)) == expected
    assert store.count(DeltaFilter(ids=wanted)) == len(expected)
    with_nul = (*wanted, "x\x00y")  # SQLite's JSON functions cannot carry NUL
    assert ids(scan_all(store, filter=DeltaFilter(ids=with_nul), limit=4)) == expected
    assert store.count(DeltaFilter(ids=with_nul)) == len(expected)
    authors = tuple(f"author{i}" for i in range(600))
    assert store.count(DeltaFilter(authors=(*authors, "alice"))) == 50


def test_filters_checked_in_python_span_many_pages(store: Store) -> None:
    base = [
        delta(f"d{i:04}", 1 + i % 17, pointers=(Pointer("n", Reference(f"e{i % 50}")),))
        for i in range(900)
    ]
    negations = [negation(f"n{i:04}", f"d{i:04}", 5) for i in range(0, 900, 2)]
    deltas = base + negations
    store.put_many(deltas)
    index = NegationIndex(deltas)
    cases = [
        DeltaFilter(target_ids=("e49",)),
        DeltaFilter(target_ids=("e49",), include_negated=True),
        DeltaFilter(),
        DeltaFilter(authors=("alice",), timestamp_range=TimestampRange(start=3, end=9)),
        DeltaFilter(ids=tuple(f"d{i:04}" for i in range(0, 900, 5))),
    ]
    for flt in cases:
        for order in ("sequence", "timestamp"):
            expected = [
                (seq, d)
                for seq, d in enumerate(deltas, start=1)
                if d.timestamp >= 4 and flt.matches(d, index.is_negated)
            ]
            if order == "timestamp":
                expected.sort(key=lambda pair: (pair[1].timestamp, pair[0]))
            got = scan_all(store, filter=flt, from_timestamp=4, order=order, limit=3)
            assert got == expected
            assert store.count(flt, from_timestamp=4) == len(expected)
    only_last = DeltaFilter(ids=("d0899",), include_negated=True)
    assert store.scan(filter=only_last, limit=1) == [(900, deltas[899])]
    assert store.scan(filter=DeltaFilter(target_ids=("e49",)), limit=1) == [(50, deltas[49])]


# --- negation -------------------------------------------------------------------------------


def test_double_and_triple_negation(store: Store) -> None:
    store.put(delta("a", 1))
    assert not store.is_negated("a")
    store.put(negation("n1", "a", 2))
    assert store.is_negated("a")
    assert ids(store.scan(filter=DeltaFilter())) == ["n1"]
    store.put(negation("n2", "n1", 3))
    assert not store.is_negated("a")
    assert store.is_negated("n1")
    assert ids(store.scan(filter=DeltaFilter())) == ["a", "n2"]
    assert ids(store.scan(filter=DeltaFilter(include_negated=True))) == ["a", "n1", "n2"]
    store.put(negation("n3", "n2", 4))
    assert store.is_negated("a")
    assert ids(store.scan(filter=DeltaFilter(), order="timestamp")) == ["n1", "n3"]
    assert store.count(DeltaFilter()) == 2
    assert store.count(DeltaFilter(include_negated=True)) == 4
    assert store.count() == 4


def test_negation_may_arrive_before_its_target(store: Store) -> None:
    store.put(negation("n", "later"))
    assert store.is_negated("later")
    store.put(delta("later"))
    assert ids(store.scan(filter=DeltaFilter())) == ["n"]


def test_negation_cycles_follow_negation_index(store: Store) -> None:
    deltas = [negation("x", "y"), negation("y", "x"), negation("z", "z"), negation("w", "x")]
    store.put_many(deltas)
    index = NegationIndex(deltas)
    for delta_id in ("x", "y", "z", "w", "nobody"):
        assert store.is_negated(delta_id) == index.is_negated(delta_id), delta_id
    expected = DeltaFilter().select(deltas, index.is_negated)
    assert [d for _, d in store.scan(filter=DeltaFilter())] == expected


def test_deep_negation_chain(store: Store) -> None:
    chain = [delta("c0")] + [negation(f"c{i}", f"c{i - 1}") for i in range(1, 300)]
    store.put_many(chain)
    index = NegationIndex(chain)
    for i in (0, 1, 43, 44, 298, 299):
        assert store.is_negated(f"c{i}") == index.is_negated(f"c{i}")


# --- subscribe ------------------------------------------------------------------------------


def test_subscribe_and_unsubscribe(store: Store) -> None:
    seen: list[tuple[int, str]] = []
    unsubscribe = store.subscribe(lambda seq, d: seen.append((seq, d.id)))
    store.put(delta("a"))
    store.put(delta("a"))
    store.put_many([delta("b"), delta("a"), delta("c")])
    assert seen == [(1, "a"), (2, "b"), (3, "c")]
    unsubscribe()
    unsubscribe()
    store.put(delta("d"))
    assert seen == [(1, "a"), (2, "b"), (3, "c")]


def test_subscriber_sees_the_delta_stored(store: Store) -> None:
    found: list[Delta | None] = []
    store.subscribe(lambda seq, d: found.append(store.get(d.id)))
    store.put(delta("a", 2))
    assert found == [delta("a", 2)]


def test_failing_subscriber_does_not_stop_the_others(store: Store) -> None:
    seen: list[int] = []

    def fail(seq: int, d: Delta) -> None:
        raise RuntimeError("boom")

    store.subscribe(fail)
    store.subscribe(lambda seq, d: seen.append(seq))
    with pytest.raises(RuntimeError, match="boom"):
        store.put(delta("a"))
    assert seen == [1]
    assert "a" in store


# --- meta and factory -----------------------------------------------------------------------


def test_meta(store: Store) -> None:
    assert store.get_meta("system_id") is None
    store.set_meta("system_id", "node-1")
    store.set_meta("system_id", "node-2")
    assert store.get_meta("system_id") == "node-2"


def test_open_store(tmp_path: Path) -> None:
    assert isinstance(open_store("memory"), MemoryStore)
    with open_store("sqlite", str(tmp_path / "f.db")) as s:
        assert isinstance(s, SQLiteStore)
    with pytest.raises(ValueError, match="needs a path"):
        open_store("sqlite")
    with pytest.raises(ValueError, match="needs a path"):
        open_store("sqlite", "")
    with pytest.raises(ValueError, match="unknown storage"):
        open_store("redis")  # type: ignore[arg-type]


# --- stored text and timestamp order -------------------------------------------------------


def test_scan_raw_gives_the_canonical_text_and_the_timestamp_as_given(store: Store) -> None:
    given = [
        delta("i", 3, pointers=(Pointer("n", Reference("e", "c")), Pointer("v", 1.5))),
        delta("f", 3.0, author='b\u00e9"q'),
        delta("h", 2.5),
        delta("max", 2**53 - 1),
        delta("tiny", 1e-300),
    ]
    store.put_many(given)
    for order, seqs in (("sequence", [1, 2, 3, 4, 5]), ("timestamp", [5, 3, 1, 2, 4])):
        raw = store.scan_raw(order=order)  # type: ignore[arg-type]
        assert [seq for seq, _, _ in raw] == seqs
        for seq, timestamp, text in raw:
            kept = given[seq - 1]
            assert text == msgspec.json.encode(kept)
            assert timestamp == kept.timestamp
            assert type(timestamp) is type(kept.timestamp)
    # 3 and 3.0 are equal: the tie is broken by sequence number, whatever the type
    assert [r[0] for r in store.scan_raw(order="timestamp", after=(3, 1))] == [2, 4]
    assert [r[0] for r in store.scan_raw(order="timestamp", after=(3.0, 2))] == [4]
    assert [r[0] for r in store.scan_raw(order="timestamp", after=(2.5, 3))] == [1, 2, 4]
    assert [r[0] for r in store.scan_raw(from_timestamp=3.0)] == [1, 2, 4]
    assert store.count(from_timestamp=3) == 3
    exactly_three = DeltaFilter(timestamp_range=TimestampRange(start=3.0, end=3))
    assert ids(store.scan(filter=exactly_three, order="timestamp")) == ["i", "f"]
    assert ids(store.scan(filter=DeltaFilter(authors=('b\u00e9"q',)))) == ["f"]


def _timestamp(rng: random.Random, i: int) -> float:
    """Mostly rising, sometimes late or equal to earlier ones; ints and floats mixed."""
    base = rng.choice([10 + i, 10 + i, rng.randint(1, 30), 1])
    kind = rng.random()
    return float(base) if kind < 0.3 else base + 0.5 if kind < 0.4 else base


@pytest.mark.parametrize("seed", range(4))
def test_timestamp_order_stays_right_as_deltas_arrive_around_the_first_timestamp_scan(
    store: Store, seed: int
) -> None:
    rng = random.Random(seed)
    given: list[Delta] = []
    for round_ in range(6):
        batch = [
            delta(f"d{len(given) + k:03}", _timestamp(rng, len(given) + k))
            for k in range(rng.randint(0, 40))
        ]
        if rng.random() < 0.5:
            store.put_many(batch)
        else:
            for d in batch:
                store.put(d)
        given.extend(batch)
        if round_ == 0 and seed % 2:
            continue  # some timestamp orders are first needed after several rounds of puts
        expected = sorted(enumerate(given, start=1), key=lambda pair: (pair[1].timestamp, pair[0]))
        if seed < 2:  # a count builds the order first, or a scan does
            assert store.count(from_timestamp=15) == sum(d.timestamp >= 15 for d in given)
        assert scan_all(store, order="timestamp", limit=rng.randint(1, 50)) == expected
        assert store.count(from_timestamp=15.5) == sum(d.timestamp >= 15.5 for d in given)
        raw = store.scan_raw(order="timestamp", limit=len(given) + 1)
        assert [(seq, ts) for seq, ts, _ in raw] == [(seq, d.timestamp) for seq, d in expected]


# --- MemoryStore only -----------------------------------------------------------------------


def test_memory_store_hands_back_the_text_it_kept() -> None:
    store = MemoryStore()
    given = delta("a", 5, pointers=(Pointer("v", 0.1), Pointer("negates", Reference("z"))))
    store.put(given)
    [(seq, timestamp, text)] = store.scan_raw()
    assert (seq, timestamp, text) == (1, 5, msgspec.json.encode(given))
    # the same bytes object every time, whichever path found it: kept, never encoded again
    for flt in (None, DeltaFilter(), DeltaFilter(authors=("alice",)), DeltaFilter(ids=("a",))):
        for order in ("sequence", "timestamp"):
            [(_, _, again)] = store.scan_raw(filter=flt, order=order)  # type: ignore[arg-type]
            assert again is text
    assert store.get("a") == given


def _typical(i: int) -> Delta:
    """A delta like the benchmarks' (about 270 bytes of JSON)."""
    return Delta(
        id=f"delta-{i:08d}",
        timestamp=1_795_624_086_443 + i,
        author="server-author",
        system="ref-server-001",
        pointers=(
            Pointer("movie", Reference(f"movie-{i % 97}", "reviews")),
            Pointer("text", f"great great great review #{i}"),
            Pointer("rating", i % 5 + 1),
        ),
    )


def test_memory_store_keeps_the_text_and_no_delta_objects() -> None:
    deltas = [_typical(i) for i in range(3000)]
    refcounts = [sys.getrefcount(d) for d in deltas]
    store = MemoryStore()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store.put_many(deltas[:1500], validate=False)
        store.put_many(deltas[1500:])  # nor the copies validation makes
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # no reference to a delta it was given
    assert [sys.getrefcount(d) for d in deltas] == refcounts
    # per delta: its text, its id and some 100 bytes of indexes (a kept Delta adds ~700 bytes)
    text_bytes = sum(len(msgspec.json.encode(d)) for d in deltas)
    assert kept < text_bytes + 300 * len(deltas)
    assert store.get("delta-00002999") == deltas[-1]


# --- SQLite only ----------------------------------------------------------------------------


def test_sqlite_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as first:
        first.put_many([delta("a", 5), negation("n1", "a", 6), negation("n2", "n1", 7)])
        first.put(delta("b", 2**40))
        first.put(negation("n3", "b"))
        first.set_meta("system_id", "node-7")
    with SQLiteStore(path, synchronous="NORMAL") as second:
        assert len(second) == 5
        assert second.last_sequence() == 5
        assert second.get_meta("system_id") == "node-7"
        assert not second.is_negated("a")
        assert second.is_negated("n1")
        assert second.is_negated("b")
        assert ids(second.scan(filter=DeltaFilter())) == ["a", "n2", "n3"]
        stored = second.get("b")
        assert stored is not None and type(stored.timestamp) is int
        assert second.put(delta("a")) is None
        assert second.put(delta("c")) == 6
    with SQLiteStore(path) as third:
        assert third.last_sequence() == 6
        assert ids(third.scan(after=5)) == ["c"]


def test_sqlite_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as s:
        s.put(negation("n", "a", 3))
        assert s.path == str(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        row = conn.execute("SELECT seq, id, timestamp, author, system FROM deltas").fetchone()
        assert row == (1, "n", 3.0, "alice", "s1")
        assert conn.execute("SELECT target, negator FROM negations").fetchall() == [("a", "n")]
    finally:
        conn.close()


def test_sqlite_rejects_bad_options_and_newer_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]
    path = tmp_path / "newer.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(ValueError, match="newer"):
        SQLiteStore(path)


def test_sqlite_closed_store_fails(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "c.db")
    s.close()
    s.close()
    with pytest.raises(sqlite3.ProgrammingError):
        s.put(delta("a"))


CRASH_CHILD = """
import sys
from rhizome_proto import Delta, Pointer, Reference
from rhizome_adapters.storage import SQLiteStore

store = SQLiteStore(sys.argv[1])
batch = int(sys.argv[2])
i = 0
while True:
    deltas = []
    for _ in range(batch):
        pointers = (Pointer("negates", Reference(f"d{i - 1}")),) if i % 10 == 9 else ()
        deltas.append(Delta(id=f"d{i}", timestamp=1 + i, author="a", system="s", pointers=pointers))
        i += 1
    seqs = store.put_many(deltas) if batch > 1 else [store.put(deltas[0])]
    print(" ".join(str(seq) for seq in seqs), flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("batch", [1, 7])
def test_sqlite_survives_sigkill(tmp_path: Path, batch: int) -> None:
    path = tmp_path / "crash.db"
    with subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(path), str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        lines: list[str] = []
        while len(lines) < 150:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(child.pid, signal.SIGKILL)
        rest, err = child.communicate(timeout=30)
    assert len(lines) == 150, err
    lines += rest.splitlines(keepends=True)
    returned = [int(seq) for line in lines if line.endswith("\n") for seq in line.split()]
    assert returned == list(range(1, len(returned) + 1))

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    with SQLiteStore(path) as reopened:
        stored = len(reopened)
        assert stored % batch == 0  # a batch is all or nothing
        assert len(returned) <= stored <= len(returned) + batch
        assert reopened.last_sequence() == stored
        for seq in returned:
            [(got_seq, got)] = reopened.scan(after=seq - 1, limit=1)
            assert (got_seq, got.id, got.timestamp) == (seq, f"d{seq - 1}", seq)
        assert reopened.is_negated("d8")
        assert reopened.put(delta("after-crash")) == stored + 1


# --- property: both stores agree with filtering a list in Python ----------------------------

ID_POOL = ["a", "b", "c", "d", "e", "f"]
TIMESTAMPS = st.one_of(st.integers(1, 4), st.sampled_from([1.0, 2.5, 3.0, 4.5]))
REFERENCES = st.builds(
    Reference,
    id=st.sampled_from([*ID_POOL, "x"]),
    context=st.sampled_from([None, "c1", "c2"]),
)
POINTERS = st.builds(
    Pointer,
    role=st.sampled_from(["negates", "negates", "name", "rel"]),
    target=st.one_of(REFERENCES, st.sampled_from(["v", 7, 1.5, True])),
)
DELTAS = st.builds(
    Delta,
    id=st.sampled_from(ID_POOL),
    timestamp=TIMESTAMPS,
    author=st.sampled_from(["al", "bo", "cy"]),
    system=st.sampled_from(["s1", "s2"]),
    pointers=st.lists(POINTERS, max_size=3).map(tuple),
)


def _maybe_tuple(values: list[str]) -> st.SearchStrategy[tuple[str, ...] | None]:
    return st.one_of(st.none(), st.lists(st.sampled_from(values), max_size=3).map(tuple))


FILTERS = st.one_of(
    st.none(),
    st.builds(
        DeltaFilter,
        ids=_maybe_tuple([*ID_POOL, "zz"]),
        target_ids=_maybe_tuple([*ID_POOL, "x"]),
        target_contexts=_maybe_tuple(["c1", "c2", "c3"]),
        authors=_maybe_tuple(["al", "bo", "cy"]),
        systems=_maybe_tuple(["s1", "s2"]),
        timestamp_range=st.one_of(
            st.none(),
            st.builds(
                TimestampRange,
                start=st.one_of(st.none(), TIMESTAMPS),
                end=st.one_of(st.none(), TIMESTAMPS),
            ),
        ),
        include_negated=st.sampled_from([None, False, True]),
    ),
)


def _expected(
    deltas: list[Delta], flt: DeltaFilter | None, from_timestamp: float, order: ScanOrder
) -> list[tuple[int, Delta]]:
    unique: dict[str, Delta] = {}
    for d in deltas:
        unique.setdefault(d.id, d)
    stored = list(enumerate(unique.values(), start=1))
    index = NegationIndex(unique.values())
    out = [
        (seq, d)
        for seq, d in stored
        if d.timestamp >= from_timestamp and (flt is None or flt.matches(d, index.is_negated))
    ]
    if order == "timestamp":
        out.sort(key=lambda pair: (pair[1].timestamp, pair[0]))
    return out


def _check_agreement(
    deltas: list[Delta],
    flt: DeltaFilter | None,
    from_timestamp: float,
    order: ScanOrder,
    limit: int,
    one_by_one: bool,
) -> None:
    expected = _expected(deltas, flt, from_timestamp, order)
    index = NegationIndex({d.id: d for d in reversed(deltas)}.values())
    with tempfile.TemporaryDirectory() as directory:
        opened: list[Callable[[], Store]] = [
            MemoryStore,
            lambda: SQLiteStore(Path(directory) / "p.db", synchronous="NORMAL"),
        ]
        for open_ in opened:
            with open_() as s:
                if one_by_one:
                    for d in deltas:
                        s.put(d)
                else:
                    s.put_many(deltas)
                got = scan_all(
                    s, order=order, limit=limit, filter=flt, from_timestamp=from_timestamp
                )
                assert got == expected, type(s).__name__
                assert s.count(flt, from_timestamp=from_timestamp) == len(expected)
                for delta_id in ID_POOL:
                    assert s.is_negated(delta_id) == index.is_negated(delta_id)


AGREEMENT_ARGS: dict[str, st.SearchStrategy[Any]] = {
    "flt": FILTERS,
    "from_timestamp": st.sampled_from([0, 2, 2.5]),
    "order": st.sampled_from(["sequence", "timestamp"]),
    "limit": st.integers(1, 4),
    "one_by_one": st.booleans(),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas=st.lists(DELTAS, max_size=12), **AGREEMENT_ARGS)
def test_stores_agree_with_python_filtering(
    deltas: list[Delta],
    flt: DeltaFilter | None,
    from_timestamp: float,
    order: ScanOrder,
    limit: int,
    one_by_one: bool,
) -> None:
    _check_agreement(deltas, flt, from_timestamp, order, limit, one_by_one)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas=st.lists(DELTAS, max_size=40), **AGREEMENT_ARGS)
def test_stores_agree_with_python_filtering_at_length(
    deltas: list[Delta],
    flt: DeltaFilter | None,
    from_timestamp: float,
    order: ScanOrder,
    limit: int,
    one_by_one: bool,
) -> None:
    _check_agreement(deltas, flt, from_timestamp, order, limit, one_by_one)


def test_put_many_validates_unless_told_the_deltas_are_known_valid(store: Store) -> None:
    bad = Delta(id="bad", timestamp=1, author="", system="s")
    with pytest.raises(InvalidDeltaError, match="author"):
        store.put_many([delta("ok-1"), bad])
    assert len(store) == 0  # nothing stored when one is invalid
    # the node passes validate=False for deltas the codec already checked: no second check
    assert store.put_many([delta("ok-1"), delta("ok-2")], validate=False) == [1, 2]
    assert store.put_many([delta("ok-2")], validate=False) == [None]
