"""The hot path of a node: group commit, stored wire text, batches bounded by bytes, events only
where asked for. Pure node tests over :class:`tests.node_sim.Network` and real stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_adapters.storage import MemoryStore, SQLiteStore
from rhizome_proto import (
    Delta,
    DeltaFilter,
    DeltaStore,
    ErrorCode,
    FederationNode,
    FederationProtocol,
    InvalidDeltaError,
    LinkConfig,
    Pointer,
    create_author_trust_policy,
)
from rhizome_proto._codec import encode_value
from tests.harness import make_delta
from tests.node_sim import Network
from tests.strategies import deterministic
from tests.test_node import FailingStore, RecordingStore


def hub_with_two_spokes(store: DeltaStore, extensions: tuple[str, ...] = ()) -> Network:
    """v1 links by default: one ``delta_ack`` per delta shows when each is acknowledged."""
    net = Network()
    net.add_node("hub", store=store, extensions=extensions)
    for spoke in ("a", "b"):
        net.add_node(spoke, extensions=extensions)
        net.connect(spoke, "hub", LinkConfig(initial_sync="none"))
    net.deliver()
    return net


def stage_from(net: Network, spoke: str) -> FederationProtocol:
    """What an adapter does with one link in a read cycle: feed what the spoke sent to the
    hub's connection and stage it (no commit); that connection."""
    (ch,) = net.between(spoke, "hub")
    conn = net.conn(ch, "server")
    for text in ch.up:
        conn.receive_message(text, net.now)
    ch.up.clear()
    assert ch.server_link_id is not None
    net.node("hub").stage(ch.server_link_id)
    return conn


# ---------------------------------------------------------------------- group commit


def test_one_transaction_for_what_every_link_brought_and_acks_only_after_it() -> None:
    store = RecordingStore(MemoryStore())
    net = hub_with_two_spokes(store)
    hub = net.node("hub")
    store.writes.clear()
    a = net.author("a", delta_id="from-a")
    b = net.author("b", delta_id="from-b")
    net.send_pending()
    # what an adapter does in one read cycle: feed each link, stage, then commit once
    links = [stage_from(net, spoke) for spoke in ("a", "b")]
    assert hub.staged == 2
    assert all("delta_ack" not in "".join(c.messages_to_send()) for c in links)
    assert a.id not in store and b.id not in store
    events = hub.commit()
    assert store.writes == [([a.id, b.id], {})]
    assert hub.staged == 0
    assert {e.delta.id for e in events if e.type == "delta:received" and e.delta} == {a.id, b.id}
    for conn, delta, other in zip(links, (a, b), (b, a), strict=True):
        sent = [json.loads(t) for t in conn.messages_to_send()]
        assert [m["deltaId"] for m in sent if m["type"] == "delta_ack"] == [delta.id]
        assert [m["delta"]["id"] for m in sent if m["type"] == "delta"] == [other.id]  # relayed


def test_with_live_batching_one_cumulative_ack_follows_the_commit() -> None:
    store = RecordingStore(MemoryStore())
    net = hub_with_two_spokes(store, extensions=("batch", "credit"))
    hub = net.node("hub")
    made = [net.author("a", delta_id=f"a{i}") for i in range(5)]
    net.send_pending()
    (ch,) = net.between("a", "hub")
    assert len(ch.up) == 1  # five deltas, one message
    conn = stage_from(net, "a")
    assert [m for m in conn.messages_to_send() if "deltas_ack" in m] == []
    store.writes.clear()
    hub.commit()
    assert store.writes == [([d.id for d in made], {})]
    acks = [json.loads(m) for m in conn.messages_to_send() if "deltas_ack" in m]
    assert [m["upTo"] for m in acks] == [5]


def test_a_delta_from_two_links_in_one_cycle_is_stored_once_and_acked_on_both() -> None:
    store = RecordingStore(MemoryStore())
    net = hub_with_two_spokes(store)
    hub = net.node("hub")
    twin = make_delta("twin", system="elsewhere")
    conns = []
    for spoke in ("a", "b"):
        (ch,) = net.between(spoke, "hub")
        net.node(spoke).send_delta(ch.link_id, twin)
        net.send_pending()
        conns.append(stage_from(net, spoke))
    store.writes.clear()
    events = hub.commit()
    assert store.writes == [(["twin", "twin"], {})]
    assert len(store) == 1
    assert [e.type for e in events].count("delta:received") == 1
    for conn in conns:
        sent = [json.loads(t) for t in conn.messages_to_send()]
        assert [m["deltaId"] for m in sent if m["type"] == "delta_ack"] == ["twin"]


def test_the_sync_cursor_is_saved_in_the_transaction_of_its_batch(tmp_path: Path) -> None:
    server = SQLiteStore(tmp_path / "server.db")
    server.put_many([make_delta(f"d{i}", timestamp=1_000 + i) for i in range(250)])
    client = RecordingStore(SQLiteStore(tmp_path / "client.db"))
    net = Network()
    net.add_node("server", store=server, batch_size=100)
    net.add_node("client", store=client)
    net.connect("client", "server")
    net.deliver()
    assert len(client) == 250
    batches = [(ids, meta) for ids, meta in client.writes if ids]
    assert [len(ids) for ids, _ in batches] == [100, 100, 50]
    cursors = [meta for _, meta in batches]
    assert all(len(meta) == 1 and next(iter(meta)).startswith("sync_cursor:") for meta in cursors)
    key = next(iter(cursors[-1]))
    assert client.get_meta(key) == cursors[-1][key]
    assert cursors[-1][key].endswith(":250")


def test_a_failed_commit_acks_nothing_and_keeps_what_it_could_not_store() -> None:
    store = FailingStore(MemoryStore())
    net = hub_with_two_spokes(store)
    hub = net.node("hub")
    delta = net.author("a", delta_id="late")
    net.send_pending()
    conn = stage_from(net, "a")
    store.failing = True
    with pytest.raises(OSError, match="disk full"):
        hub.commit()
    assert conn.messages_to_send() == []
    assert hub.staged == 1
    store.failing = False
    hub.commit()
    assert delta.id in store
    assert [json.loads(t)["deltaId"] for t in conn.messages_to_send()] == [delta.id]


def test_received_deltas_are_reported_one_by_one_only_when_asked() -> None:
    net = Network()
    server = MemoryStore()
    server.put_many([make_delta(f"d{i}", timestamp=1_000 + i) for i in range(30)])
    net.add_node("server", store=server, batch_size=10)
    client = net.add_node("client")
    client.report_received = False
    net.connect("client", "server")
    net.deliver()
    assert len(net.store("client")) == 30
    assert net.node_events("client", "delta:received") == []
    assert [e.count for e in net.node_events("client", "sync:progress")] == [10, 10, 10]
    client.report_received = True
    net.author("server", delta_id="live")
    net.deliver()
    assert [e.delta.id for e in net.node_events("client", "delta:received") if e.delta] == ["live"]


# ---------------------------------------------------------------------- batches by bytes


def padded(delta_id: str, size: int, timestamp: int = 1_000) -> Delta:
    """A delta whose JSON text is about ``size`` bytes."""
    return make_delta(
        delta_id, timestamp=timestamp, pointers=(Pointer(role="text", target="x" * size),)
    )


def test_sync_batches_are_bounded_by_bytes() -> None:
    server = MemoryStore()
    deltas = [padded(f"d{i:02}", 400, 1_000 + i) for i in range(20)]
    server.put_many(deltas)
    budget = 2 * (len(encode_value(deltas[0])) + 1) + 10  # room for two, not three
    net = Network()
    net.add_node("server", store=server, batch_size=100, max_batch_bytes=budget)
    net.add_node("client")
    net.connect("client", "server")
    net.deliver()
    assert net.ids("client") == {f"d{i:02}" for i in range(20)}
    batches = net.sent("server", "client", "sync_batch")
    assert [len(t.message["deltas"]) for t in batches] == [2] * 10
    for t in batches:
        assert (
            sum(len(json.dumps(d, separators=(",", ":"))) + 1 for d in t.message["deltas"])
            <= budget
        )


def test_a_delta_larger_than_the_batch_budget_goes_alone() -> None:
    server = MemoryStore()
    server.put_many(
        [padded("small-1", 10, 1_000), padded("big", 5_000, 1_001), padded("small-2", 10, 1_002)]
    )
    net = Network()
    net.add_node("server", store=server, max_batch_bytes=1_000)
    net.add_node("client")
    net.connect("client", "server")
    net.deliver()
    assert net.ids("client") == {"small-1", "big", "small-2"}
    batches = net.sent("server", "client", "sync_batch")
    assert [[d["id"] for d in t.message["deltas"]] for t in batches] == [
        ["small-1"],
        ["big"],
        ["small-2"],
    ]


def test_a_delta_too_large_for_any_message_is_reported_once_and_skipped() -> None:
    server = MemoryStore()
    server.put_many([padded("a", 10, 1_000), padded("huge", 20_000, 1_001), padded("b", 10, 1_002)])
    net = Network()
    hub = net.add_node("server", store=server, max_message_size=10_000)
    net.add_node("client")
    net.connect("client", "server")
    steps = net.deliver()
    assert steps < 100
    assert net.ids("client") == {"a", "b"}
    errors = net.node_events("server", "link:error")
    assert [e.delta_id for e in errors] == ["huge"]
    assert "too large" in (errors[0].reason or "")
    assert errors[0].code is ErrorCode.MESSAGE_TOO_LARGE
    (link,) = hub.links
    assert link.stats.deltas_too_large == 1
    (complete,) = net.sent("server", "client", "sync_complete")
    assert complete.message["deltasProcessed"] == 2


# ---------------------------------------------------------------------- stored wire text


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize(
    "flt",
    [
        None,
        DeltaFilter(authors=("a",)),
        DeltaFilter(target_ids=("e-d3", "e-d4")),
        DeltaFilter(),
    ],
)
def test_scan_raw_is_the_canonical_text_of_what_scan_finds(
    tmp_path: Path, kind: str, flt: DeltaFilter | None
) -> None:
    store: DeltaStore = SQLiteStore(tmp_path / "s.db") if kind == "sqlite" else MemoryStore()
    deltas = [
        make_delta(f"d{i}", timestamp=1_000 + (i * 7) % 5, author="ab"[i % 2]) for i in range(10)
    ]
    deltas.append(make_delta("neg", pointers=(Pointer(role="negates", target="d2"),)))
    store.put_many(deltas)
    for order in ("sequence", "timestamp"):
        rows = store.scan(filter=flt, limit=100, order=order)  # type: ignore[arg-type]
        raw = store.scan_raw(filter=flt, limit=100, order=order)  # type: ignore[arg-type]
        assert [(seq, d.timestamp, encode_value(d).encode()) for seq, d in rows] == raw
        if rows:  # keyset continuation: the same position gives the same rest
            after = rows[0][0] if order == "sequence" else (rows[0][1].timestamp, rows[0][0])
            assert (
                [r[0] for r in store.scan_raw(after=after, filter=flt, order=order)]
                == [  # type: ignore[arg-type]
                    seq for seq, _ in rows[1:]
                ]
            )


def test_a_served_sync_writes_the_stored_text_without_decoding(tmp_path: Path) -> None:
    """The server's store hands out its text; decoding it would fail here, so the batch can
    only carry it as it is (a real store's text is always the canonical JSON)."""

    class TextStore(RecordingStore):
        def scan(self, **kwargs: Any) -> Any:
            raise AssertionError("a sync with at most one filter must not decode")

    store = TextStore(SQLiteStore(tmp_path / "s.db"))
    store.inner.put_many([make_delta(f"d{i}", timestamp=1_000 + i) for i in range(5)])
    net = Network()
    net.add_node("server", store=store)
    net.add_node("client")
    net.connect("client", "server", LinkConfig(pull_filter=DeltaFilter(authors=("author-1",))))
    net.deliver()
    assert net.ids("client") == {f"d{i}" for i in range(5)}


def test_node_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        FederationNode("x", MemoryStore(), clock=lambda: 1, max_batch_bytes=0)
    with pytest.raises(ValueError):
        FederationNode("x", MemoryStore(), clock=lambda: 1, max_message_size=0)


# ---------------------------------------------------------------------- bounded queues


@pytest.mark.parametrize("extensions", [(), ("batch", "credit")])
def test_a_link_past_its_queue_bound_catches_up_from_the_store_in_order(
    extensions: tuple[str, ...],
) -> None:
    net = Network()
    hub = net.add_node("server", max_queued=10, extensions=extensions)
    net.add_node("client", extensions=extensions)
    ch = net.connect("client", "server", LinkConfig(initial_sync="none"))
    net.deliver()
    client_link = net.node("client").link(ch.link_id)
    assert client_link is not None
    net.node("client").pause(ch.link_id)
    net.deliver()
    made = [net.author("server", delta_id=f"d{i:03}", timestamp=1_000 + i) for i in range(50)]
    net.deliver()
    assert ch.server_link_id is not None
    link = hub.link(ch.server_link_id)
    assert link is not None and link.conn is not None
    assert link.conn.pending_count == 10  # held while paused, no more
    assert link.stats.overflows == 1
    assert link.catching_up and link.catch_up_remaining == 40  # d010 to d049, from the store
    net.node("client").resume(ch.link_id)
    net.deliver()
    assert net.ids("client") == {d.id for d in made}
    order = [t.message["delta"]["id"] for t in net.sent("server", "client", "delta")]
    order += [d["id"] for t in net.sent("server", "client", "deltas") for d in t.message["deltas"]]
    assert order == [d.id for d in made]
    assert not link.catching_up and link.catch_up_remaining == 0
    # live again once caught up
    late = net.author("server", delta_id="late")
    net.deliver()
    assert late.id in net.store("client")


def test_persist_deltas_is_one_write_and_reports_what_was_known() -> None:
    store = RecordingStore(MemoryStore())
    net = Network(extensions=())
    node = net.add_node("server", store=store)
    net.add_node("client")
    net.connect("client", "server", LinkConfig(initial_sync="none"))
    net.deliver()
    deltas = [make_delta(f"p{i}", system="server") for i in range(5)]
    store.writes.clear()
    assert node.persist_deltas([*deltas[:3], deltas[0]]) == [True, True, True, False]
    assert node.persist_deltas(deltas) == [False, False, False, True, True]
    assert [ids for ids, _ in store.writes] == [
        ["p0", "p1", "p2", "p0"],
        ["p0", "p1", "p2", "p3", "p4"],
    ]
    net.deliver()
    assert net.ids("client") == {d.id for d in deltas}


def test_a_local_delta_too_large_for_any_message_is_refused_before_it_is_stored() -> None:
    node = FederationNode("x", MemoryStore(), clock=lambda: 1, max_message_size=10_000)
    small, huge = padded("small", 10), padded("huge", 20_000)
    with pytest.raises(InvalidDeltaError, match="too large"):
        node.persist_deltas([small, huge])
    assert len(node.store) == 0
    assert node.persist_delta(small)


@deterministic(max_examples=60)
@given(
    sends=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 7)), unique=True, max_size=20
    ),
    cuts=st.lists(st.booleans(), min_size=20, max_size=20),
)
def test_group_commit_answers_each_live_delta_once_and_only_after_its_commit(
    sends: list[tuple[str, int]], cuts: list[bool]
) -> None:
    """Spokes send deltas (some the same, some refused by the hub's trust policy) in any
    order; the hub stages them link by link and commits at arbitrary points. Nothing is
    answered before the commit that stores it; afterwards every delta is answered exactly once
    on every link it came on; the store holds exactly the accepted ones."""
    pool = [make_delta(f"g{i}", author="evil" if i % 4 == 3 else "good") for i in range(8)]
    store = RecordingStore(MemoryStore())
    net = Network(extensions=())
    net.add_node("hub", store=store, trust_policy=create_author_trust_policy(["good"]))
    for spoke in ("a", "b", "c"):
        net.add_node(spoke, extensions=())
        net.connect(spoke, "hub", LinkConfig(initial_sync="none"))
    net.deliver()
    hub = net.node("hub")
    answers: dict[tuple[str, str], list[str]] = {}
    staged: set[tuple[str, str]] = set()

    def collect(spoke: str, conn: FederationProtocol) -> None:
        for text in conn.messages_to_send():
            message = json.loads(text)
            if message["type"] in ("delta_ack", "delta_nack"):
                key = (spoke, message["deltaId"])
                assert key not in staged, f"{key} answered before its commit"
                answers.setdefault(key, []).append(message["type"])

    conns: dict[str, FederationProtocol] = {}
    for (spoke, index), cut in zip(sends, cuts, strict=False):
        (ch,) = net.between(spoke, "hub")
        net.node(spoke).send_delta(ch.link_id, pool[index])
        net.send_pending()
        conns[spoke] = conn = stage_from(net, spoke)
        staged.add((spoke, pool[index].id))
        collect(spoke, conn)
        if cut:
            hub.commit()
            staged.clear()
            for name, c in conns.items():
                collect(name, c)
    hub.commit()
    staged.clear()
    for name, c in conns.items():
        collect(name, c)
    for spoke, index in sends:
        expected = "delta_nack" if pool[index].author == "evil" else "delta_ack"
        assert answers[(spoke, pool[index].id)] == [expected]
    accepted = {pool[i].id for _, i in sends if pool[i].author == "good"}
    assert {d.id for _, d in net.node("hub").store.scan(limit=100)} == accepted
    commits = 1 + sum(cuts[: len(sends)])
    assert len([ids for ids, _ in store.writes if ids]) <= commits  # one write per commit
