"""The node's two streams from the store, alone: ``SyncServer`` (serving an initial sync) and
``PushCatchUp`` (offering a peer what it may have missed), over a real ``MemoryStore``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_adapters.storage import MemoryStore
from rhizome_proto import Delta, DeltaFilter, Pointer, TimestampRange
from rhizome_proto._codec import encode_value
from rhizome_proto._serving import PushCatchUp, PushState, ServedBatch, ServeState, SyncServer
from tests.harness import make_delta

BIG = 1 << 30  # no byte limit


def padded(delta_id: str, size: int = 10, timestamp: int = 1_000, author: str = "a") -> Delta:
    """A delta whose JSON text is about ``size`` bytes more than a small one."""
    return make_delta(
        delta_id,
        timestamp=timestamp,
        author=author,
        pointers=(Pointer(role="text", target="x" * size),),
    )


def length(delta: Delta) -> int:
    """What a delta weighs in a batch (its text and a comma)."""
    return len(encode_value(delta)) + 1


def serve(store: MemoryStore, **options: object) -> SyncServer:
    options.setdefault("batch_size", 10)
    options.setdefault("max_batch_bytes", BIG)
    options.setdefault("max_delta_bytes", BIG)
    return SyncServer(store, **options)  # type: ignore[arg-type]


def drain(server: SyncServer) -> list[ServedBatch]:
    batches = []
    while server.streaming:
        batches.append(server.next_batch())
    return batches


def ids(batch: ServedBatch) -> list[str]:
    return [json.loads(bytes(raw))["id"] for raw in batch.deltas]


# ---------------------------------------------------------------------- SyncServer


def test_batches_by_count_oldest_first_the_last_one_flagged() -> None:
    store = MemoryStore()
    store.put_many([padded(f"d{i:02}", timestamp=2_000 - i) for i in range(25)])  # newest first
    server = serve(store)
    assert server.state is ServeState.STREAMING and server.total == 25 and server.sent == 0
    batches = drain(server)
    assert [len(b.deltas) for b in batches] == [10, 10, 5]
    assert [b.last for b in batches] == [False, False, True]
    assert all(b.send and b.cursor is None and b.too_large == [] for b in batches)
    assert [i for b in batches for i in ids(b)] == [f"d{i:02}" for i in reversed(range(25))]
    assert server.state is ServeState.DONE and server.sent == 25
    with pytest.raises(RuntimeError):
        server.next_batch()


def test_batches_by_bytes_hold_at_least_one_delta() -> None:
    store = MemoryStore()
    deltas = [padded("a", 400, 1), padded("b", 400, 2), padded("c", 400, 3), padded("d", 2_000, 4)]
    store.put_many(deltas)
    server = serve(store, max_batch_bytes=2 * length(deltas[0]))  # two small, or one big
    assert [ids(b) for b in drain(server)] == [["a", "b"], ["c"], ["d"]]


def test_an_empty_sync_is_one_last_batch_not_sent() -> None:
    server = serve(MemoryStore())
    assert server.total == 0
    [batch] = drain(server)
    assert (batch.deltas, batch.send, batch.last) == ([], False, True)


def test_too_large_deltas_are_skipped_and_handed_back() -> None:
    store = MemoryStore()
    small, huge = padded("small", 10, 1), padded("huge", 5_000, 2)
    store.put_many([small, huge])
    server = serve(store, batch_size=1, max_delta_bytes=1_000)
    assert server.total == 2  # counted, though it will not go
    first, second = drain(server)
    assert ids(first) == ["small"] and not first.last
    # only the too large one was left: an empty last batch closes a sync that sent some
    assert (second.deltas, second.send, second.last) == ([], True, True)
    assert second.too_large == [encode_value(huge).encode()]
    assert server.sent == 1


def test_cursor_streams_in_storage_order_and_resumes_after_a_position() -> None:
    store = MemoryStore()
    store.put_many([padded(f"d{i}", timestamp=100 - i) for i in range(7)])
    server = serve(store, cursor=True, store_id="S", batch_size=3)
    batches = drain(server)
    assert [ids(b) for b in batches] == [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["d6"]]
    assert [b.cursor for b in batches] == ["S:3", "S:6", "S:7"]
    resumed = serve(store, cursor=True, store_id="S", after=5, batch_size=3)
    assert resumed.total == 2
    [batch] = drain(resumed)
    assert ids(batch) == ["d5", "d6"] and batch.cursor == "S:7"


def test_an_empty_cursor_sync_says_where_the_store_is() -> None:
    store = MemoryStore()
    store.put_many([padded("d0")])
    [batch] = drain(serve(store, cursor=True, store_id="S", after=1))
    assert (batch.send, batch.cursor) == (False, "S:1")


def test_several_filters_are_all_applied_and_counted() -> None:
    store = MemoryStore()
    store.put_many(
        [padded(f"d{i}", timestamp=i, author="alice" if i % 2 else "bob") for i in range(1, 21)]
    )
    alice = DeltaFilter(authors=("alice",))
    recent = DeltaFilter(timestamp_range=TimestampRange(start=11))
    server = serve(store, filters=(alice, recent), batch_size=4)
    assert server.total == 5
    assert [i for b in drain(server) for i in ids(b)] == ["d11", "d13", "d15", "d17", "d19"]


def test_from_timestamp() -> None:
    store = MemoryStore()
    store.put_many([padded(f"d{i}", timestamp=i) for i in range(1, 10)])
    server = serve(store, from_timestamp=7)
    assert server.total == 3
    assert [i for b in drain(server) for i in ids(b)] == ["d7", "d8", "d9"]


def test_abort_ends_a_streaming_sync_only() -> None:
    store = MemoryStore()
    store.put_many([padded(f"d{i}") for i in range(3)])
    server = serve(store, batch_size=1)
    server.next_batch()
    server.abort()
    assert server.state is ServeState.ABORTED and not server.streaming and server.sent == 1
    done = serve(MemoryStore())
    drain(done)
    done.abort()
    assert done.state is ServeState.DONE


@given(
    sizes=st.lists(st.integers(0, 3_000), max_size=40),
    batch_size=st.integers(1, 12),
    max_batch_bytes=st.integers(1, 8_000),
    cursor=st.booleans(),
)
def test_batches_cover_the_store_within_their_bounds(
    sizes: list[int], batch_size: int, max_batch_bytes: int, cursor: bool
) -> None:
    store = MemoryStore()
    deltas = [padded(f"d{i:02}", size, timestamp=i + 1) for i, size in enumerate(sizes)]
    store.put_many(deltas)
    max_delta = 2_500
    server = serve(
        store,
        cursor=cursor,
        store_id="S",
        batch_size=batch_size,
        max_batch_bytes=max_batch_bytes,
        max_delta_bytes=max_delta,
    )
    batches = drain(server)
    fits = [d for d in deltas if length(d) <= max_delta]
    assert [i for b in batches for i in ids(b)] == [d.id for d in fits]
    assert [t for b in batches for t in b.too_large] == [
        encode_value(d).encode() for d in deltas if length(d) > max_delta
    ]
    assert [b.last for b in batches] == [False] * (len(batches) - 1) + [True]
    for batch in batches:
        assert len(batch.deltas) <= batch_size
        weight = sum(len(bytes(raw)) + 1 for raw in batch.deltas)
        assert weight <= max_batch_bytes or len(batch.deltas) == 1
        assert batch.send == bool(batch.deltas) or (batch.last and server.sent > 0)
    assert server.total == len(deltas) and server.sent == len(fits)
    if cursor:
        assert batches[-1].cursor == f"S:{len(deltas)}"


# ---------------------------------------------------------------------- PushCatchUp


def stored(n: int) -> MemoryStore:
    store = MemoryStore()
    store.put_many([padded(f"d{i}") for i in range(1, n + 1)])
    return store


def test_catch_up_offers_the_range_a_page_at_a_time_then_idles() -> None:
    store = stored(10)
    push = PushCatchUp()
    assert push.state is PushState.IDLE and push.take(store, 5) == []
    push.start(3, 8)
    assert push.active and push.remaining == 5
    assert [d.id for d in push.take(store, 3)] == ["d4", "d5", "d6"]
    assert push.active and push.remaining == 2
    assert [d.id for d in push.take(store, 3)] == ["d7", "d8"]  # not past upto
    assert push.state is PushState.IDLE and push.remaining == 0


def test_nothing_to_catch_up_stays_idle() -> None:
    push = PushCatchUp()
    push.start(5, 5)
    assert push.state is PushState.IDLE


def test_an_overflow_catches_up_from_its_delta_and_extends_with_new_ones() -> None:
    store = stored(6)
    push = PushCatchUp()
    push.overflow(4)
    push.extend(3)  # never backwards
    assert (push.after, push.upto) == (3, 4)
    push.extend(6)
    assert [d.id for d in push.take(store, 10)] == ["d4", "d5", "d6"]
    assert push.state is PushState.IDLE


def test_catch_up_ends_when_the_store_has_nothing_more() -> None:
    push = PushCatchUp()
    push.start(0, 5)  # the store lost its deltas (a new empty store)
    assert push.take(MemoryStore(), 10) == [] and push.state is PushState.IDLE


@given(
    n=st.integers(0, 40),
    start=st.integers(0, 40),
    steps=st.lists(st.one_of(st.integers(1, 7), st.just(0)), max_size=30),
)
def test_catch_up_offers_each_position_once_in_order(n: int, start: int, steps: list[int]) -> None:
    """Steps: ``0`` stores a new delta (which extends the catch-up), ``k > 0`` takes ``k``."""
    store = stored(n)
    push = PushCatchUp()
    first = min(start, n)
    push.start(first, n)
    offered: list[str] = []
    covered = n  # the last position the catch-up was asked to reach
    for step in steps:
        if step == 0:
            (seq,) = store.put_many([padded(f"d{store.last_sequence() + 1}")])
            assert seq is not None
            if push.active:
                push.extend(seq)
                covered = seq
            continue
        page = push.take(store, step)
        assert len(page) <= step
        offered.extend(d.id for d in page)
    while push.active:
        offered.extend(d.id for d in push.take(store, 5))
    # exactly the range asked, in order, once; what was stored after it ended is not offered
    assert offered == [f"d{i}" for i in range(first + 1, covered + 1)]
