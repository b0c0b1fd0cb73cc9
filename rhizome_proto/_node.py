"""``FederationNode``: the logic of one instance with many links (pure: no I/O of its own).

The adapter owns sockets and timers; it attaches each link's :class:`FederationProtocol` (or
:class:`FederationConnection`) here, calls :meth:`FederationNode.stage` after feeding a
connection and :meth:`FederationNode.commit` once per read cycle (group commit: what every link
brought is stored in one transaction, then acknowledged; :meth:`handle_events` does both),
writes what every connection has to send, and calls :meth:`sync_step` while a server link
streams its initial sync and its transport has room. The node decides which delta goes to which
link and what happens to what arrives:

* modes: ``push`` only sends, ``pull`` only receives, enforced on both ends (a delta arriving
  where the mode forbids it is nacked);
* filters: our push filter and the peer's pull filter narrow what we send; our pull filter
  narrows what we accept;
* trust: our own policy (per link, else the node's), never one the peer declares; rejected
  deltas are nacked, counted, reported and never stored;
* idempotency: a stored delta is acked again but not stored or relayed twice; a delta is never
  sent back on the link it came from; with ``auto_broadcast`` new deltas are relayed to the
  other links, which makes hub-and-spoke converge and keeps federated hubs from looping;
* a delta is stored only after it validated and passed trust, and acknowledged only after it
  is stored (committed, for a durable store);
* initial sync streams from the store in batches, oldest first, one batch in memory;
* nothing is lost: deltas a link could not deliver (closed before the ack) and deltas meant for
  an outgoing link while it is disconnected wait in its outbox for the next connection; an
  incoming link's undelivered deltas are parked for the same remote's next connection; and an
  outgoing link keeps a durable push cursor in the store, so after a restart it offers the peer
  everything stored past the point where all it had to carry was settled (the push
  catch-up, streamed through :meth:`FederationNode.sync_step` within an in-flight window).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ._codec import encode_value
from ._config import LinkConfig
from ._connection import DEFAULT_MAX_MESSAGE_SIZE
from ._delta import Delta, InvalidDeltaError, Pointer, validate_delta
from ._errors import ErrorCode, LocalProtocolError
from ._events import (
    Closed,
    DeltaAcked,
    DeltaReceived,
    DeltaRejected,
    ErrorReceived,
    Event,
    EventType,
    FederationEvent,
    HandshakeComplete,
    Paused,
    PingTimeout,
    ProtocolViolation,
    Resumed,
    SyncBatchReceived,
    SyncCompleted,
    SyncRequested,
    SyncStarted,
)
from ._filter import DeltaFilter
from ._protocol import DEFAULT_BATCH_SIZE, LinkEndpoint, Role, State
from ._ratelimit import TokenBucket
from ._serving import PushCatchUp, PushState, ServeState, SyncServer
from ._signing import sign_delta
from ._store import DeltaStore
from ._trust import PermissiveTrustPolicy, TrustPolicy

__all__ = [
    "DEFAULT_CONNECTION_MEMORY",
    "DEFAULT_EXTENSIONS",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "PUSH_CURSOR_KEY",
    "PUSH_WINDOW",
    "SYNC_CURSOR_KEY",
    "EventType",
    "FederationEvent",
    "FederationNode",
    "LinkStats",
    "NodeLink",
]

#: Store meta key of an outgoing link's push cursor, by remote system id: every delta stored at
#: or below this sequence number that the link should carry has been settled by that remote.
PUSH_CURSOR_KEY = "push_cursor:{}"
#: Store meta key of a client's sync cursor (extension ``cursor``), by remote system id and the
#: JSON of the pull filter it synced with (another filter starts from the beginning).
SYNC_CURSOR_KEY = "sync_cursor:{}:{}"
#: Bytes of deltas per ``sync_batch`` served, at most (a batch holds at least one delta).
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024
#: Room kept in a message for everything but its deltas (type, timestamps, numbers, cursor).
_ENVELOPE = 4096
_decode_delta = msgspec.json.Decoder(Delta).decode
#: enum members used on the hot path (per delta), looked up once: a lookup is slow on 3.11
_CATCHING_UP = PushState.CATCHING_UP
_STREAMING = ServeState.STREAMING
_DELTA_RECEIVED = EventType.DELTA_RECEIVED
_DELTA_SENT = EventType.DELTA_SENT
#: Received deltas waiting for a commit: the link and connection they came on, the deltas (one
#: live delta, or a sync batch) and whether they are live (each acknowledged once stored).
_Staged: TypeAlias = tuple["NodeLink", LinkEndpoint, Sequence[Delta], bool]
#: Events whose handling does not depend on what is stored: they do not wait for a commit.
_NO_BARRIER = (DeltaReceived, SyncBatchReceived, DeltaAcked, DeltaRejected)
#: Store meta key of the store's identity, part of every sync cursor the node hands out.
STORE_ID_KEY = "store_id"
#: The extensions a node speaks unless told otherwise.
DEFAULT_EXTENSIONS: tuple[str, ...] = ("cursor", "batch", "credit")
#: Default ``memory_budget``: bytes held for peers in all (queued output, parked deltas).
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024
#: Default floor of ``max_connection_memory`` (bytes queued for one connection).
DEFAULT_CONNECTION_MEMORY = 16 * 1024 * 1024
#: Most deltas of a push catch-up in flight (sent, not yet acknowledged) at once.
PUSH_WINDOW = 1000
#: Milliseconds between two saves of a push cursor (a stale cursor only means resending more).
_CURSOR_SAVE_INTERVAL = 1000


@dataclass(slots=True)
class LinkStats:
    """Counters of one link (times are wall-clock milliseconds from the node's clock)."""

    deltas_sent: int = 0
    deltas_received: int = 0
    deltas_rejected: int = 0
    deltas_rejected_by_peer: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    #: stored deltas too large for any message the peer accepts (skipped, reported)
    deltas_too_large: int = 0
    #: times the link's queue was full and it fell back to catching up from the store
    overflows: int = 0
    #: deltas refused because a different delta with their id is stored (nacked, reported)
    deltas_conflicting: int = 0
    connected_at: float | None = None
    last_sync_at: float | None = None


@dataclass(slots=True, eq=False)
class NodeLink:
    """The node's record of one link; it outlives connections of an outgoing link."""

    id: str
    config: LinkConfig
    outgoing: bool
    remote_url: str | None = None
    conn: LinkEndpoint | None = None
    remote_system_id: str | None = None
    remote_pull_filter: DeltaFilter | None = None
    stats: LinkStats = field(default_factory=LinkStats)
    #: deltas waiting for the next connection (unsettled by the last one, or sent while down)
    outbox: deque[Delta] = field(default_factory=deque)
    #: we asked the peer to pause (asked again on every new connection until resumed)
    paused: bool = False
    #: the initial sync this link serves (server side), or served last
    _serving: SyncServer | None = field(default=None, repr=False)
    #: the link's catch-up from the store
    _push: PushCatchUp = field(default_factory=PushCatchUp, repr=False)
    #: client side: the store meta key of its sync cursor for this remote and pull filter
    _cursor_key: str | None = field(default=None, repr=False)
    #: the bytes queued and pending on a connection past which stored deltas for it wait in
    #: the store (:meth:`FederationNode._byte_room`: half ``max_connection_memory`` at most,
    #: and a share of half ``memory_budget``)
    _byte_room: int = field(default=8 * 1024 * 1024, repr=False)

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.is_open

    @property
    def syncing(self) -> bool:
        """A server-side initial sync is being streamed on this link."""
        serving = self._serving
        return serving is not None and serving.state is _STREAMING

    @property
    def sync_total(self) -> int:
        """Deltas of the initial sync this link serves (or served last); 0 if none."""
        return self._serving.total if self._serving is not None else 0

    @property
    def sync_sent(self) -> int:
        """Deltas of that sync sent so far."""
        return self._serving.sent if self._serving is not None else 0

    @property
    def catching_up(self) -> bool:
        """The link is offering the peer stored deltas it may have missed (an outgoing link
        after a restart, or a link whose queue overflowed)."""
        return self._push.state is _CATCHING_UP

    @property
    def catch_up_remaining(self) -> int:
        """Store positions the catch-up has still to look at (0 when not catching up)."""
        return self._push.remaining

    @property
    def sync_ready(self) -> bool:
        """:meth:`FederationNode.sync_step` has something to send now (an initial sync batch,
        or push catch-up within the in-flight window) and the peer has not paused us: call it
        when the transport has room."""
        conn = self.conn
        if conn is None or not conn.is_open or conn.peer_paused:
            return False
        if self.syncing:
            return True
        return self._push.state is _CATCHING_UP and not self._full(conn, PUSH_WINDOW)

    def _full(self, conn: LinkEndpoint, most: int) -> bool:
        """No more stored deltas go to the connection now: ``most`` of ours are pending on
        it, or its queued and pending bytes reached :attr:`_byte_room`."""
        return (
            conn.pending_count >= most or conn.pending_bytes + conn.outbound_size >= self._byte_room
        )


class FederationNode:
    """One RhizomeDB instance's federation logic over a :class:`DeltaStore`.

    Parameters:
        system_id: this instance's id.
        store: where deltas live (called synchronously).
        clock: wall clock in milliseconds (for stats).
        trust_policy: applied to deltas arriving on links without a policy of their own
            (incoming links always); permissive by default.
        auto_broadcast: relay deltas received on one link to the others.
        batch_size: deltas per ``sync_batch`` when serving an initial sync.
        extensions: the protocol extensions to offer (client) or accept (server) on the links'
            connections; ``()`` speaks plain v1. ``"cursor"``: a client resumes its initial
            sync exactly where the last one stopped (its position is kept in the store).
        max_batch_bytes: most bytes of deltas per ``sync_batch`` served (a batch holds at
            least one delta, whatever its size).
        max_message_size: the largest message the peers accept (ours: the connections'
            limit, 16 MiB by default); a stored delta that cannot fit is never sent.
        max_queued: the most deltas queued on one connection (held or unacknowledged); a link
            past it, or past its share of bytes (half ``max_connection_memory`` at most, and
            half ``memory_budget`` divided by the open connections), catches up from the store
            instead (memory bounded, nothing lost).
        max_parked: how many undelivered deltas are kept per remote system id when an incoming
            link closes, for its next connection (the oldest go first beyond that; a client
            that reconnects with an initial sync recovers them anyway).
        memory_budget: one bound, in bytes, over what the node holds for peers: the bytes
            queued on every connection (:attr:`LinkEndpoint.outbound_size`), our deltas held
            for or unacknowledged by each peer (:attr:`LinkEndpoint.pending_bytes`) and the
            parked deltas (their JSON size, as for pending deltas). Past it, parked deltas go
            first, the oldest parked first (their remotes are gone: the store keeps them, and
            a client that comes back with an initial sync, or is offered catch-up, gets them
            again), then the connection holding the most is ended (as below).
            Checked at every commit.
        max_connection_memory: the most bytes queued for one connection (default: 16 MiB or
            twice ``max_message_size``, whichever is more): a peer that does not read past it
            is disconnected at once (close code 1008, ``link:error`` then
            ``link:disconnected``); what it had not settled stays in the store (and in the
            link's outbox or parking) and is offered again when it returns. Stored deltas
            for a link that holds its share (queued and pending bytes together: see
            ``max_queued``) go through the link's catch-up from the store instead.
        rate_limit: ``(rate, burst)``: hold each link to ``rate`` units a second (a unit is a
            message, or a delta of a ``deltas`` message) with bursts of ``burst``; a peer over
            it is told once per excursion (a non-fatal ``RATE_LIMITED`` error) and slowed: the
            adapter waits :meth:`FederationConnection.read_delay` before reading it again.
            Other links are read as usual. Incoming links only (peers connecting to us).
            ``None`` (the default): no limit.
        signing_key: an Ed25519 private key: :meth:`create_delta` signs every delta it makes
            with it (see ``rhizome_proto._signing``; peers check it with
            ``SignatureTrustPolicy``).
    """

    def __init__(
        self,
        system_id: str,
        store: DeltaStore,
        *,
        clock: Callable[[], int | float],
        trust_policy: TrustPolicy | None = None,
        auto_broadcast: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_parked: int = 10_000,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queued: int = 10_000,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        max_connection_memory: int | None = None,
        rate_limit: tuple[float, float] | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_message_size < 1 or max_batch_bytes < 1 or max_queued < 1:
            raise ValueError("max_message_size, max_batch_bytes and max_queued must be >= 1")
        self.max_queued = max_queued
        self.max_batch_bytes = max_batch_bytes
        self.max_message_size = max_message_size
        self._max_delta_bytes = max_message_size - min(_ENVELOPE, max_message_size // 2)
        if max_parked < 0:
            raise ValueError("max_parked must be >= 0")
        if max_connection_memory is None:
            max_connection_memory = max(DEFAULT_CONNECTION_MEMORY, 2 * max_message_size)
        if memory_budget < 1 or max_connection_memory < 1:
            raise ValueError("memory_budget and max_connection_memory must be >= 1")
        if rate_limit is not None:
            TokenBucket(*rate_limit)  # checks it
        self.memory_budget = memory_budget
        self.max_connection_memory = max_connection_memory
        self.rate_limit = rate_limit
        #: signs the deltas :meth:`create_delta` makes (``None``: unsigned)
        self.signing_key = signing_key
        self.system_id = system_id
        self.store = store
        self.trust_policy: TrustPolicy = trust_policy or PermissiveTrustPolicy()
        self.auto_broadcast = auto_broadcast
        self.batch_size = batch_size
        self._clock = clock
        self._links: dict[str, NodeLink] = {}
        #: the extensions this node speaks: adapters give them to every connection they make
        self.extensions = tuple(extensions)
        self._store_id_cache: str | None = None
        self.max_parked = max_parked
        #: undelivered deltas of closed incoming links (each with its JSON size), by remote
        #: system id, the remote parked least recently first
        self._parked: dict[str, deque[tuple[Delta, int]]] = {}
        #: bytes of JSON of the parked deltas
        self.parked_bytes = 0
        #: parked deltas dropped because ``max_parked`` or ``memory_budget`` was reached
        self.parked_dropped = 0
        #: connections ended because their peer did not read (``max_connection_memory`` or
        #: ``memory_budget``)
        self.connections_shed = 0
        #: whether received deltas are reported one by one (``delta:received``); an application
        #: that does not ask for them gets ``sync:progress`` per batch and nothing per delta
        self.report_received = True
        #: the same for ``delta:sent`` (a peer acknowledged one of ours)
        self.report_sent = True
        # group commit: what arrived since the last commit, stored in one transaction by
        # :meth:`commit` and only then acknowledged (see _Staged)
        self._staged: list[_Staged] = []
        self._staged_meta: dict[str, str] = {}
        #: application events made since the last :meth:`commit`
        self._out: list[FederationEvent] = []
        #: an event whose handling waited for a commit that failed: handled first next time
        self._deferred: dict[str, Event] = {}

    # ---------------------------------------------------------------- links

    @property
    def links(self) -> list[NodeLink]:
        return list(self._links.values())

    def link(self, link_id: str) -> NodeLink | None:
        return self._links.get(link_id)

    def add_link(
        self,
        link_id: str,
        config: LinkConfig | None = None,
        *,
        outgoing: bool,
        remote_url: str | None = None,
    ) -> NodeLink:
        """Register a link (before its first connection). Ids are the application's."""
        if link_id in self._links:
            raise LocalProtocolError(
                f"link {link_id!r} already exists", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        link = NodeLink(
            id=link_id,
            config=config or LinkConfig(),
            outgoing=outgoing,
            remote_url=remote_url,
            _byte_room=self._byte_room(len(self._links) + 1),
        )
        self._links[link_id] = link
        return link

    def attach(self, link_id: str, conn: LinkEndpoint) -> None:
        """Give the link a (new) connection; the outbox goes out once it is open."""
        link = self._require(link_id)
        if link.conn is not None and not link.conn.closed:
            raise LocalProtocolError(
                f"link {link_id!r} already has a live connection", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        link.conn = conn
        if self.rate_limit is not None and conn.role is Role.SERVER:  # what peers send us
            conn.limit_rate(*self.rate_limit)
        if link._serving is not None:
            link._serving.abort()

    def remove_link(self, link_id: str) -> NodeLink | None:
        """Forget a link (after its connection closed); returns its record, which lets go of
        its connection once it is closed (so that nothing the record is still referenced by
        keeps the connection's buffers alive)."""
        link = self._links.pop(link_id, None)
        if link is not None and link.conn is not None and link.conn.closed:
            link.conn = None
        return link

    # ---------------------------------------------------------------- local deltas

    def persist_delta(self, delta: Delta) -> bool:
        """Store a locally authored delta and broadcast it to every link that should get it.

        Raises :class:`InvalidDeltaError` for an invalid delta; returns ``False`` when a delta
        with this id was already stored (nothing is sent again).
        """
        return self.persist_deltas((delta,))[0]

    def persist_deltas(self, deltas: Iterable[Delta]) -> list[bool]:
        """:meth:`persist_delta` for several deltas in one store transaction (one fsync);
        ``False`` for each one already stored. Raises :class:`InvalidDeltaError` (storing
        nothing) if one is invalid or too large for any message (``max_message_size``)."""
        # a delta no message could carry would never reach a peer: refused too
        limit = self._max_delta_bytes
        valid = [validate_delta(delta, max_size=limit) for delta in deltas]
        seqs = self.store.put_many(valid, validate=False)
        for delta, seq in zip(valid, seqs, strict=True):
            if seq is not None:
                self._broadcast(delta, source=None, seq=seq)
        return [seq is not None for seq in seqs]

    def create_delta(
        self,
        author: str,
        pointers: Iterable[Pointer | Mapping[str, Any]],
        *,
        id: str,
        timestamp: float | None = None,
    ) -> Delta:
        """A new, validated delta authored on this instance (``system`` is this node's id).

        ``pointers`` are :class:`Pointer` values or dicts ``{"role": ..., "target": ...}`` whose
        target is a string, number, boolean or ``{"id": ..., "context"?: ...}``. The id comes from
        the caller (the core has no randomness); the timestamp defaults to the node's clock.
        Raises :class:`InvalidDeltaError`. Nothing is stored: see :meth:`persist_delta`.
        Signed with :attr:`signing_key` when one is set.
        """
        built: list[Pointer] = []
        for i, pointer in enumerate(pointers):
            try:
                built.append(
                    pointer if isinstance(pointer, Pointer) else msgspec.convert(pointer, Pointer)
                )
            except msgspec.ValidationError as exc:
                raise InvalidDeltaError(f"pointers[{i}]: {exc}", id or None) from None
        when = self._clock() if timestamp is None else timestamp
        delta = validate_delta(
            Delta(
                id=id, timestamp=when, author=author, system=self.system_id, pointers=tuple(built)
            )
        )
        return delta if self.signing_key is None else sign_delta(delta, self.signing_key)

    def pause(self, link_id: str) -> None:
        """Ask the link's peer to stop sending live deltas, now and after reconnects."""
        link = self._require(link_id)
        link.paused = True
        if link.conn is not None and link.conn.is_open:
            link.conn.pause()

    def resume(self, link_id: str) -> None:
        """Let the link's peer send again."""
        link = self._require(link_id)
        link.paused = False
        if link.conn is not None and link.conn.is_open:
            link.conn.resume()

    def send_delta(self, link_id: str, delta: Delta) -> None:
        """Send one delta on one link (held in its outbox while disconnected)."""
        link = self._require(link_id)
        validate_delta(delta)
        self._send(link, delta)

    # ---------------------------------------------------------------- events

    def handle_events(self, link_id: str) -> list[FederationEvent]:
        """Act on everything the link's connection reported and commit: :meth:`stage` then
        :meth:`commit`; returns the application events."""
        self.stage(link_id)
        return self.commit()

    def stage(self, link_id: str) -> None:
        """Act on everything the link's connection reported, except storing what arrived: the
        received deltas wait for :meth:`commit`, which stores everything staged from every link
        in one transaction and only then acknowledges it (group commit). An adapter stages
        after each read and commits once per read cycle, whatever the number of links.

        Events are taken one at a time: if acting on one raises (the store failed), the ones
        after it stay queued for the next call (a ``Closed`` carrying unsettled deltas must not
        be lost with it). An event that depends on what is stored (anything but a received
        delta or an acknowledgement) commits what is staged first, so the order of effects is
        that of the events.
        """
        link = self._require(link_id)
        conn = link.conn
        if conn is None:
            return
        event = self._deferred.pop(link_id, None)
        if event is None:
            event = conn.next_event()
        while event is not None:
            if self._staged and not isinstance(event, _NO_BARRIER):
                try:
                    self._store_staged()
                except BaseException:
                    self._deferred[link_id] = event
                    raise
            try:
                self._handle(link, conn, event, self._out)
            except Exception as exc:
                if isinstance(event, Closed):  # not the peer's input: the caller's to handle
                    raise
                self._input_failed(link, conn, event, exc)
            event = conn.next_event()
        self._save_cursor_if_settled(link)

    def _input_failed(
        self, link: NodeLink, conn: LinkEndpoint, event: Event, exc: Exception
    ) -> None:
        """Acting on what the peer sent raised: the peer gets a fatal ``error`` and the link
        closes (1011); the application gets ``link:error`` with the exception. Never a bare
        drop of the link."""
        what = f"{type(exc).__name__}: {exc}"[:300]
        conn.fail_input(
            ErrorCode.MESSAGE_ERROR,
            f"could not handle {type(event).__name__}: {type(exc).__name__}",
        )
        self._out.append(
            FederationEvent(
                type=EventType.LINK_ERROR,
                link_id=link.id,
                code=ErrorCode.MESSAGE_ERROR,
                reason=f"handling {type(event).__name__} from the peer failed: {what}",
                fatal=True,
            )
        )

    def commit(self) -> list[FederationEvent]:
        """Store everything staged, in one durable transaction, then acknowledge it, relay it
        and return the application events made since the last commit. If the store fails the
        exception propagates and what could not be stored stays staged for the next commit
        (nothing was acknowledged)."""
        if self._staged or self._staged_meta:
            self._store_staged()
        self._bound_memory()
        out, self._out = self._out, []
        return out

    # ---------------------------------------------------------------- memory

    @property
    def memory_held(self) -> int:
        """Bytes held for peers, as :attr:`memory_budget` counts them: what is queued on every
        live connection, our deltas pending on it, and the parked deltas."""
        return self.parked_bytes + sum(out + pending for _, out, pending in self._queued())

    def _queued(self) -> list[tuple[NodeLink, int, int]]:
        """Every link with a live connection, the bytes queued on it and those of our
        deltas pending on it."""
        return [
            (link, link.conn.outbound_size, link.conn.pending_bytes)
            for link in self._links.values()
            if link.conn is not None and not link.conn.closed
        ]

    def _byte_room(self, live: int) -> int:
        """The bytes queued and pending on one of ``live`` connections past which stored
        deltas for it wait in the store: half its cap, and a fair share of half the budget,
        so that slow peers together cannot spend it."""
        return min(self.max_connection_memory, self.memory_budget // max(1, live)) // 2

    def _bound_memory(self) -> None:
        """Keep to ``max_connection_memory`` per connection and to ``memory_budget`` in all:
        shed connections whose peer does not read past their cap, drop parked deltas (the
        oldest first), then shed the connections holding the most. Each link's share for
        stored deltas (:meth:`_byte_room`) follows the number of connections."""
        cap = self.max_connection_memory
        held: list[tuple[NodeLink, int]] = []
        total = self.parked_bytes
        queued = self._queued()
        room = self._byte_room(len(queued))
        for link in self._links.values():
            link._byte_room = room
        for link, out, pending in queued:
            if out > cap:
                self._shed(
                    link, f"{out} bytes queued for a peer that does not read them (at most {cap})"
                )
            else:
                total += out + pending
                held.append((link, out + pending))
        if total <= self.memory_budget:
            return
        total -= self._evict_parked(total - self.memory_budget)
        if total <= self.memory_budget:
            return
        for link, size in sorted(held, key=lambda item: -item[1]):
            if total <= self.memory_budget:
                return
            if size > 0 and link.conn is not None and not link.conn.closed:
                self._shed(
                    link,
                    f"the server's memory budget of {self.memory_budget} bytes "
                    f"is spent; {size} bytes were held for this peer",
                )
                total -= size

    def _shed(self, link: NodeLink, reason: str) -> None:
        """End the link's connection now (its peer does not read) and act on its end."""
        conn = link.conn
        assert conn is not None
        self.connections_shed += 1
        conn.shed(reason)
        self._out.append(
            FederationEvent(
                type=EventType.LINK_ERROR,
                link_id=link.id,
                code=ErrorCode.FLOW_CONTROL,
                reason=reason,
                fatal=True,
            )
        )
        self.stage(link.id)  # its Closed: unsettled deltas to the outbox / parking

    def _evict_parked(self, excess: int) -> int:
        """Drop parked deltas, the remote parked least recently first and its oldest deltas
        first, until ``excess`` bytes are freed (or none is left); returns the bytes freed."""
        freed = 0
        parked = self._parked
        while freed < excess and parked:
            system_id = next(iter(parked))
            queue = parked[system_id]
            while queue and freed < excess:
                freed += queue.popleft()[1]
                self.parked_dropped += 1
            if not queue:
                del parked[system_id]
        self.parked_bytes -= freed
        return freed

    @property
    def staged(self) -> int:
        """How many received deltas wait for :meth:`commit`."""
        return sum(len(entry[2]) for entry in self._staged)

    @property
    def has_events(self) -> bool:
        """Application events wait for :meth:`commit` (one :meth:`sync_step` may make some)."""
        return bool(self._out)

    def _store_id(self) -> str:
        """This store's identity in the cursors we hand out, made once and kept in the store
        (a memory store gets a new one with every instance)."""
        if self._store_id_cache is None:
            value = self.store.get_meta(STORE_ID_KEY)
            if value is None:
                value = f"{self.system_id}@{self._clock()}"
                self.store.set_meta(STORE_ID_KEY, value)
            self._store_id_cache = value
        return self._store_id_cache

    def _keep_cursor(self, link: NodeLink, cursor: str | None) -> None:
        """Extension cursor: remember how far the server's store has been synced (after the
        batch is stored), so the next sync resumes there."""
        if cursor is not None and link._cursor_key is not None:
            self.store.set_meta(link._cursor_key, cursor)

    def _save_cursor_if_settled(self, link: NodeLink) -> None:
        """Everything this outgoing link had to carry is settled: remember how far the store
        was, so a restart offers the peer only what came after (at most once a second)."""
        conn = link.conn
        if (
            not link.outgoing
            or link.remote_system_id is None
            or conn is None
            or not conn.is_open
            or conn.pending_count
            or link.outbox
            or link._push.state is _CATCHING_UP
        ):
            return
        now = self._clock()
        if now - link._push.saved_at < _CURSOR_SAVE_INTERVAL:
            return
        key = PUSH_CURSOR_KEY.format(link.remote_system_id)
        last = str(self.store.last_sequence())
        if self.store.get_meta(key) != last:
            self.store.set_meta(key, last)
        link._push.saved_at = now

    def _handle(
        self,
        link: NodeLink,
        conn: LinkEndpoint,
        event: Event,
        out: list[FederationEvent],
    ) -> None:
        lid = link.id
        if isinstance(event, DeltaReceived):
            staged = self._staged
            last = staged[-1] if staged else None
            if last is not None and last[1] is conn and last[3] and type(last[2]) is list:
                last[2].append(event.delta)  # live deltas of one connection: one group
            else:
                staged.append((link, conn, [event.delta], True))
        elif isinstance(event, SyncBatchReceived):
            self._staged.append((link, conn, event.deltas, False))
            if event.cursor is not None and link._cursor_key is not None:
                # saved in the same transaction as the batch: free, and never ahead of it
                self._staged_meta[link._cursor_key] = event.cursor
            out.append(
                FederationEvent(type=EventType.SYNC_PROGRESS, link_id=lid, count=len(event.deltas))
            )
        elif isinstance(event, DeltaAcked):
            link.stats.deltas_sent += 1
            if self.report_sent:
                out.append(FederationEvent(type=_DELTA_SENT, link_id=lid, delta_id=event.delta_id))
        elif isinstance(event, DeltaRejected):
            link.stats.deltas_rejected_by_peer += 1
            out.append(
                FederationEvent(
                    type=EventType.DELTA_REJECTED,
                    link_id=lid,
                    delta_id=event.delta_id,
                    reason=event.reason,
                )
            )
        elif isinstance(event, HandshakeComplete):
            self._connected(link, conn, event)
            out.append(FederationEvent(type=EventType.LINK_CONNECTED, link_id=lid))
        elif isinstance(event, SyncRequested):
            self._start_serving_sync(link, conn, event)
        elif isinstance(event, SyncStarted):
            out.append(
                FederationEvent(type=EventType.SYNC_STARTED, link_id=lid, total=event.total_deltas)
            )
        elif isinstance(event, SyncCompleted):
            self._keep_cursor(link, event.cursor)
            link.stats.last_sync_at = self._clock()
            out.append(
                FederationEvent(
                    type=EventType.SYNC_COMPLETED, link_id=lid, count=event.deltas_received
                )
            )
        elif isinstance(event, Paused):
            out.append(FederationEvent(type=EventType.LINK_PAUSED, link_id=lid))
        elif isinstance(event, Resumed):
            out.append(FederationEvent(type=EventType.LINK_RESUMED, link_id=lid))
        elif isinstance(event, ErrorReceived | ProtocolViolation):
            out.append(
                FederationEvent(
                    type=EventType.LINK_ERROR,
                    link_id=lid,
                    reason=f"{event.code}: {event.message}",
                    code=event.code,
                    fatal=isinstance(event, ErrorReceived) and event.fatal,
                )
            )
        elif isinstance(event, PingTimeout):
            out.append(
                FederationEvent(
                    type=EventType.LINK_ERROR,
                    link_id=lid,
                    reason="ping timeout",
                    code=ErrorCode.PING_TIMEOUT,
                    fatal=True,
                )
            )
        elif isinstance(event, Closed):
            link.outbox.extendleft(reversed(event.unsettled))
            if link._serving is not None:
                link._serving.abort()
            if not link.outgoing and link.remote_system_id is not None:
                self._park(link)
            out.append(
                FederationEvent(type=EventType.LINK_DISCONNECTED, link_id=lid, reason=event.reason)
            )

    def _park(self, link: NodeLink) -> None:
        """An incoming link closed: what it could not deliver goes to another open incoming link
        of the same remote (it reconnected before we noticed this one was dead), else waits for
        the remote's next connection (an incoming link's record ends with its connection)."""
        for other in self._links.values():
            if (
                other is not link
                and not other.outgoing
                and other.connected
                and other.remote_system_id == link.remote_system_id
            ):
                for delta in link.outbox:
                    if self._wants(other, delta):
                        self._send(other, delta)
                link.outbox.clear()
                return
        system_id = link.remote_system_id or ""
        parked = self._parked.pop(system_id, None) or deque()
        self._parked[system_id] = parked  # the remote parked most recently goes last
        added = [(delta, len(encode_value(delta))) for delta in link.outbox]
        parked.extend(added)
        self.parked_bytes += sum(size for _, size in added)
        link.outbox.clear()
        while len(parked) > self.max_parked:
            self.parked_bytes -= parked.popleft()[1]
            self.parked_dropped += 1
        if not parked:
            del self._parked[system_id]
        self._bound_memory()

    def _connected(self, link: NodeLink, conn: LinkEndpoint, event: HandshakeComplete) -> None:
        link.remote_system_id = event.remote_system_id
        link.stats.connected_at = self._clock()
        if not conn.is_open:  # closed by the same input as the handshake: nothing to start
            return
        if conn.role is Role.SERVER:
            remote = event.remote_config
            link.config = LinkConfig.mirror(remote)
            link.remote_pull_filter = remote.pull_filter if remote else None
            parked = self._parked.pop(event.remote_system_id, ())
            self.parked_bytes -= sum(size for _, size in parked)
            link.outbox.extend(d for d, _ in parked if self._wants(link, d))
        else:
            cfg = link.config
            if cfg.receives and cfg.initial_sync != "none":
                from_cursor = None
                if "cursor" in conn.extensions_agreed:
                    pull = encode_value(cfg.pull_filter) if cfg.pull_filter else ""
                    link._cursor_key = SYNC_CURSOR_KEY.format(event.remote_system_id, pull)
                    from_cursor = self.store.get_meta(link._cursor_key)
                conn.request_sync(
                    filter=cfg.pull_filter,
                    from_timestamp=cfg.sync_from_timestamp
                    if cfg.initial_sync == "from_timestamp"
                    else None,
                    from_cursor=from_cursor,
                )
        if link.paused:
            conn.pause()
        if link.outgoing and link.config.sends:
            saved = self.store.get_meta(PUSH_CURSOR_KEY.format(event.remote_system_id))
            link._push.start(int(saved or 0), self.store.last_sequence())
        while link.outbox:
            delta = link.outbox.popleft()
            if not conn.is_pending(delta.id):
                conn.send_delta(delta, validate=False)

    # ---------------------------------------------------------------- receiving

    def _verdict(self, link: NodeLink, delta: Delta) -> str | None:
        """Why ``delta`` may not be stored from this link, or ``None``."""
        cfg = link.config
        if not cfg.receives:
            return f"link mode {cfg.mode} does not accept deltas"
        if cfg.pull_filter is not None and not cfg.pull_filter.matches(delta):
            return "filtered out by pull filter"
        policy = cfg.trust_policy or self.trust_policy
        return policy.check(delta)

    def _checks(self, link: NodeLink) -> bool:
        """Whether what the link brings must pass :meth:`_verdict` (else everything may)."""
        cfg = link.config
        policy = cfg.trust_policy or self.trust_policy
        return not (
            cfg.receives and cfg.pull_filter is None and type(policy) is PermissiveTrustPolicy
        )

    def _store_staged(self) -> None:
        """Group commit: settle every staged delta (already stored: acknowledge; refused:
        nack), store the accepted ones and the staged meta in one transaction, then
        acknowledge, report and relay them."""
        staged, self._staged = self._staged, []
        meta, self._staged_meta = self._staged_meta, {}
        store, out = self.store, self._out
        # the common case decided once per group: everything is let through (then nothing
        # needs a look-up first: the store skips what it holds)
        checked = [self._checks(link) for link, _, _, _ in staged]
        stored = store.stored_ids(
            [d.id for entry, check in zip(staged, checked, strict=True) if check for d in entry[2]]
        )
        accepted: list[_Staged] = []
        for (link, conn, deltas, live), check in zip(staged, checked, strict=True):
            if not check:  # the store skips what it holds; live ones are acked after it
                accepted.append((link, conn, deltas, live))
                continue
            keep: list[Delta] = []
            for delta in deltas:
                if delta.id in stored:
                    if not self._conflict(link, conn, delta) and live:
                        conn.ack(delta.id)
                    continue
                try:
                    reason = self._verdict(link, delta)
                except Exception as exc:  # a policy failing on what a peer sent: refused
                    reason = f"trust policy failed on this delta: {type(exc).__name__}"
                if reason is None:
                    keep.append(delta)
                    continue
                link.stats.deltas_rejected += 1
                conn.nack(delta.id, reason)
                out.append(
                    FederationEvent(
                        type=EventType.DELTA_REJECTED, link_id=link.id, delta=delta, reason=reason
                    )
                )
            if keep:
                accepted.append((link, conn, keep, live))
        try:
            seqs = iter(
                store.put_many(
                    [d for entry in accepted for d in entry[2]], validate=False, meta=meta or None
                )
            )
        except BaseException:
            # nothing was acknowledged: try again at the next commit, except what came on
            # connections that are gone (their peers send it again)
            self._staged[:0] = [e for e in accepted if not e[1].closed]
            self._staged_meta = {**meta, **self._staged_meta}
            raise
        report = self.report_received
        relay = self.auto_broadcast and len(self._links) > 1
        for link, conn, deltas, live in accepted:
            stats = link.stats
            for delta in deltas:
                seq = next(seqs)
                if seq is not None:
                    stats.deltas_received += 1
                    if report:
                        out.append(
                            FederationEvent(type=_DELTA_RECEIVED, link_id=link.id, delta=delta)
                        )
                    if relay:
                        self._broadcast(delta, source=link, seq=seq)
                elif self._conflict(link, conn, delta):
                    continue
                if live:
                    conn.ack(delta.id)

    def _conflict(self, link: NodeLink, conn: LinkEndpoint, delta: Delta) -> bool:
        """``delta``'s id is stored: if the stored delta says something else (another
        timestamp, author, system or pointers; a signature alone is no difference), refuse
        the newcomer with a nack, count it and report it. The stored one is kept."""
        stored = self.store.get(delta.id)
        if stored is None or (
            stored.timestamp == delta.timestamp
            and stored.author == delta.author
            and stored.system == delta.system
            and stored.pointers == delta.pointers
        ):
            return False
        reason = f"conflict: a different delta with id {delta.id!r} is already stored (kept)"
        link.stats.deltas_conflicting += 1
        conn.nack(delta.id, reason)
        self._out.append(
            FederationEvent(
                type=EventType.DELTA_REJECTED,
                link_id=link.id,
                delta=delta,
                reason=reason,
                code=ErrorCode.CONFLICT,
            )
        )
        return True

    # ---------------------------------------------------------------- sending

    def _wants(self, link: NodeLink, delta: Delta) -> bool:
        cfg = link.config
        if not cfg.sends:
            return False
        is_negated = self.store.is_negated
        for flt in (cfg.push_filter, link.remote_pull_filter):
            if flt is not None and not flt.matches(delta, is_negated):
                return False
        return True

    def _send(self, link: NodeLink, delta: Delta, seq: int | None = None) -> None:
        """Queue ``delta`` on the link; ``seq``: its place in the store, for a stored delta.

        A stored delta is not queued beyond ``max_queued`` pending on the connection (held
        while the peer paused us, or unacknowledged): the link then catches up from the store
        instead (:meth:`sync_step`, within the push window), so a slow peer costs bounded
        memory and still gets everything, in storage order."""
        conn = link.conn
        if conn is None or conn.state in (State.CLOSING, State.CLOSED):
            link.outbox.append(delta)
            return
        if seq is not None:
            push = link._push
            if push.state is _CATCHING_UP:  # the store has it, in order
                push.extend(seq)
                return
            if link._full(conn, self.max_queued):  # never shed for it
                push.overflow(seq)
                link.stats.overflows += 1
                return
        if not conn.is_pending(delta.id):
            conn.send_delta(delta, validate=False)

    def _broadcast(self, delta: Delta, source: NodeLink | None, seq: int | None = None) -> None:
        for link in self._links.values():
            if link is source or not self._wants(link, delta):
                continue
            if not link.outgoing and not link.connected:
                continue  # an incoming link's mode and pull filter are known after its hello
            self._send(link, delta, seq)

    # ---------------------------------------------------------------- serving a sync

    def _start_serving_sync(self, link: NodeLink, conn: LinkEndpoint, event: SyncRequested) -> None:
        if not link.config.sends:
            conn.reject_sync(
                f"link mode {link.config.mode} does not send", code=ErrorCode.SYNC_NOT_SUPPORTED
            )
            return
        # the client usually sends its pull filter twice (hello and sync_request): once is enough
        filters = tuple(
            dict.fromkeys(
                f
                for f in (event.filter, link.config.push_filter, link.remote_pull_filter)
                if f is not None
            )
        )
        # extension cursor: stream in storage order from the client's cursor, so a resumed
        # sync gets exactly what was stored since, whatever the clocks say
        cursor = "cursor" in conn.extensions_agreed
        after: int | None = None
        if cursor and event.from_cursor is not None:
            store_id, _, seq = event.from_cursor.rpartition(":")
            if not (seq.isascii() and seq.isdigit() and len(seq) <= 18):
                conn.reject_sync(f"invalid cursor {event.from_cursor[:40]!r}")
                return
            # a cursor of another store (this one was replaced or is in memory and restarted)
            # says nothing here: sync from the beginning
            after = int(seq) if store_id == self._store_id() else None
        link._serving = serving = SyncServer(
            self.store,
            filters=filters,
            from_timestamp=event.from_timestamp or 0,
            cursor=cursor,
            after=after,
            store_id=self._store_id() if cursor else "",
            batch_size=self.batch_size,
            max_batch_bytes=self.max_batch_bytes,
            max_delta_bytes=self._max_delta_bytes,
        )
        conn.start_sync(serving.total, self.batch_size)

    def sync_step(self, link_id: str) -> bool:
        """Send the next batch of the link's initial sync; ``True`` while more remain.

        Call it while the link's transport has room; it sends nothing while the peer has paused
        us (the batch would only be held) and returns ``True`` so the caller tries again later.
        A batch holds at most ``batch_size`` deltas and ``max_batch_bytes`` of them (at least
        one); the deltas go out as the store keeps their text. A delta too large for any
        message the peer accepts is skipped, counted (``LinkStats.deltas_too_large``) and
        reported (``link:error``, handed out by the next :meth:`commit`), never retried.
        Without an initial sync to serve, the link's catch-up from the store goes on instead.
        """
        link = self._require(link_id)
        conn = link.conn
        serving = link._serving
        if serving is None or serving.state is not _STREAMING:
            if link._push.state is _CATCHING_UP and conn is not None:
                return self._push_step(link, conn)
            return False
        if conn is None or not conn.is_open:
            serving.abort()
            return False
        if conn.peer_paused:
            return True
        batch = serving.next_batch()
        for text in batch.too_large:
            self._too_large(link, text)
        if batch.send:
            conn.send_sync_batch(batch.deltas, last=batch.last, cursor=batch.cursor)
        if batch.last:
            conn.complete_sync(cursor=batch.cursor)
            link.stats.last_sync_at = self._clock()
        return not batch.last

    def _too_large(self, link: NodeLink, text: bytes) -> None:
        """A stored delta is too large for any message the peer accepts: report it, once."""
        link.stats.deltas_too_large += 1
        try:
            delta_id = _decode_delta(text).id
        except msgspec.MsgspecError:
            delta_id = "?"
        self._out.append(
            FederationEvent(
                type=EventType.LINK_ERROR,
                link_id=link.id,
                delta_id=delta_id,
                code=ErrorCode.MESSAGE_TOO_LARGE,
                reason=f"delta {delta_id!r} is {len(text)} bytes, too large for a message "
                f"of at most {self.max_message_size} bytes: not sent",
            )
        )

    def _push_step(self, link: NodeLink, conn: LinkEndpoint) -> bool:
        """Offer the peer the next stored deltas it may have missed (an outgoing link's catch-up
        after a restart, or a link that overflowed; v1 has no client-to-server sync), within
        the in-flight window. Deltas the peer already holds are acknowledged and ignored by it."""
        push = link._push
        if not conn.is_open or push.state is not _CATCHING_UP:
            return False
        if conn.peer_paused or link._full(conn, PUSH_WINDOW):
            return True
        room = min(self.batch_size, PUSH_WINDOW - conn.pending_count)
        for delta in push.take(self.store, room):
            if self._wants(link, delta) and not conn.is_pending(delta.id):
                conn.send_delta(delta, validate=False)
        return push.state is _CATCHING_UP

    def _require(self, link_id: str) -> NodeLink:
        link = self._links.get(link_id)
        if link is None:
            raise LocalProtocolError(f"no link {link_id!r}", code=ErrorCode.UNEXPECTED_MESSAGE)
        return link
