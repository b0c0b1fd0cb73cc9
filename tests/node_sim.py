"""A deterministic in-memory network of :class:`FederationNode` instances.

Nodes are wired at the message level: every link is a pair of :class:`FederationProtocol`
objects (client and server role) whose text messages travel through in-memory queues. The
:class:`Network` plays the part of the adapters: it moves messages, calls
:meth:`FederationNode.handle_events` after feeding a connection and
:meth:`~FederationNode.sync_step` while a server link streams its initial sync, fires due
timers, and models the failures the guarantees are about:

* :meth:`Network.partition` loses a connection (``connection_closed(1006)`` on both sides, in-flight
  messages dropped, the server's incoming link removed as the asyncio adapter does); with
  ``half_open`` only the client notices at once, and the server's side lingers, sending into the
  void, until its heartbeat times out (so a client may reconnect before the server noticed);
* :meth:`Network.heal` opens a new connection on the same outgoing link (its ``NodeLink``, and so
  its outbox, survives);
* :meth:`Network.crash` makes a node lose everything but its store (the ``FederationNode`` is
  rebuilt over the same store, or the same SQLite file reopened; its outgoing links re-created).

Time is a fake wall clock (milliseconds, :class:`FakeClock`) and a monotonic ``now`` moved by each
step. Every choice comes from ``random.Random(seed)``: a run is a pure function of its seed and
its script. Every loop is bounded.

A name may also be a *raw* endpoint (:meth:`Network.add_raw`): a bare ``FederationProtocol`` with
no node behind it, driven by the test, to play a peer that misbehaves.
"""

from __future__ import annotations

import json
import random
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rhizome_adapters.storage import MemoryStore, SQLiteStore
from rhizome_proto import (
    DEFAULT_EXTENSIONS,
    CloseCode,
    Delta,
    DeltaStore,
    Event,
    FederationEvent,
    FederationNode,
    FederationProtocol,
    LinkConfig,
    Pointer,
    RemoteProtocolError,
    Role,
    State,
    TrustPolicy,
)
from tests.harness import FakeClock

__all__ = ["Channel", "Network", "SimNode", "Traffic", "Zombie"]

Direction = Literal["up", "down"]  # up: client -> server; down: server -> client


@dataclass(slots=True)
class SimNode:
    """One instance of the network: its node (``None`` for a raw endpoint) and its store."""

    name: str
    node: FederationNode | None
    store: DeltaStore | None
    options: dict[str, Any] = field(default_factory=dict)
    sqlite_path: Path | None = None
    #: events of a raw endpoint's connections (a node's events go to ``Network.events``)
    raw_events: list[Event] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class Channel:
    """A client's outgoing link to a server, across all its connections."""

    client: str
    server: str
    config: LinkConfig
    #: the client's id for its outgoing link (kept across reconnects)
    link_id: str
    #: the server's id for the current incoming link (a new one per connection)
    server_link_id: str | None = None
    client_conn: FederationProtocol | None = None
    server_conn: FederationProtocol | None = None
    up: deque[str] = field(default_factory=deque)
    down: deque[str] = field(default_factory=deque)
    generation: int = 0

    @property
    def connected(self) -> bool:
        return self.client_conn is not None

    def ends(self) -> tuple[str, str]:
        return (self.client, self.server)


@dataclass(slots=True, eq=False)
class Zombie:
    """A server's side of a half-open connection: alive to the server, dead on the wire."""

    server: str
    link_id: str
    conn: FederationProtocol


@dataclass(frozen=True, slots=True)
class Traffic:
    """One message that went over a channel."""

    sender: str
    receiver: str
    type: str
    message: dict[str, Any]


class Network:
    """Named nodes, the channels between them, and a deterministic scheduler.

    Parameters:
        seed: drives every random choice (delivery order and subsets).
        ping_interval / ping_timeout: heartbeat settings of every connection (seconds).
        step_seconds: how far the monotonic clock moves per delivery step.
        record: keep every message (decoded) in :attr:`traffic`; counts are always kept.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        ping_interval: float = 30.0,
        ping_timeout: float = 90.0,
        step_seconds: float = 0.05,
        record: bool = True,
        extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    ) -> None:
        self.seed = seed
        #: the extensions of nodes added without ``extensions=``
        self.extensions = extensions
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.now = 0.0
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.step_seconds = step_seconds
        self.record = record
        self.nodes: dict[str, SimNode] = {}
        self.channels: list[Channel] = []
        #: every application event, with the name of the node that emitted it
        self.events: list[tuple[str, FederationEvent]] = []
        #: messages sent, by type
        self.counts: Counter[str] = Counter()
        #: every message sent (when ``record``)
        self.traffic: list[Traffic] = []
        #: fatal protocol errors raised while feeding a connection (a healthy run has none)
        self.errors: list[tuple[str, RemoteProtocolError]] = []
        #: deltas a server forgot when an incoming link was removed: ``(server, link_id, delta)``
        #: (what the node did not keep, e.g. parked, for the remote's next connection)
        self.dropped: list[tuple[str, str, Delta]] = []
        #: server sides of half-open connections, until their heartbeat times out
        self.zombies: list[Zombie] = []
        #: ``parked_dropped`` of node incarnations that crashed
        self._parked_dropped_before_crashes = 0
        #: deltas a crashed node still had to deliver on its outgoing links, lost with its memory
        self.crash_lost: list[tuple[str, str, Delta]] = []
        #: deltas authored through :meth:`author`, per node
        self.authored: dict[str, list[Delta]] = {}
        self._ids = 0

    # ------------------------------------------------------------------ building

    def add_node(
        self,
        name: str,
        *,
        store: DeltaStore | None = None,
        sqlite_dir: Path | None = None,
        trust_policy: TrustPolicy | None = None,
        auto_broadcast: bool = True,
        batch_size: int = 100,
        max_parked: int | None = None,
        extensions: tuple[str, ...] | None = None,
        **node_options: Any,
    ) -> FederationNode:
        """A node over ``store`` (a new MemoryStore by default, or an SQLite file in
        ``sqlite_dir``); ``node_options`` go to :class:`FederationNode` as they are."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        path = None
        if store is None:
            if sqlite_dir is not None:
                path = Path(sqlite_dir) / f"{name}.db"
                store = SQLiteStore(path)
            else:
                store = MemoryStore()
        options: dict[str, Any] = {
            "trust_policy": trust_policy,
            "auto_broadcast": auto_broadcast,
            "batch_size": batch_size,
            "extensions": self.extensions if extensions is None else extensions,
            **node_options,
        }
        if max_parked is not None:
            options["max_parked"] = max_parked
        node = FederationNode(name, store, clock=self.clock, **options)
        self.nodes[name] = SimNode(name, node, store, options, path)
        self.authored[name] = []
        return node

    def add_raw(self, name: str) -> None:
        """A bare protocol endpoint with no node: the test drives its connections."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        self.nodes[name] = SimNode(name, None, None)

    def node(self, name: str) -> FederationNode:
        node = self.nodes[name].node
        assert node is not None, f"{name} is a raw endpoint"
        return node

    def store(self, name: str) -> DeltaStore:
        store = self.nodes[name].store
        assert store is not None, f"{name} is a raw endpoint"
        return store

    def ids(self, name: str) -> set[str]:
        """The ids of every delta stored at ``name``."""
        store = self.store(name)
        out: set[str] = set()
        after = 0
        while True:
            page = store.scan(after=after, limit=500)
            if not page:
                return out
            out.update(d.id for _, d in page)
            after = page[-1][0]

    def close(self) -> None:
        for sim in self.nodes.values():
            if sim.store is not None:
                sim.store.close()

    def connect(
        self,
        client: str,
        server: str,
        config: LinkConfig | None = None,
        *,
        link_id: str | None = None,
        start: bool = True,
    ) -> Channel:
        """An outgoing link of ``client`` to ``server`` (opened at once unless ``start`` is
        false: then it waits for :meth:`heal`)."""
        config = config or LinkConfig()
        channel = Channel(client, server, config, link_id or f"{client}->{server}")
        if self.nodes[client].node is not None:
            self.node(client).add_link(channel.link_id, config, outgoing=True)
        self.channels.append(channel)
        if start:
            self._open(channel)
        return channel

    def channel(self, a: str, b: str) -> Channel:
        """The one channel between ``a`` and ``b`` (either direction)."""
        found = self.between(a, b)
        assert len(found) == 1, f"{len(found)} channels between {a} and {b}"
        return found[0]

    def between(self, a: str, b: str) -> list[Channel]:
        return [c for c in self.channels if {c.client, c.server} == {a, b}]

    def conn(self, channel: Channel, side: Literal["client", "server"]) -> FederationProtocol:
        conn = channel.client_conn if side == "client" else channel.server_conn
        assert conn is not None, "the channel is not connected"
        return conn

    # ------------------------------------------------------------------ local activity

    def author(
        self,
        name: str,
        *,
        author: str = "user",
        timestamp: float | None = None,
        pointers: Sequence[Pointer | Mapping[str, Any]] | None = None,
        delta_id: str | None = None,
    ) -> Delta:
        """Create and persist a delta on ``name`` (broadcast as the node decides)."""
        self._ids += 1
        delta_id = delta_id or f"{name}-{self._ids}"
        if pointers is None:
            pointers = ({"role": "value", "target": self._ids},)
        node = self.node(name)
        delta = node.create_delta(author, pointers, id=delta_id, timestamp=timestamp)
        assert node.persist_delta(delta)
        self.authored[name].append(delta)
        return delta

    def all_authored(self) -> list[Delta]:
        return [d for deltas in self.authored.values() for d in deltas]

    # ------------------------------------------------------------------ connections

    def _extensions(self, name: str) -> tuple[str, ...]:
        """What the node offers, as an adapter passes it to each connection it makes."""
        node = self.nodes[name].node
        return node.extensions if node is not None else DEFAULT_EXTENSIONS

    def _open(self, ch: Channel) -> None:
        assert not ch.connected
        ch.generation += 1
        ch.server_link_id = f"{ch.server}<-{ch.client}#{ch.generation}"
        common: dict[str, Any] = {
            "clock": self.clock,
            "ping_interval": self.ping_interval,
            "ping_timeout": self.ping_timeout,
        }
        cconn = FederationProtocol(
            Role.CLIENT,
            system_id=ch.client,
            config=ch.config.to_wire(),
            extensions=self._extensions(ch.client),
            **common,
        )
        sconn = FederationProtocol(
            Role.SERVER,
            system_id=ch.server,
            link_id=ch.server_link_id,
            extensions=self._extensions(ch.server),
            **common,
        )
        if self.nodes[ch.client].node is not None:
            self.node(ch.client).attach(ch.link_id, cconn)
        if self.nodes[ch.server].node is not None:
            server = self.node(ch.server)
            server.add_link(ch.server_link_id, outgoing=False)
            server.attach(ch.server_link_id, sconn)
        ch.client_conn, ch.server_conn = cconn, sconn
        ch.up.clear()
        ch.down.clear()
        cconn.start(self.now)
        sconn.start(self.now)

    def _close(
        self,
        ch: Channel,
        code: int = CloseCode.ABNORMAL,
        reason: str = "lost",
        *,
        half_open: bool = False,
    ) -> None:
        """The connection ends; in-flight messages are gone. Both sides see it at once, or
        (``half_open``) the client only: the server's side becomes a :class:`Zombie`."""
        cconn, sconn = ch.client_conn, ch.server_conn
        assert cconn is not None and sconn is not None
        ch.up.clear()
        ch.down.clear()
        ends: list[tuple[FederationProtocol, str, str | None]] = [(cconn, ch.client, ch.link_id)]
        if half_open and self.nodes[ch.server].node is not None and ch.server_link_id:
            self.zombies.append(Zombie(ch.server, ch.server_link_id, sconn))
        else:
            ends.append((sconn, ch.server, ch.server_link_id))
        for conn, _, _ in ends:
            conn.messages_to_send()  # what was not written yet is lost with the transport
            conn.connection_closed(code, reason)
        for conn, name, link_id in ends:
            self._pump(name, link_id, conn)
        if len(ends) == 2 and ch.server_link_id is not None:
            self._remove_server_link(ch.server, ch.server_link_id)
        ch.client_conn = ch.server_conn = None

    def _remove_server_link(self, server: str, link_id: str) -> None:
        """What the adapter does once an incoming connection ended: forget its link."""
        node = self.nodes[server].node
        if node is not None:
            record = node.remove_link(link_id)
            if record is not None:
                self.dropped.extend((server, record.id, d) for d in record.outbox)

    def partition(self, a: str, b: str, *, half_open: bool = False) -> int:
        """Lose every connection between ``a`` and ``b``; returns how many were open.

        With ``half_open`` the server does not notice until its heartbeat times out."""
        lost = 0
        for ch in self.between(a, b):
            if ch.connected:
                self._close(ch, half_open=half_open)
                lost += 1
        return lost

    @property
    def parked_dropped(self) -> int:
        """Deltas nodes dropped from their parking (``max_parked``), crashed ones included."""
        alive = sum(s.node.parked_dropped for s in self.nodes.values() if s.node is not None)
        return alive + self._parked_dropped_before_crashes

    def heal(self, a: str, b: str) -> int:
        """Reconnect every closed channel between ``a`` and ``b``; returns how many."""
        opened = 0
        for ch in self.between(a, b):
            if not ch.connected:
                self._open(ch)
                opened += 1
        return opened

    def heal_all(self) -> int:
        opened = 0
        for ch in self.channels:
            if not ch.connected:
                self._open(ch)
                opened += 1
        return opened

    def crash(self, name: str, *, new_store: DeltaStore | None = None) -> None:
        """``name`` loses all in-memory state; its store survives (an SQLite file is reopened),
        unless ``new_store`` replaces it (a server restarted on an empty store).

        Its connections end (peers see ``1006``); it comes back at once as a new
        ``FederationNode`` with its outgoing links re-created (empty outboxes), disconnected
        until healed. What its outgoing links still had to deliver is recorded in
        :attr:`crash_lost`.
        """
        sim = self.nodes[name]
        assert sim.node is not None and sim.store is not None
        old = sim.node
        for ch in self.channels:
            if name not in ch.ends():
                continue
            if ch.client == name:
                link = old.link(ch.link_id)
                assert link is not None
                pending = list(link.outbox)
                if ch.client_conn is not None:
                    pending += [*ch.client_conn.unacknowledged, *ch.client_conn.held]
                self.crash_lost.extend((name, ch.link_id, d) for d in pending)
            if not ch.connected:
                continue
            ch.up.clear()
            ch.down.clear()
            mine, peer_conn, peer, peer_link = (
                (ch.client_conn, ch.server_conn, ch.server, ch.server_link_id)
                if ch.client == name
                else (ch.server_conn, ch.client_conn, ch.client, ch.link_id)
            )
            assert mine is not None and peer_conn is not None
            peer_conn.messages_to_send()
            peer_conn.connection_closed(CloseCode.ABNORMAL, "peer crashed")
            self._pump(peer, peer_link, peer_conn)
            if peer == ch.server and peer_link is not None:
                self._remove_server_link(peer, peer_link)
            ch.client_conn = ch.server_conn = None
        self.zombies = [z for z in self.zombies if z.server != name]  # died with it
        self._parked_dropped_before_crashes += old.parked_dropped
        if new_store is not None:
            sim.store.close()
            sim.store, sim.sqlite_path = new_store, None
        elif sim.sqlite_path is not None:
            sim.store.close()
            sim.store = SQLiteStore(sim.sqlite_path)
        sim.node = FederationNode(name, sim.store, clock=self.clock, **sim.options)
        for ch in self.channels:
            if ch.client == name:
                sim.node.add_link(ch.link_id, ch.config, outgoing=True)

    # ------------------------------------------------------------------ delivery

    def _pump(self, name: str, link_id: str | None, conn: FederationProtocol) -> None:
        """What an adapter does after feeding ``conn``: let the node act on its events."""
        sim = self.nodes[name]
        if sim.node is None:
            sim.raw_events.extend(conn.events())
            return
        assert link_id is not None
        link = sim.node.link(link_id)
        if link is None or link.conn is not conn:
            return
        for event in sim.node.handle_events(link_id):
            self.events.append((name, event))

    def _collect(self, ch: Channel) -> int:
        """Move what both connections want to send into the channel's queues."""
        moved = 0
        for conn, queue, sender, receiver in (
            (ch.client_conn, ch.up, ch.client, ch.server),
            (ch.server_conn, ch.down, ch.server, ch.client),
        ):
            assert conn is not None
            for text in conn.messages_to_send():
                message = json.loads(text)
                self.counts[message["type"]] += 1
                if self.record:
                    self.traffic.append(Traffic(sender, receiver, message["type"], message))
                queue.append(text)
                moved += 1
        return moved

    def _feed(self, ch: Channel, direction: Direction, count: int) -> int:
        queue = ch.up if direction == "up" else ch.down
        conn = ch.server_conn if direction == "up" else ch.client_conn
        name = ch.server if direction == "up" else ch.client
        link_id = ch.server_link_id if direction == "up" else ch.link_id
        assert conn is not None
        fed = 0
        while queue and fed < count:
            text = queue.popleft()
            fed += 1
            try:
                conn.receive_message(text, self.now)
            except RemoteProtocolError as exc:
                self.errors.append((name, exc))
            self._pump(name, link_id, conn)
        return fed

    def _timers(self, ch: Channel) -> None:
        for conn, name, link_id in (
            (ch.client_conn, ch.client, ch.link_id),
            (ch.server_conn, ch.server, ch.server_link_id),
        ):
            if conn is None:
                continue
            deadline = conn.get_timer()
            if deadline is not None and deadline <= self.now:
                conn.handle_timer(self.now)
                self._pump(name, link_id, conn)

    def _ready_ends(self, ch: Channel) -> list[tuple[FederationNode, str]]:
        """The ends of the channel with a sync step ready: the server streaming its initial
        sync, the client offering its push catch-up."""
        ready = []
        for name, link_id, conn in (
            (ch.server, ch.server_link_id, ch.server_conn),
            (ch.client, ch.link_id, ch.client_conn),
        ):
            node = self.nodes[name].node
            if node is None or link_id is None:
                continue
            link = node.link(link_id)
            if link is not None and link.conn is conn and link.sync_ready:
                ready.append((node, link_id))
        return ready

    def _sync(self, ch: Channel) -> bool:
        """One step of each ready end (a sync batch, a window of catch-up deltas)."""
        ready = self._ready_ends(ch)
        for node, link_id in ready:
            node.sync_step(link_id)
            name = ch.server if node is self.nodes[ch.server].node else ch.client
            self.events.extend((name, event) for event in node.commit())
        return bool(ready)

    def _settle_closing(self, ch: Channel) -> None:
        """A side that is closing (fatal error, close()) ends the connection once flushed; one
        that closed by itself (heartbeat timeout) ends it at once."""
        for conn in (ch.client_conn, ch.server_conn):
            if conn is not None and conn.state is State.CLOSED:
                self._close(ch, conn.close_code or CloseCode.ABNORMAL, conn.close_reason)
                return
            if conn is not None and conn.state is State.CLOSING:
                self._collect(ch)  # its last words (a fatal error) still reach the peer
                self._feed(ch, "up", len(ch.up))
                self._feed(ch, "down", len(ch.down))
                code = conn.close_code if conn.close_code is not None else CloseCode.NORMAL
                if ch.connected:
                    self._close(ch, code, conn.close_reason)
                return

    def send_pending(self) -> int:
        """Put what every connection wants to send on the wire (in flight, not delivered);
        returns the number of messages."""
        return sum(self._collect(ch) for ch in self.channels if ch.connected)

    def step(self, *, shuffle: bool = False) -> bool:
        """One scheduling round; ``True`` if anything happened or is still pending.

        With ``shuffle`` the channels are visited in random order, a random subset of them
        (at least one) delivers, and each delivering direction passes a random number of its
        queued messages; otherwise every queued message is delivered.
        """
        self.now += self.step_seconds
        active = False
        channels = [c for c in self.channels if c.connected]
        for ch in channels:
            active |= self._collect(ch) > 0
        if shuffle and channels:
            self.rng.shuffle(channels)
            chosen = [c for c in channels if self.rng.random() < 0.7] or channels[:1]
        else:
            chosen = channels
        for ch in chosen:
            if not ch.connected:
                continue  # closed while another channel was served
            directions: list[Direction] = ["up", "down"]
            if shuffle:
                self.rng.shuffle(directions)
            for direction in directions:
                queue = ch.up if direction == "up" else ch.down
                if not queue or not ch.connected:
                    continue
                count = self.rng.randint(1, len(queue)) if shuffle else len(queue)
                active |= self._feed(ch, direction, count) > 0
            if ch.connected:
                self._timers(ch)
                active |= self._sync(ch)
                self._settle_closing(ch)
        for ch in self.channels:
            if ch.connected:
                link_ready = self._sync_pending(ch)
                active |= bool(ch.up or ch.down) or link_ready
        self._haunt()
        return active or bool(self.zombies)

    def _haunt(self) -> None:
        """Zombies send into the void and keep their timers until the heartbeat kills them."""
        for zombie in list(self.zombies):
            conn = zombie.conn
            conn.messages_to_send()
            deadline = conn.get_timer()
            if deadline is not None and deadline <= self.now:
                conn.handle_timer(self.now)
            self._pump(zombie.server, zombie.link_id, conn)
            if conn.closed:
                self.zombies.remove(zombie)
                self._remove_server_link(zombie.server, zombie.link_id)

    def _sync_pending(self, ch: Channel) -> bool:
        return bool(self._ready_ends(ch))

    def deliver(self, max_steps: int = 10_000, *, shuffle: bool = False) -> int:
        """Run steps until one is quiet (nothing sent, nothing queued, no sync batch ready, no
        zombie left); returns the number of steps. Raises ``AssertionError`` if ``max_steps``
        is reached."""
        for steps in range(1, max_steps + 1):
            if not self.step(shuffle=shuffle):
                return steps
        raise AssertionError(f"network not quiet after {max_steps} steps (seed {self.seed})")

    def run(self, steps: int, *, shuffle: bool = True) -> None:
        """Exactly ``steps`` scheduling rounds (quiet or not)."""
        for _ in range(steps):
            self.step(shuffle=shuffle)

    # ------------------------------------------------------------------ inspection

    def sent(self, sender: str, receiver: str, type: str | None = None) -> list[Traffic]:
        """Recorded messages from ``sender`` to ``receiver`` (of one ``type``)."""
        return [
            t
            for t in self.traffic
            if t.sender == sender and t.receiver == receiver and (type is None or t.type == type)
        ]

    def delta_ids_sent(self, sender: str, receiver: str) -> list[str]:
        """Ids of deltas ``sender`` sent ``receiver``, live and in sync batches, in order."""
        out: list[str] = []
        for t in self.sent(sender, receiver):
            if t.type == "delta":
                out.append(t.message["delta"]["id"])
            elif t.type == "sync_batch":
                out.extend(d["id"] for d in t.message["deltas"])
        return out

    def node_events(self, name: str, type: str | None = None) -> list[FederationEvent]:
        return [e for n, e in self.events if n == name and (type is None or e.type == type)]

    def missing(
        self, expected: Mapping[str, Iterable[str]]
    ) -> dict[str, tuple[set[str], set[str]]]:
        """For each node whose store differs from ``expected``: (missing ids, extra ids)."""
        out: dict[str, tuple[set[str], set[str]]] = {}
        for name, ids in expected.items():
            want, have = set(ids), self.ids(name)
            if want != have:
                out[name] = (want - have, have - want)
        return out
