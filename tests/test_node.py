"""``FederationNode`` (pure, no sockets): modes, filters, trust, idempotency, relaying, initial-sync
streaming, acknowledgement after storage, the outbox, pause, ``create_delta`` / ``send_delta``.

Nodes are wired at the message level by :class:`tests.node_sim.Network`; a *raw* endpoint of the
network is a bare ``FederationProtocol`` playing a peer that misbehaves.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_adapters.storage import MemoryStore
from rhizome_proto import (
    Delta,
    DeltaFilter,
    DeltaRejected,
    DeltaStore,
    ErrorCode,
    ErrorReceived,
    EventType,
    FederationNode,
    InvalidDeltaError,
    LinkConfig,
    LocalProtocolError,
    Pointer,
    Reference,
    SyncRequested,
    TimestampRange,
    combine_trust_policies,
    create_author_trust_policy,
    create_custom_trust_policy,
    create_system_trust_policy,
)
from tests.harness import make_delta
from tests.node_sim import Network
from tests.strategies import delta_filters, deltas, deterministic

# ---------------------------------------------------------------------- helpers

#: These tests read live deltas and acks as v1 messages (``delta``, ``delta_ack``): extension
#: ``batch`` (``deltas``, one cumulative ``deltas_ack``) is tested in test_hot_path.py and
#: test_extensions.py, and the simulation runs with every default extension.
V1_LIVE = ("cursor",)


def pair(
    config: LinkConfig | None = None,
    *,
    server: dict[str, Any] | None = None,
    client: dict[str, Any] | None = None,
    start: bool = True,
) -> Network:
    """A network of two nodes: ``client`` with an outgoing link to ``server``."""
    net = Network(extensions=V1_LIVE)
    net.add_node("server", **(server or {}))
    net.add_node("client", **(client or {}))
    net.connect("client", "server", config, start=start)
    if start:
        net.deliver()
    return net


def foreign(delta_id: str, **fields: Any) -> Delta:
    """A delta authored elsewhere (system ``elsewhere`` unless given)."""
    fields.setdefault("system", "elsewhere")
    return make_delta(delta_id, **fields)


def sent_types(net: Network, sender: str, receiver: str) -> list[str]:
    return [t.type for t in net.sent(sender, receiver)]


def nacks(net: Network, sender: str, receiver: str) -> dict[str, str]:
    """``delta_nack`` messages ``sender`` sent: delta id -> reason."""
    return {
        t.message["deltaId"]: t.message["reason"] for t in net.sent(sender, receiver, "delta_nack")
    }


def acks(net: Network, sender: str, receiver: str) -> list[str]:
    return [t.message["deltaId"] for t in net.sent(sender, receiver, "delta_ack")]


class RecordingStore:
    """A store wrapper recording each ``scan`` (the ``limit`` asked and the rows returned) and
    each ``put_many``."""

    def __init__(self, inner: DeltaStore) -> None:
        self.inner = inner
        self.scans: list[tuple[int, int]] = []
        self.counts = 0
        #: each ``put_many``: the ids and the meta it was given
        self.writes: list[tuple[list[str], dict[str, str]]] = []

    def put_many(
        self,
        deltas: Sequence[Delta],
        *,
        validate: bool = True,
        meta: Mapping[str, str] | None = None,
    ) -> list[int | None]:
        self.writes.append(([d.id for d in deltas], dict(meta or {})))
        return self.inner.put_many(deltas, validate=validate, meta=meta)

    def scan(self, **kwargs: Any) -> list[tuple[int, Delta]]:
        rows = self.inner.scan(**kwargs)
        self.scans.append((kwargs.get("limit", 100), len(rows)))
        return rows

    def scan_raw(self, **kwargs: Any) -> list[tuple[int, float, bytes]]:
        rows = self.inner.scan_raw(**kwargs)
        self.scans.append((kwargs.get("limit", 100), len(rows)))
        return rows

    def count(self, *args: Any, **kwargs: Any) -> int:
        self.counts += 1
        return self.inner.count(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, delta_id: object) -> bool:
        return delta_id in self.inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FailingStore(RecordingStore):
    """A store whose writes raise while ``failing`` is set (a full disk, say)."""

    failing = False

    def put(self, delta: Delta) -> int | None:
        if self.failing:
            raise OSError("disk full")
        return self.inner.put(delta)

    def put_many(self, deltas: Sequence[Delta], **options: Any) -> list[int | None]:
        if self.failing:
            raise OSError("disk full")
        return super().put_many(deltas, **options)


# ---------------------------------------------------------------------- modes


def test_push_link_only_sends() -> None:
    net = pair(LinkConfig(mode="push"))
    assert "sync_request" not in sent_types(net, "client", "server")
    up = net.author("client")
    down = net.author("server")
    net.deliver()
    assert net.ids("server") == {up.id, down.id}
    assert net.ids("client") == {up.id}
    assert net.delta_ids_sent("server", "client") == []  # the server's mirror is pull-only
    [server_link] = net.node("server").links
    assert server_link.config.mode == "pull"


def test_pull_link_only_receives() -> None:
    early = foreign("early")
    net = Network(extensions=V1_LIVE)
    net.add_node("server").persist_delta(early)
    net.add_node("client")
    net.connect("client", "server", LinkConfig(mode="pull"))
    net.deliver()
    up = net.author("client")
    down = net.author("server")
    net.deliver()
    assert net.ids("client") == {early.id, up.id, down.id}
    assert net.ids("server") == {early.id, down.id}
    assert net.delta_ids_sent("client", "server") == []
    [server_link] = net.node("server").links
    assert server_link.config.mode == "push"


def test_client_nacks_a_delta_its_push_mode_forbids() -> None:
    net = Network(extensions=V1_LIVE)
    net.add_node("client")
    net.add_raw("peer")
    ch = net.connect("client", "peer", LinkConfig(mode="push"))
    net.deliver()
    net.conn(ch, "server").send_delta(foreign("unwanted"))
    net.deliver()
    assert nacks(net, "client", "peer") == {"unwanted": "link mode push does not accept deltas"}
    assert "unwanted" not in net.store("client")
    link = net.node("client").link(ch.link_id)
    assert link is not None and link.stats.deltas_rejected == 1
    [rejected] = net.node_events("client", "delta:rejected")
    assert rejected.delta == foreign("unwanted")
    assert rejected.reason == "link mode push does not accept deltas"
    raw = [e for e in net.nodes["peer"].raw_events if isinstance(e, DeltaRejected)]
    assert [(e.delta_id, e.reason) for e in raw] == [("unwanted", rejected.reason)]


def test_server_nacks_a_delta_from_a_pull_only_client() -> None:
    net = Network(extensions=V1_LIVE)
    net.add_node("server")
    net.add_raw("peer")
    ch = net.connect("peer", "server", LinkConfig(mode="pull"))
    net.deliver()
    net.conn(ch, "client").send_delta(foreign("pushed"))
    net.deliver()
    # the server's view of the link mirrors the client's: a pull client is pushed to, never from
    reason = "link mode push does not accept deltas"
    assert nacks(net, "server", "peer") == {"pushed": reason}
    assert "pushed" not in net.store("server")
    assert [e.reason for e in net.node_events("server", "delta:rejected")] == [reason]


def test_server_refuses_a_sync_to_a_push_only_client() -> None:
    net = Network(extensions=V1_LIVE)
    net.add_node("server").persist_delta(foreign("x"))
    net.add_raw("peer")
    ch = net.connect("peer", "server", LinkConfig(mode="push"))
    net.deliver()
    net.conn(ch, "client").request_sync()
    net.deliver()
    errors = [e for e in net.nodes["peer"].raw_events if isinstance(e, ErrorReceived)]
    assert [e.code for e in errors] == [ErrorCode.SYNC_NOT_SUPPORTED]
    assert "sync_batch" not in sent_types(net, "server", "peer")


# ---------------------------------------------------------------------- filters


def test_push_filter_narrows_what_we_send() -> None:
    net = pair(LinkConfig(push_filter=DeltaFilter(authors=("alice",))))
    a = net.author("client", author="alice")
    b = net.author("client", author="bob")
    net.deliver()
    assert net.delta_ids_sent("client", "server") == [a.id]
    assert net.ids("server") == {a.id}
    assert net.ids("client") == {a.id, b.id}


def test_remote_pull_filter_from_hello_narrows_live_deltas() -> None:
    net = pair(LinkConfig(pull_filter=DeltaFilter(authors=("alice",)), initial_sync="none"))
    a = net.author("server", author="alice")
    net.author("server", author="bob")
    net.deliver()
    # the server filtered: the delta never went (not sent and then rejected by the client)
    assert net.delta_ids_sent("server", "client") == [a.id]
    assert net.ids("client") == {a.id}
    assert net.node_events("client", "delta:rejected") == []


def test_remote_pull_filter_narrows_the_initial_sync() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server", batch_size=2)
    for i, author in enumerate(["alice", "bob", "alice", "bob", "alice"]):
        server.persist_delta(foreign(f"d{i}", author=author, timestamp=100 + i))
    net.add_node("client")
    net.connect("client", "server", LinkConfig(pull_filter=DeltaFilter(authors=("alice",))))
    net.deliver()
    assert net.delta_ids_sent("server", "client") == ["d0", "d2", "d4"]
    [start] = net.sent("server", "client", "sync_start")
    assert start.message["totalDeltas"] == 3


@pytest.mark.parametrize("where", ["hello", "sync_request", "both differ"])
def test_sync_applies_the_sync_request_filter_and_the_hello_pull_filter(where: str) -> None:
    """A raw client announces one filter in ``hello`` and asks another in ``sync_request``:
    the server applies every filter it was given."""
    alice, odd = DeltaFilter(authors=("alice",)), DeltaFilter(ids=("d1", "d3", "d5"))
    hello_filter = {"hello": alice, "sync_request": None, "both differ": alice}[where]
    request_filter = {"hello": None, "sync_request": alice, "both differ": odd}[where]
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server")
    for i, author in enumerate(["alice", "alice", "bob", "alice", "bob", "bob"]):
        server.persist_delta(foreign(f"d{i}", author=author, timestamp=100 + i))
    net.add_raw("peer")
    ch = net.connect("peer", "server", LinkConfig(pull_filter=hello_filter))
    net.deliver()
    net.conn(ch, "client").request_sync(filter=request_filter)
    net.deliver()
    expected = {"hello": ["d0", "d1", "d3"], "sync_request": ["d0", "d1", "d3"]}
    assert net.delta_ids_sent("server", "peer") == expected.get(where, ["d1", "d3"])
    # and live deltas follow the hello filter only
    live = [foreign("l-alice", author="alice"), foreign("l-bob", author="bob")]
    for delta in live:
        server.persist_delta(delta)
    net.deliver()
    live_sent = [t.message["delta"]["id"] for t in net.sent("server", "peer", "delta")]
    assert live_sent == (["l-alice"] if hello_filter else ["l-alice", "l-bob"])


def test_own_pull_filter_rejects_what_a_peer_sends_anyway() -> None:
    net = Network(extensions=V1_LIVE)
    net.add_node("client")
    net.add_raw("peer")
    ch = net.connect("client", "peer", LinkConfig(pull_filter=DeltaFilter(authors=("alice",))))
    net.deliver()
    peer = net.conn(ch, "server")
    [request] = [e for e in net.nodes["peer"].raw_events if isinstance(e, SyncRequested)]
    assert request.filter == DeltaFilter(authors=("alice",))
    peer.start_sync(2)
    peer.send_sync_batch(
        [foreign("s-bob", author="bob"), foreign("s-alice", author="alice")], last=True
    )
    peer.complete_sync()
    peer.send_delta(foreign("l-bob", author="bob"))
    peer.send_delta(foreign("l-alice", author="alice"))
    net.deliver()
    assert net.ids("client") == {"s-alice", "l-alice"}
    reason = "filtered out by pull filter"
    assert nacks(net, "client", "peer") == {"s-bob": reason, "l-bob": reason}
    assert acks(net, "client", "peer") == ["l-alice"]
    link = net.node("client").link(ch.link_id)
    assert link is not None and link.stats.deltas_rejected == 2


# -- the filter property: what the peer stores is what the filter selects from the source --------

_IDS = [f"d{i}" for i in range(12)]
_POOL = ["a", "b", "s", "t", "c1", "c2", *_IDS[:4]]


def _small_deltas() -> st.SearchStrategy[Delta]:
    targets = st.one_of(
        st.builds(
            Reference, id=st.sampled_from(_IDS), context=st.none() | st.sampled_from(["c1", "c2"])
        ),
        st.integers(0, 3),
    )
    return deltas(
        ids=st.just("placeholder"),
        times=st.integers(1, 20),
        authors=st.sampled_from(["a", "b"]),
        systems=st.sampled_from(["s", "t"]),
        pointer_items=st.builds(
            Pointer, role=st.sampled_from(["negates", "r", "negates"]), target=targets
        ),
        max_pointers=2,
    )


@st.composite
def _delta_sets(draw: st.DrawFn) -> tuple[list[Delta], list[Delta]]:
    """Deltas with distinct ids, split into a source store and later live deltas."""
    drawn = draw(st.lists(_small_deltas(), min_size=3, max_size=len(_IDS)))
    ids = draw(st.permutations(_IDS))
    made = [
        Delta(
            id=ids[i], timestamp=d.timestamp, author=d.author, system=d.system, pointers=d.pointers
        )
        for i, d in enumerate(drawn)
    ]
    cut = draw(st.integers(0, len(made)))
    return made[:cut], made[cut:]


def _focused_filters() -> st.SearchStrategy[DeltaFilter]:
    """Filters of one to three fields over the pools the deltas draw from, so that most of
    them select a strict, non-empty part of the source."""

    def values(pool: list[str]) -> st.SearchStrategy[tuple[str, ...]]:
        return st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool)).map(tuple)

    fields: dict[str, st.SearchStrategy[Any]] = {
        "ids": values(_IDS),
        "authors": values(["a", "b"]),
        "systems": values(["s", "t"]),
        "target_ids": values(_IDS),
        "target_contexts": values(["c1", "c2"]),
        "timestamp_range": st.builds(
            TimestampRange, start=st.none() | st.integers(0, 12), end=st.none() | st.integers(8, 21)
        ),
    }
    chosen = st.sets(st.sampled_from(sorted(fields)), min_size=1, max_size=3)
    return st.builds(
        lambda f, neg: DeltaFilter(**f, include_negated=neg),
        chosen.flatmap(lambda names: st.fixed_dictionaries({n: fields[n] for n in names})),
        st.none() | st.booleans(),
    )


# mostly focused filters, some of the suite's general ones (no filter at all is the
# simulation's everyday case)
_general = delta_filters(strings=st.sampled_from(_POOL), bounds=st.integers(0, 21))
_filters = st.integers(0, 3).flatmap(lambda i: _general if i == 0 else _focused_filters())


@pytest.mark.parametrize("extensions", [(), ("cursor",)], ids=["v1", "cursor"])
@deterministic(150)
@given(sets=_delta_sets(), pull=_filters, batch_size=st.integers(1, 4))
def test_pull_filter_property(
    extensions: tuple[str, ...],
    sets: tuple[list[Delta], list[Delta]],
    pull: DeltaFilter,
    batch_size: int,
) -> None:
    """Initial sync + live deltas deliver exactly the source deltas the pull filter selects,
    with negation as the source store applies it when each delta is offered. In v1 the sync
    goes oldest first by timestamp; with the cursor extension, in the server's storage order."""
    initial, live = sets
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server", batch_size=batch_size, extensions=extensions)
    for delta in initial:
        server.persist_delta(delta)
    net.add_node("client", extensions=extensions)
    net.connect("client", "server", LinkConfig(pull_filter=pull))
    net.deliver()
    order = "sequence" if extensions else "timestamp"
    selected = server.store.scan(filter=pull, limit=100, order=order)
    synced = [d.id for _, d in selected]
    assert net.ids("client") == set(synced)
    assert net.delta_ids_sent("server", "client") == synced  # in order, nothing else
    expected = set(synced)
    for delta in live:
        server.persist_delta(delta)
        if pull is None or pull.matches(delta, server.store.is_negated):
            expected.add(delta.id)
    net.deliver()
    assert net.ids("client") == expected
    assert net.node_events("client", "delta:rejected") == []
    if not any(p.role == "negates" for d in live for p in d.pointers):
        # nothing offered earlier changed its negation status: the peer holds filter(source)
        final = server.store.scan(filter=pull, limit=100)
        assert net.ids("client") == {d.id for _, d in final}


@deterministic(150)
@given(sets=_delta_sets(), push=_filters)
def test_push_filter_property(
    sets: tuple[list[Delta], list[Delta]], push: DeltaFilter | None
) -> None:
    """Deltas pushed through a push filter: the server holds exactly those it selects
    (negation as the client's store applies it when each is offered): what the client held
    before its first connection (the push catch-up offers it) and what it authored after."""
    before, live = sets
    net = Network(extensions=V1_LIVE)
    net.add_node("server")
    client = net.add_node("client")
    for delta in before:
        client.persist_delta(delta)
    expected = {d.id for d in before if push is None or push.matches(d, client.store.is_negated)}
    net.connect("client", "server", LinkConfig(push_filter=push))
    net.deliver()
    assert net.ids("server") == expected
    for delta in live:
        client.persist_delta(delta)
        if push is None or push.matches(delta, client.store.is_negated):
            expected.add(delta.id)
    net.deliver()
    assert net.ids("server") == expected


# ---------------------------------------------------------------------- trust


def test_per_link_author_policy_rejects_untrusted_deltas() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server")
    server.persist_delta(foreign("sync-eve", author="eve"))
    server.persist_delta(foreign("sync-ann", author="ann"))
    net.add_node("client")
    ch = net.connect(
        "client", "server", LinkConfig(trust_policy=create_author_trust_policy(["ann"]))
    )
    net.deliver()
    net.author("server", author="eve", delta_id="live-eve")
    net.author("server", author="ann", delta_id="live-ann")
    net.deliver()
    assert net.ids("client") == {"sync-ann", "live-ann"}
    reason = "untrusted author: eve"
    assert nacks(net, "client", "server") == {"sync-eve": reason, "live-eve": reason}
    link = net.node("client").link(ch.link_id)
    assert link is not None and link.stats.deltas_rejected == 2
    assert link.stats.deltas_received == 2
    rejected = net.node_events("client", "delta:rejected")
    assert sorted((e.delta.id if e.delta else "", e.reason) for e in rejected) == [
        ("live-eve", reason),
        ("sync-eve", reason),
    ]
    # the server learns of the live rejection (a nack of a sync delta is a stray ack)
    [server_link] = net.node("server").links
    assert server_link.stats.deltas_rejected_by_peer == 1
    assert [e.delta_id for e in net.node_events("server", "delta:rejected")] == ["live-eve"]


def test_node_policy_applies_to_incoming_links() -> None:
    net = pair(server={"trust_policy": create_system_trust_policy(["client"])})
    good = net.author("client")
    net.node("client").persist_delta(foreign("relayed"))
    net.deliver()
    assert net.ids("server") == {good.id}
    assert nacks(net, "server", "client") == {"relayed": "untrusted system: elsewhere"}
    [link] = net.node("server").links
    assert link.stats.deltas_rejected == 1


def test_incoming_links_always_use_the_node_policy() -> None:
    """A policy set on an incoming link's record is replaced at the handshake (its config
    mirrors the client's hello): incoming links always apply the node-wide policy."""
    net = Network(extensions=V1_LIVE)
    net.add_node("server", trust_policy=create_author_trust_policy(["ann"]))
    net.add_node("client")
    ch = net.connect("client", "server")  # hello queued, not delivered yet
    link = net.node("server").link(ch.server_link_id or "")
    assert link is not None
    link.config = LinkConfig(trust_policy=create_author_trust_policy(["bob"]))
    net.deliver()
    assert link.config.trust_policy is None
    net.author("client", author="ann", delta_id="ann-1")
    net.author("client", author="bob", delta_id="bob-1")
    net.deliver()
    assert net.ids("server") == {"ann-1"}


def test_per_link_policy_replaces_the_node_policy_on_outgoing_links() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server")
    for author in ("ann", "bob"):
        server.persist_delta(foreign(f"by-{author}", author=author))
    net.add_node("client", trust_policy=create_author_trust_policy(["ann"]))
    net.connect("client", "server", LinkConfig(trust_policy=create_author_trust_policy(["bob"])))
    net.deliver()
    assert net.ids("client") == {"by-bob"}


def test_incoming_link_ignores_the_policy_the_remote_declares() -> None:
    """The client announces a trust policy in ``hello``: the server applies its own."""
    declared = LinkConfig(trust_policy=create_author_trust_policy(["nobody"]))
    net = pair(declared, server={"trust_policy": create_author_trust_policy(["ann"])})
    [hello] = net.sent("client", "server", "hello")
    assert hello.message["config"]["trustPolicy"]["trustedAuthors"] == ["nobody"]
    net.author("client", author="ann", delta_id="ann-1")
    net.author("client", author="bob", delta_id="bob-1")
    net.deliver()
    assert net.ids("server") == {"ann-1"}  # not "nobody" (declared), not everything
    assert nacks(net, "server", "client") == {"bob-1": "untrusted author: bob"}

    permissive = pair(declared)  # a server with no policy of its own accepts all
    permissive.author("client", author="bob", delta_id="bob-2")
    permissive.deliver()
    assert permissive.ids("server") == {"bob-2"}


def test_custom_and_combined_policies() -> None:
    small = create_custom_trust_policy(lambda d: len(d.pointers) <= 1, "too many pointers")
    policy = combine_trust_policies(create_author_trust_policy(["ann", "bob"]), small)
    net = pair(server={"trust_policy": policy})
    two = ({"role": "a", "target": 1}, {"role": "b", "target": 2})
    net.author("client", author="ann", delta_id="ok")
    net.author("client", author="eve", delta_id="eve")
    net.author("client", author="bob", delta_id="big", pointers=two)
    net.deliver()
    assert net.ids("server") == {"ok"}
    assert nacks(net, "server", "client") == {
        "eve": "untrusted author: eve",
        "big": "too many pointers",
    }
    assert [e.reason for e in net.node_events("server", "delta:rejected")] == [
        "untrusted author: eve",
        "too many pointers",
    ]


def test_rejected_delta_is_not_relayed() -> None:
    net = Network(extensions=V1_LIVE)
    net.add_node("hub", trust_policy=create_author_trust_policy(["ann"]))
    for name in ("s1", "s2"):
        net.add_node(name)
        net.connect(name, "hub")
    net.deliver()
    net.author("s1", author="eve", delta_id="eve-1")
    net.deliver()
    assert "eve-1" not in net.store("hub")
    assert net.ids("s2") == set()


# ---------------------------------------------------------------------- idempotency, relaying


def hub_and_spokes(spokes: int = 3, **hub_options: Any) -> Network:
    net = Network(extensions=V1_LIVE)
    net.add_node("hub", **hub_options)
    for i in range(spokes):
        net.add_node(f"s{i}")
        net.connect(f"s{i}", "hub")
    net.deliver()
    return net


def test_known_delta_is_acked_but_not_stored_or_relayed_again() -> None:
    net = hub_and_spokes(2)
    delta = net.author("s0")
    net.deliver()
    assert all(delta.id in net.store(n) for n in ("hub", "s0", "s1"))
    hub_len, relayed_before = len(net.store("hub")), net.delta_ids_sent("hub", "s1")
    net.node("s0").send_delta("s0->hub", delta)  # the same delta once more
    net.deliver()
    assert acks(net, "hub", "s0") == [delta.id, delta.id]
    assert len(net.store("hub")) == hub_len
    assert net.delta_ids_sent("hub", "s1") == relayed_before == [delta.id]
    assert len(net.node_events("hub", "delta:received")) == 1
    [hub_link] = [lk for lk in net.node("hub").links if lk.remote_system_id == "s0"]
    assert hub_link.stats.deltas_received == 1


def test_received_delta_is_never_sent_back() -> None:
    net = Network(extensions=V1_LIVE)
    for name in ("a", "b", "c"):
        net.add_node(name)
    net.connect("b", "a")
    net.connect("c", "a")
    net.connect("c", "b")
    net.deliver()
    deltas_ = {name: net.author(name) for name in ("a", "b", "c")}
    net.deliver()
    for name in net.nodes:
        assert net.ids(name) == {d.id for d in deltas_.values()}
    for t in net.traffic:
        if t.type == "delta":
            assert t.message["delta"]["id"] != deltas_[t.receiver].id, t  # never back to origin
    # each delta went once on each link away from where it was received
    for origin, delta in deltas_.items():
        back = [t for t in net.traffic if t.type == "delta" and t.receiver == origin]
        assert delta.id not in {t.message["delta"]["id"] for t in back}


def test_auto_broadcast_relays_to_the_other_links() -> None:
    net = hub_and_spokes(3)
    delta = net.author("s0")
    net.deliver()
    for name in ("hub", "s1", "s2"):
        assert delta.id in net.store(name)
    assert net.delta_ids_sent("hub", "s0") == []


def test_without_auto_broadcast_nothing_is_relayed() -> None:
    net = hub_and_spokes(3, auto_broadcast=False)
    from_spoke = net.author("s0")
    own = net.author("hub")
    net.deliver()
    assert from_spoke.id in net.store("hub")
    for name in ("s1", "s2"):
        assert net.ids(name) == {own.id}  # the hub's own deltas still go out


def test_hub_and_spoke_converges() -> None:
    net = hub_and_spokes(4)
    made = [net.author(name) for name in ("hub", "s0", "s1", "s2", "s3", "s0")]
    net.deliver()
    for name in net.nodes:
        assert net.ids(name) == {d.id for d in made}


def test_federated_hubs_do_not_loop() -> None:
    """Two hubs, one a client of the other, each with spokes: every delta crosses every link
    exactly once (the tree has 5 links), and the network goes quiet."""
    net = Network(extensions=V1_LIVE)
    for name in ("h1", "h2", "a1", "a2", "b1", "b2"):
        net.add_node(name)
    net.connect("h2", "h1")
    for spoke, hub in (("a1", "h1"), ("a2", "h1"), ("b1", "h2"), ("b2", "h2")):
        net.connect(spoke, hub)
    net.deliver()
    made = [net.author(name) for name in net.nodes]
    steps = net.deliver(max_steps=100)
    assert steps < 100
    for name in net.nodes:
        assert net.ids(name) == {d.id for d in made}
    assert net.counts["delta"] == len(made) * len(net.channels)
    assert net.counts["sync_batch"] == 0


def test_a_cycle_of_hubs_stays_bounded() -> None:
    net = Network(extensions=V1_LIVE)
    for name in ("h1", "h2", "h3", "a", "b", "c"):
        net.add_node(name)
    net.connect("h2", "h1")
    net.connect("h3", "h2")
    net.connect("h1", "h3")  # a cycle
    for spoke, hub in (("a", "h1"), ("b", "h2"), ("c", "h3")):
        net.connect(spoke, hub)
    net.deliver()
    made = [net.author(name) for name in net.nodes for _ in range(3)]
    net.deliver(max_steps=200)
    for name in net.nodes:
        assert net.ids(name) == {d.id for d in made}
    # at most once per link and direction
    assert net.counts["delta"] <= len(made) * len(net.channels) * 2


# ---------------------------------------------------------------------- initial sync


def stored_timestamps(net: Network, name: str) -> list[float]:
    return [d.timestamp for _, d in net.store(name).scan(limit=100_000)]


def test_initial_sync_streams_oldest_first_in_batches() -> None:
    """v1 (a peer without the cursor extension): oldest first by timestamp."""
    rng = random.Random(5)
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server", batch_size=4, extensions=())
    stamps = list(range(1, 11)) * 2
    rng.shuffle(stamps)
    for i, ts in enumerate(stamps):
        server.persist_delta(foreign(f"d{i}", timestamp=ts))
    net.add_node("client", extensions=())
    net.connect("client", "server")
    net.deliver()
    batches = net.sent("server", "client", "sync_batch")
    assert [len(b.message["deltas"]) for b in batches] == [4, 4, 4, 4, 4]
    assert [b.message["batchNumber"] for b in batches] == [0, 1, 2, 3, 4]
    assert [b.message["isLastBatch"] for b in batches] == [False] * 4 + [True]
    [start] = net.sent("server", "client", "sync_start")
    assert start.message["totalDeltas"] == 20 and start.message["batchSize"] == 4
    [complete] = net.sent("server", "client", "sync_complete")
    assert complete.message["deltasProcessed"] == 20
    sent = [d["timestamp"] for b in batches for d in b.message["deltas"]]
    assert sent == sorted(stamps)
    assert stored_timestamps(net, "client") == sorted(stamps)
    [done] = net.node_events("client", "sync:completed")
    assert done.count == 20


def test_cursor_sync_streams_in_storage_order_and_says_where_it_stopped() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server", batch_size=4)
    for i, ts in enumerate([50, 10, 40, 20, 30, 60]):
        server.persist_delta(foreign(f"d{i}", timestamp=ts))
    net.add_node("client")
    net.connect("client", "server")
    net.deliver()
    [hello] = net.sent("client", "server", "hello")
    [ack] = net.sent("server", "client", "hello_ack")
    assert hello.message["extensions"] == ["cursor"] and ack.message["extensions"] == ["cursor"]
    batches = net.sent("server", "client", "sync_batch")
    assert [[d["id"] for d in b.message["deltas"]] for b in batches] == [
        ["d0", "d1", "d2", "d3"],
        ["d4", "d5"],
    ]
    store_id = server.store.get_meta("store_id")
    assert [b.message["cursor"] for b in batches] == [f"{store_id}:4", f"{store_id}:6"]
    [complete] = net.sent("server", "client", "sync_complete")
    assert complete.message["cursor"] == f"{store_id}:6"


def test_cursor_resume_gets_exactly_what_was_stored_since_whatever_the_clocks() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server")
    for i in range(5):
        server.persist_delta(foreign(f"old{i}", timestamp=1000 + i))
    net.add_node("client")
    net.connect("client", "server")
    net.deliver()
    net.partition("client", "server")
    # stored while the client is away, stamped by a clock far behind: from_timestamp would
    # miss them; the cursor does not
    late = [foreign(f"late{i}", timestamp=1 + i) for i in range(3)]
    for delta in late:
        server.persist_delta(delta)
    net.heal("client", "server")
    net.deliver()
    requests = net.sent("client", "server", "sync_request")
    store_id = server.store.get_meta("store_id")
    assert [r.message.get("fromCursor") for r in requests] == [None, f"{store_id}:5"]
    second = net.sent("server", "client", "sync_batch")[-1]
    assert [d["id"] for d in second.message["deltas"]] == ["late0", "late1", "late2"]
    assert net.ids("client") == net.ids("server")


def test_a_cursor_of_another_store_syncs_from_the_beginning() -> None:
    """The server restarted on a new (memory) store under the same system id: the client's
    cursor belongs to the old store and must not skip anything of the new one."""
    net = Network(extensions=V1_LIVE)
    old = net.add_node("server")
    for i in range(5):
        old.persist_delta(foreign(f"old{i}"))
    net.add_node("client")
    net.connect("client", "server")
    net.deliver()
    net.partition("client", "server")
    net.crash("server", new_store=MemoryStore())
    new = net.node("server")
    for i in range(3):
        new.persist_delta(foreign(f"new{i}"))
    net.heal("client", "server")
    net.deliver()
    assert {"new0", "new1", "new2"} <= net.ids("client")


def test_another_pull_filter_starts_its_own_cursor() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server")
    server.persist_delta(foreign("a1", author="a"))
    server.persist_delta(foreign("b1", author="b"))
    client = net.add_node("client")
    net.connect("client", "server", LinkConfig(pull_filter=DeltaFilter(authors=("a",))))
    net.deliver()
    assert net.ids("client") == {"a1"}
    keys = [k for k in ("a", "b") if client.store.get_meta(_cursor_key("server", k)) is not None]
    assert keys == ["a"]


def _cursor_key(remote: str, author: str) -> str:
    from rhizome_proto import SYNC_CURSOR_KEY
    from rhizome_proto._codec import encode_value

    return SYNC_CURSOR_KEY.format(remote, encode_value(DeltaFilter(authors=(author,))))


def test_a_v1_client_gets_plain_v1_from_a_server_with_extensions() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server")
    for i, ts in enumerate([30, 10, 20]):
        server.persist_delta(foreign(f"d{i}", timestamp=ts))
    net.add_node("client", extensions=())
    net.connect("client", "server")
    net.deliver()
    [hello] = net.sent("client", "server", "hello")
    [ack] = net.sent("server", "client", "hello_ack")
    assert "extensions" not in hello.message and "extensions" not in ack.message
    [batch] = net.sent("server", "client", "sync_batch")
    assert [d["timestamp"] for d in batch.message["deltas"]] == [10, 20, 30]
    assert "cursor" not in batch.message


def test_initial_sync_from_timestamp() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server", batch_size=3)
    for i in range(10):
        server.persist_delta(foreign(f"d{i}", timestamp=100 + 10 * i))
    net.add_node("client")
    net.connect(
        "client", "server", LinkConfig(initial_sync="from_timestamp", sync_from_timestamp=150)
    )
    net.deliver()
    [request] = net.sent("client", "server", "sync_request")
    assert request.message["fromTimestamp"] == 150
    assert net.ids("client") == {"d5", "d6", "d7", "d8", "d9"}  # timestamp >= 150


def test_initial_sync_none_requests_nothing() -> None:
    net = Network(extensions=V1_LIVE)
    net.add_node("server").persist_delta(foreign("old"))
    net.add_node("client")
    net.connect("client", "server", LinkConfig(initial_sync="none"))
    net.deliver()
    assert "sync_request" not in sent_types(net, "client", "server")
    assert net.ids("client") == set()
    new = net.author("server")
    net.deliver()
    assert net.ids("client") == {new.id}


def test_empty_sync_has_no_batches() -> None:
    net = pair()
    assert "sync_batch" not in sent_types(net, "server", "client")
    assert sent_types(net, "server", "client").count("sync_complete") == 1


def big_server(n: int, batch_size: int) -> tuple[Network, RecordingStore]:
    rng = random.Random(n)
    inner = MemoryStore()
    inner.put_many(
        [
            foreign(f"d{i}", timestamp=rng.randint(1, n // 2), author=rng.choice("ab"))
            for i in range(n)
        ]
    )
    store = RecordingStore(inner)
    net = Network(record=False, extensions=V1_LIVE)
    net.add_node("server", store=store, batch_size=batch_size, extensions=())
    net.add_node("client", extensions=())
    return net, store


def test_initial_sync_memory_is_bounded_by_the_batch() -> None:
    """5,000 deltas, batches of 100: no store call ever returns more than a batch."""
    net, store = big_server(5_000, 100)
    net.connect("client", "server")
    net.deliver(max_steps=500)
    assert len(net.store("client")) == 5_000
    assert stored_timestamps(net, "client") == sorted(stored_timestamps(net, "client"))
    assert store.scans, "the sync must scan the store"
    assert max(limit for limit, _ in store.scans) <= 100
    assert max(rows for _, rows in store.scans) <= 100
    assert sum(rows for _, rows in store.scans) <= 5_000 + len(store.scans)  # + look-aheads
    assert net.counts["sync_batch"] == 50


def test_initial_sync_with_filters_stays_bounded() -> None:
    """With a pull filter (announced in hello and asked in sync_request) the streaming scans are
    bounded by the batch and the counting scans by a constant page, never by the store."""
    net, store = big_server(5_000, 100)
    net.connect("client", "server", LinkConfig(pull_filter=DeltaFilter(authors=("a",))))
    net.deliver(max_steps=500)
    expected = net.store("server").count(DeltaFilter(authors=("a",)))
    assert len(net.store("client")) == expected
    assert max(rows for _, rows in store.scans) <= 1_000  # the count's page (see report)
    assert all(rows <= 100 for limit, rows in store.scans if limit <= 100)


def test_sync_produces_no_batches_while_the_peer_paused_us() -> None:
    net = Network(extensions=V1_LIVE)
    server = net.add_node("server", batch_size=2)
    for i in range(6):
        server.persist_delta(foreign(f"d{i}", timestamp=10 + i))
    net.add_node("client")
    ch = net.connect("client", "server")
    # one step: hello and hello_ack cross; the client's node asks for the sync
    for _ in range(3):
        net.step()
        if ch.client_conn is not None and ch.client_conn.is_open:
            break
    net.conn(ch, "client").pause()
    net.deliver()
    assert net.counts["sync_start"] == 1
    assert net.counts["sync_batch"] == 0
    [link] = server.links
    assert link.syncing and not link.sync_ready
    assert (link.sync_total, link.sync_sent) == (6, 0)
    assert server.sync_step(link.id) is True  # nothing sent, still to do
    live = net.author("server")
    net.deliver()
    assert net.counts["sync_batch"] == 0 and net.counts["delta"] == 0  # held too
    net.conn(ch, "client").resume()
    net.deliver()
    # 7 deltas in batches of 2: the live one, stored after the sync began, is newer than all
    assert net.counts["sync_batch"] == 4
    assert net.ids("client") == {f"d{i}" for i in range(6)} | {live.id}
    assert not link.syncing and (link.sync_total, link.sync_sent) == (6, 7)


# ---------------------------------------------------------------------- storage before acks


def test_ack_only_after_the_delta_is_stored() -> None:
    store = FailingStore(MemoryStore())
    net = Network(extensions=V1_LIVE)
    net.add_node("server", store=store)
    net.add_node("client")
    ch = net.connect("client", "server")
    net.deliver()
    delta = net.author("client")
    store.failing = True
    with pytest.raises(OSError, match="disk full"):
        net.deliver()
    assert delta.id not in store
    assert acks(net, "server", "client") == []
    assert ch.server_conn is not None and delta.id not in " ".join(
        ch.server_conn.messages_to_send()
    )
    assert net.node_events("server", "delta:received") == []
    # the adapter drops the connection; the client still owes the delta and sends it again
    store.failing = False
    net.partition("client", "server")
    net.heal("client", "server")
    net.deliver()
    assert delta.id in store
    assert acks(net, "server", "client") == [delta.id]


def test_a_store_failure_leaves_later_events_queued() -> None:
    """The store fails on a received delta that arrived together with the connection's end:
    the ``Closed`` event (carrying our unsettled delta) must still be handled afterwards, or
    that delta would never be retransmitted."""
    store = FailingStore(MemoryStore())
    net = Network(extensions=V1_LIVE)
    net.add_node("server")
    client = net.add_node("client", store=store)
    ch = net.connect("client", "server", LinkConfig(initial_sync="none"))
    net.deliver()
    ours = net.author("client")
    theirs = net.author("server")
    net.send_pending()  # both deltas are now in flight
    cconn, sconn = net.conn(ch, "client"), net.conn(ch, "server")
    for text in list(ch.down):
        cconn.receive_message(text)  # the server's delta reaches the client ...
    ch.down.clear()
    ch.up.clear()  # ... but ours is lost with the transport
    cconn.connection_closed(1006, "lost")
    store.failing = True
    with pytest.raises(OSError):
        client.handle_events(ch.link_id)
    store.failing = False
    client.handle_events(ch.link_id)  # what an adapter does next: handle what is left
    link = client.link(ch.link_id)
    assert link is not None and [d.id for d in link.outbox] == [ours.id]
    sconn.connection_closed(1006, "lost")
    net.node("server").handle_events(ch.server_link_id or "")
    net.node("server").remove_link(ch.server_link_id or "")
    ch.client_conn = ch.server_conn = None
    net.heal("client", "server")
    net.deliver()
    assert ours.id in net.store("server")
    assert theirs.id in store  # never acked, so parked by the server and sent again


# ---------------------------------------------------------------------- the outbox


def test_deltas_authored_while_disconnected_go_after_reconnect() -> None:
    net = hub_and_spokes(2)
    net.partition("s0", "hub")
    made = [net.author("s0") for _ in range(3)]
    link = net.node("s0").link("s0->hub")
    assert link is not None and [d.id for d in link.outbox] == [d.id for d in made]
    net.deliver()
    assert net.ids("hub") == set()
    net.heal("s0", "hub")
    net.deliver()
    for name in net.nodes:
        assert net.ids(name) == {d.id for d in made}
    assert not link.outbox


def test_unsettled_deltas_are_sent_again_after_reconnect() -> None:
    net = hub_and_spokes(2)
    in_flight = net.author("s0")
    net.send_pending()  # sent, not yet delivered
    net.partition("s0", "hub")
    assert net.ids("hub") == set()
    link = net.node("s0").link("s0->hub")
    assert link is not None and [d.id for d in link.outbox] == [in_flight.id]
    net.heal("s0", "hub")
    net.deliver()
    assert in_flight.id in net.store("hub") and in_flight.id in net.store("s1")


def test_delivered_but_unacked_delta_is_resent_and_deduplicated() -> None:
    net = hub_and_spokes(2)
    delta = net.author("s0")
    net.send_pending()
    net.step()  # the delta crosses, the hub stores it; its ack is queued, not yet sent
    assert delta.id in net.store("hub")
    net.partition("s0", "hub")
    net.heal("s0", "hub")
    net.deliver()
    assert net.delta_ids_sent("s0", "hub").count(delta.id) == 2  # sent again ...
    assert len(net.node_events("hub", "delta:received")) == 1  # ... stored once
    assert net.delta_ids_sent("hub", "s1").count(delta.id) == 1  # relayed once
    assert "s1" not in {t.receiver for t in net.traffic if t.type == "sync_batch"}


def test_deltas_held_while_paused_survive_a_disconnect() -> None:
    net = pair(LinkConfig(initial_sync="none"))
    ch = net.channel("client", "server")
    net.conn(ch, "server").pause()
    net.deliver()
    held = [net.author("client") for _ in range(2)]
    net.deliver()
    assert net.ids("server") == set()
    assert [d.id for d in net.conn(ch, "client").held] == [d.id for d in held]
    net.partition("client", "server")
    net.heal("client", "server")
    net.deliver()
    assert net.ids("server") == {d.id for d in held}


def test_unsettled_server_to_client_deltas_are_parked_for_the_next_connection() -> None:
    """An incoming link forgets its connection when it closes; the node parks what it had not
    settled and sends it live when the same remote connects again (even with no sync)."""
    net = pair(LinkConfig(initial_sync="none"))
    delta = net.author("server")
    net.send_pending()
    net.partition("client", "server")
    assert net.dropped == []
    net.heal("client", "server")
    net.deliver()
    assert delta.id in net.store("client")
    assert net.delta_ids_sent("server", "client") == [delta.id, delta.id]  # live, twice


def test_parking_overflow_is_counted_and_the_full_sync_recovers_it() -> None:
    net = pair(server={"max_parked": 1})
    made = [net.author("server") for _ in range(3)]
    net.send_pending()
    net.partition("client", "server")
    assert net.parked_dropped == 2
    net.heal("client", "server")
    net.deliver()
    assert net.ids("client") == {d.id for d in made}


# ---------------------------------------------------------------------- local deltas


def test_create_delta_builds_a_valid_delta() -> None:
    node = FederationNode("sys-1", MemoryStore(), clock=lambda: 1_700_000_000_123)
    delta = node.create_delta(
        "ann",
        [
            {"role": "name", "target": "Ann"},
            {"role": "friend", "target": {"id": "bob", "context": "friends"}},
            Pointer(role="age", target=42),
            {"role": "flag", "target": True},
        ],
        id="x-1",
    )
    assert delta == Delta(
        id="x-1",
        timestamp=1_700_000_000_123,
        author="ann",
        system="sys-1",
        pointers=(
            Pointer(role="name", target="Ann"),
            Pointer(role="friend", target=Reference(id="bob", context="friends")),
            Pointer(role="age", target=42),
            Pointer(role="flag", target=True),
        ),
    )
    assert node.create_delta("ann", [], id="x-2", timestamp=5).timestamp == 5
    assert len(node.store) == 0  # nothing stored until persisted
    assert node.persist_delta(delta) is True
    assert node.persist_delta(delta) is False


@pytest.mark.parametrize(
    "pointer",
    [
        {"role": "", "target": 1},
        {"role": "r", "target": None},
        {"role": "r", "target": [1, 2]},
        {"role": "r", "target": {"id": ""}},
        {"role": "r", "target": {"id": "x", "context": ""}},
        {"role": "r", "target": {"id": "x", "other": 1}},
        {"role": "r", "target": {"nested": {"id": "x"}}},
        {"role": "r"},
        {"target": 1},
    ],
)
def test_create_delta_rejects_bad_pointers(pointer: dict[str, Any]) -> None:
    node = FederationNode("sys-1", MemoryStore(), clock=lambda: 1)
    with pytest.raises(InvalidDeltaError) as info:
        node.create_delta("ann", [{"role": "ok", "target": 1}, pointer], id="bad")
    assert info.value.delta_id == "bad"


@pytest.mark.parametrize(
    ("author", "delta_id", "timestamp"), [("", "x", 1), ("ann", "", 1), ("ann", "x", 0)]
)
def test_create_delta_rejects_bad_fields(author: str, delta_id: str, timestamp: int) -> None:
    node = FederationNode("sys-1", MemoryStore(), clock=lambda: 1)
    with pytest.raises(InvalidDeltaError):
        node.create_delta(author, [], id=delta_id, timestamp=timestamp)


def test_persist_delta_rejects_an_invalid_delta() -> None:
    node = FederationNode("sys-1", MemoryStore(), clock=lambda: 1)
    with pytest.raises(InvalidDeltaError):
        node.persist_delta(Delta(id="x", timestamp=-1, author="a", system="s"))
    assert len(node.store) == 0


def test_send_delta_on_one_link() -> None:
    net = hub_and_spokes(2)
    delta = foreign("direct")
    net.node("hub").send_delta(next(lk.id for lk in net.node("hub").links), delta)
    net.deliver()
    assert delta.id not in net.store("hub")  # sent, not stored
    got = [n for n in ("s0", "s1") if delta.id in net.store(n)]
    assert len(got) == 1
    [acked] = [e for e in net.node_events("hub", "delta:sent")]
    assert acked.delta_id == delta.id
    with pytest.raises(InvalidDeltaError):
        net.node("hub").send_delta(net.node("hub").links[0].id, Delta("", 1, "a", "s"))
    with pytest.raises(LocalProtocolError):
        net.node("hub").send_delta("no-such-link", delta)


def test_send_delta_on_a_disconnected_outgoing_link_waits_in_its_outbox() -> None:
    net = pair()
    net.partition("client", "server")
    delta = foreign("later")
    net.node("client").send_delta("client->server", delta)
    net.deliver()
    net.heal("client", "server")
    net.deliver()
    assert delta.id in net.store("server")


def test_stats_count_sent_and_received() -> None:
    net = pair()
    for _ in range(3):
        net.author("client")
    net.deliver()
    client_link = net.node("client").link("client->server")
    [server_link] = net.node("server").links
    assert client_link is not None and client_link.stats.deltas_sent == 3
    assert server_link.stats.deltas_received == 3
    assert client_link.remote_system_id == "server" and server_link.remote_system_id == "client"
    assert client_link.stats.connected_at is not None
    assert client_link.stats.last_sync_at is not None


# ---------------------------------------------------------------------- typed events


def test_event_types_are_an_enum_equal_to_the_seed_names() -> None:
    assert EventType.LINK_CONNECTED == "link:connected"
    assert "sync:progress" in {EventType.SYNC_PROGRESS}
    assert EventType("delta:rejected") is EventType.DELTA_REJECTED
    assert {t.value for t in EventType} == {
        "link:connecting",
        "link:connected",
        "link:disconnected",
        "link:error",
        "link:paused",
        "link:resumed",
        "delta:sent",
        "delta:received",
        "delta:rejected",
        "sync:started",
        "sync:progress",
        "sync:completed",
    }
    net = pair()
    net.author("client")
    net.deliver()
    kinds = [e.type for _, e in net.events]
    assert kinds and all(type(kind) is EventType for kind in kinds)
    assert EventType.LINK_CONNECTED in kinds and EventType.DELTA_RECEIVED in kinds


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.SYNC_NOT_SUPPORTED, ErrorCode.SYNC_NOT_SUPPORTED),
        ("RATE_LIMITED", ErrorCode.RATE_LIMITED),
        ("TEAPOT", "TEAPOT"),  # a code we do not know stays the peer's text
    ],
)
@pytest.mark.parametrize("fatal", [False, True])
def test_a_peer_error_is_reported_with_its_code(code: str, expected: str, fatal: bool) -> None:
    net = Network(extensions=V1_LIVE)
    net.add_node("client")
    net.add_raw("peer")
    ch = net.connect("client", "peer", LinkConfig(initial_sync="none"))
    net.deliver()
    net.conn(ch, "server").send_error(code, "no", fatal=fatal)
    net.deliver()
    [error] = net.node_events("client", EventType.LINK_ERROR)
    assert error.code == expected and type(error.code) is type(expected)
    assert error.reason == f"{expected}: no"
    assert error.fatal is fatal


def test_error_received_knows_our_codes() -> None:
    assert ErrorReceived(code="UNAUTHORIZED", message="m", fatal=True).code is (
        ErrorCode.UNAUTHORIZED
    )
    assert ErrorReceived(code="X_OTHER", message="m", fatal=True).code == "X_OTHER"


def test_a_ping_timeout_is_reported_with_its_code() -> None:
    net = pair()
    [ch] = net.between("client", "server")
    conn = net.conn(ch, "client")
    deadline = conn.get_timer()
    assert deadline is not None
    conn.handle_timer(deadline + 1_000)  # nothing heard since: pings, then the timeout
    timer = conn.get_timer()
    while timer is not None and not conn.closed:
        conn.handle_timer(timer + 1_000)
        timer = conn.get_timer()
    net.deliver()
    errors = net.node_events("client", EventType.LINK_ERROR)
    assert [(e.code, e.reason, e.fatal) for e in errors] == [
        (ErrorCode.PING_TIMEOUT, "ping timeout", True)
    ]
