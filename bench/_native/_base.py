"""What the three adapters (asyncio, trio, threads) share that has nothing to do with their runtime.

:class:`DBBase` holds an instance's state and bookkeeping: the store it opened, the
:class:`~rhizome_proto.FederationNode`, the event-handler registry, the link views and their
status as the node's events report it, the local delta API and the reconnect schedule.
:class:`LinkBase` is the link view. Each adapter subclasses both and adds only what its runtime
decides: sockets, tasks or threads, waking writers, running the core's timer, scheduling
coroutine handlers, and the ``async`` (or blocking) surface of the API.

Everything a subclass must supply is an abstract method below; the threaded adapter also
overrides :meth:`DBBase._guard` (its lock around the node) and ``_emit``.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import inspect
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from ssl import SSLContext, create_default_context
from typing import Any, Generic, Literal, Protocol, TypeAlias, TypeVar
from urllib.parse import urlsplit

from rhizome_adapters.storage import open_store
from rhizome_proto import (
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_PATH,
    Delta,
    DeltaFilter,
    DeltaStore,
    FederationConnection,
    FederationEvent,
    FederationNode,
    LinkConfig,
    LinkStats,
    NodeLink,
    Pointer,
    Role,
    TrustPolicy,
)

__all__ = [
    "CLOSE_GRACE",
    "DISCONNECT_WAIT",
    "READ_SIZE",
    "REFUSAL",
    "SYNC_BUFFER",
    "DBBase",
    "EventHandler",
    "EventHandlers",
    "LinkBase",
    "LinkStatus",
    "LiveConnection",
    "host_port",
    "listen_error",
    "parse_url",
]

LinkStatus: TypeAlias = Literal[
    "connecting", "connected", "paused", "disconnected", "reconnecting", "failed"
]
#: A handler of federation events: a plain function or (asyncio, trio) a coroutine function.
EventHandler: TypeAlias = Callable[[FederationEvent], Awaitable[None] | None]

#: Bytes asked of the transport per read.
READ_SIZE = 64 * 1024
#: Bytes of sync batches queued before they are written (several batches per write), and
#: written between two turns a streaming writer gives the rest of the runtime.
SYNC_BUFFER = 256 * 1024
#: Seconds a closed connection's transport gets to flush its last bytes before it is aborted.
CLOSE_GRACE = 5.0
#: Seconds ``disconnect``/``close`` wait for a link to end (the core's close timeout is 10 s).
DISCONNECT_WAIT = 15.0
_REFUSAL_BODY = b"Too many connections\n"
#: The whole answer to a connection beyond ``max_connections``.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


def parse_url(url: str) -> tuple[str, int, str, bool]:
    """``ws://host[:port]/path`` or ``wss://...`` as ``(host, port, path, secure)``; the path
    keeps its query; the port defaults to 80 (``ws``) or 443 (``wss``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(
            f"unsupported federation URL {url!r}: expected ws://host[:port]/path or wss://..."
        )
    secure = parts.scheme == "wss"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or (443 if secure else 80), path, secure


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(exc: OSError, host: str, port: int) -> OSError:
    """A failure to listen, saying where and why."""
    why = "the address is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
    return OSError(exc.errno, f"cannot listen on {host}:{port}: {why or exc}")


class EventHandlers:
    """The handlers subscribed with ``on_federation_event``, called in subscription order.

    A handler's exception is logged (to the adapter's logger) and never reaches a link. What a
    coroutine handler returns is handed back to the adapter to schedule in its runtime.
    """

    def __init__(self, log: logging.Logger) -> None:
        #: each handler with the event types it asked for (``None``: all)
        self._handlers: list[tuple[EventHandler, frozenset[str] | None]] = []
        self.log = log

    def subscribe(
        self, handler: EventHandler, types: Iterable[str] | None = None
    ) -> Callable[[], None]:
        entry = (handler, None if types is None else frozenset(types))
        self._handlers.append(entry)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._handlers.remove(entry)

        return unsubscribe

    def wants(self, event_type: str) -> bool:
        """Whether some handler asked for events of this type."""
        return any(types is None or event_type in types for _, types in self._handlers)

    def call(self, event: FederationEvent) -> list[Awaitable[Any]]:
        """Call every handler that asked for the event's type; return the awaitables the
        coroutine handlers gave back."""
        pending: list[Awaitable[Any]] = []
        for handler, types in list(self._handlers):
            if types is not None and event.type not in types:
                continue
            try:
                result = handler(event)
            except Exception:
                self.log.exception("federation event handler failed on %s", event.type)
                continue
            if result is not None and inspect.isawaitable(result):
                pending.append(result)
        return pending

    def failed(self, exc: BaseException) -> None:
        """A coroutine handler raised ``exc`` (reported by the adapter that ran it)."""
        self.log.error("federation event handler failed", exc_info=exc)


class _Settable(Protocol):
    """``asyncio.Event``, ``trio.Event`` or ``threading.Event``: set once a link settled."""

    def set(self) -> None: ...


class LiveConnection(Protocol):
    """A live connection of a link, as each adapter keeps it (its ``_Session``)."""

    @property
    def conn(self) -> FederationConnection: ...

    @property
    def link(self) -> LinkBase: ...

    def rearm(self) -> None:
        """The core's deadline may have moved: wake up for the new one."""

    def closing(self) -> None:
        """The core is done: the transport must end within the grace, flushed or not."""


class LinkBase:
    """A view over one link: the node's :class:`~rhizome_proto.NodeLink` and its live connection.

    ``status``: ``"connecting"`` (before the first handshake), ``"connected"``, ``"paused"``
    (we paused the peer), ``"reconnecting"`` (an outgoing link lost its connection),
    ``"disconnected"`` (ended) or ``"failed"`` (the reconnect policy gave up).
    """

    def __init__(self, db: DBBase[Any], node_link: NodeLink, settled: _Settable) -> None:
        self._db = db
        self._node_link = node_link
        self._state: LinkStatus = "connecting"
        self._session: LiveConnection | None = None
        self._stopping = False
        self._handshakes = 0
        self._settled = settled  # first handshake, or the link ended without one
        #: the first transport failure since the last handshake, if any
        self.failure: str | None = None

    @property
    def id(self) -> str:
        return self._node_link.id

    @property
    def outgoing(self) -> bool:
        return self._node_link.outgoing

    @property
    def remote_system_id(self) -> str | None:
        return self._node_link.remote_system_id

    @property
    def remote_url(self) -> str | None:
        return self._node_link.remote_url

    @property
    def config(self) -> LinkConfig:
        return self._node_link.config

    @property
    def stats(self) -> LinkStats:
        """The node's counters; the adapter counts ``bytes_sent`` / ``bytes_received``."""
        return self._node_link.stats

    @property
    def status(self) -> LinkStatus:
        if self._state == "connected" and self._node_link.paused:
            return "paused"
        return self._state

    def _pause(self, paused: bool) -> None:
        """``pause()`` / ``resume()``: on the open connection, and for every later one."""
        with self._db._guard():
            session = self._session
            if session is None or not session.conn.is_open:
                raise ConnectionError(self._describe())
            (self._db._node.pause if paused else self._db._node.resume)(self.id)
        self._db._wake_writers()

    def _send_delta(self, delta: Delta) -> None:
        """``send_delta()``: on this link only (kept in the link's outbox while it is down)."""
        if self._state in ("disconnected", "failed"):
            raise ConnectionError(self._describe())
        with self._db._guard():
            self._db._node.send_delta(self.id, delta)
        self._db._wake_writers()

    def _sync_ready(self, conn: FederationConnection) -> bool:
        """``conn`` is the link's live connection and the node has a batch to stream on it."""
        node_link = self._node_link
        return node_link.conn is conn and node_link.sync_ready

    def _describe(self) -> str:
        failure = f": {self.failure}" if self.failure else ""
        return f"link {self.id} to {self.remote_url} is {self.status}{failure}"

    def __repr__(self) -> str:
        return f"<FederationLink {self.id} {self.remote_url} {self.status}>"


LinkT = TypeVar("LinkT", bound=LinkBase)


class DBBase(abc.ABC, Generic[LinkT]):
    """The runtime-independent half of ``FederatedRhizomeDB``.

    ``storage`` picks a new ``"memory"`` or ``"sqlite"`` store (``path`` for the file) unless
    ``store`` is given; a store passed in is not closed by ``close()``. ``trust_policy`` applies
    to links without one of their own; ``auto_broadcast`` relays what one link brings to the
    others; ``batch_size`` is the deltas per initial-sync batch served; ``ping_interval`` and
    ``ping_timeout`` (seconds) keep quiet links alive and detect dead ones; a message over
    ``max_message_size`` bytes closes its connection; ``extensions`` are those of ours to
    offer and accept (``()``: plain v1; see docs/extensions.md).
    """

    def __init__(
        self,
        *,
        system_id: str | None = None,
        storage: Literal["memory", "sqlite"] = "memory",
        path: str | None = None,
        store: DeltaStore | None = None,
        trust_policy: TrustPolicy | None = None,
        auto_broadcast: bool = True,
        batch_size: int = 100,
        ping_interval: float = 30.0,
        ping_timeout: float = 90.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= 0 or max_message_size < 1:
            raise ValueError("ping_interval, ping_timeout and max_message_size must be positive")
        self._system_id = system_id or str(uuid.uuid4())
        self._owns_store = store is None
        self._store: DeltaStore = open_store(storage, path) if store is None else store
        self._node = FederationNode(
            self._system_id,
            self._store,
            clock=self._clock,
            trust_policy=trust_policy,
            auto_broadcast=auto_broadcast,
            batch_size=batch_size,
            extensions=extensions,
            max_message_size=max_message_size,
        )
        # until a handler asks for them, no event per received or acknowledged delta
        self._node.report_received = self._node.report_sent = False
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_message_size = max_message_size
        self._links: dict[str, LinkT] = {}
        self._logger = self._log()
        self._handlers = EventHandlers(self._logger)
        self._server_url: str | None = None
        self._server_path = DEFAULT_PATH
        self._max_connections = 100
        self._closed = False
        self._init_runtime()

    # ---------------------------------------------------------------- for the adapters

    def _init_runtime(self) -> None:
        """Set up the adapter's own state (called at the end of ``__init__``)."""

    @abc.abstractmethod
    def _log(self) -> logging.Logger:
        """The adapter's logger (handler failures are logged there)."""
        ...

    @abc.abstractmethod
    def _new_link(self, node_link: NodeLink) -> LinkT: ...

    @abc.abstractmethod
    def _wake_writers(self) -> None:
        """Something may have been queued on any connection: let every writer look."""
        ...

    @abc.abstractmethod
    def _schedule(self, pending: Awaitable[Any]) -> None:
        """Run what a coroutine handler returned, in the adapter's runtime."""
        ...

    @abc.abstractmethod
    def _now(self) -> float:
        """The runtime's monotonic clock, the ``now`` of the core's calls."""
        ...

    def _guard(self) -> contextlib.AbstractContextManager[object]:
        """Held around every call into the node (the threaded adapter's lock)."""
        return contextlib.nullcontext()

    @staticmethod
    def _clock() -> int:
        return int(time.time() * 1000)

    # ---------------------------------------------------------------- properties

    @property
    def system_id(self) -> str:
        return self._system_id

    @property
    def store(self) -> DeltaStore:
        return self._store

    @property
    def node(self) -> FederationNode:
        return self._node

    @property
    def server_url(self) -> str | None:
        """``ws://host:port/path`` (``wss://`` with TLS) once ``enable_server`` ran, else
        ``None``."""
        return self._server_url

    # ---------------------------------------------------------------- deltas

    def create_delta(
        self,
        author: str,
        pointers: Iterable[Pointer | Mapping[str, Any]],
        *,
        id: str | None = None,
        timestamp: float | None = None,
    ) -> Delta:
        """A new validated delta of this system (not stored: see ``persist_delta``)."""
        with self._guard():
            return self._node.create_delta(
                author, pointers, id=id or str(uuid.uuid4()), timestamp=timestamp
            )

    def _persist(self, deltas: Iterable[Delta]) -> list[bool]:
        with self._guard():
            self._check_open()
            stored = self._node.persist_deltas(deltas)
        self._wake_writers()
        return stored

    def get_delta_by_id(self, delta_id: str) -> Delta | None:
        with self._guard():
            return self._store.get(delta_id)

    def scan_deltas(
        self, filter: DeltaFilter | None = None, *, limit: int | None = None
    ) -> list[Delta]:
        """Stored deltas matching ``filter``, in storage order, at most ``limit``."""
        out: list[Delta] = []
        after = 0
        while limit is None or len(out) < limit:
            page_size = 1000 if limit is None else min(1000, limit - len(out))
            with self._guard():
                page = self._store.scan(after=after, filter=filter, limit=page_size)
            if not page:
                break
            out.extend(delta for _, delta in page)
            after = page[-1][0]
        return out

    # ---------------------------------------------------------------- events

    def on_federation_event(
        self, handler: EventHandler, types: Iterable[str] | None = None
    ) -> Callable[[], None]:
        """Call ``handler(event)`` for every event, or only for events whose ``type`` is in
        ``types``; returns a function that unsubscribes.

        A coroutine handler runs as its own task. Exceptions are logged and never reach a link.
        While no handler asks for ``delta:received`` (or ``delta:sent``), received (or
        acknowledged) deltas are not reported one by one (a sync still reports
        ``sync:progress`` per batch): asking only for the types you use saves an event per
        delta.
        """
        unsubscribe = self._handlers.subscribe(handler, types)
        self._per_delta_events()

        def unsubscribe_and_update() -> None:
            unsubscribe()
            self._per_delta_events()

        return unsubscribe_and_update

    def _per_delta_events(self) -> None:
        """Make an event per received or acknowledged delta only if a handler wants it."""
        self._node.report_received = self._handlers.wants("delta:received")
        self._node.report_sent = self._handlers.wants("delta:sent")

    def _emit(self, event: FederationEvent) -> None:
        for pending in self._handlers.call(event):
            self._schedule(pending)

    def _note(self, event: FederationEvent) -> None:
        """A link's status as the node's events tell it."""
        link = self._links.get(event.link_id)
        if link is not None and event.type == "link:connected":
            link._state, link.failure = "connected", None
            link._handshakes += 1
            link._settled.set()
        elif link is not None and event.type == "link:disconnected":
            ending = link._stopping or not link.outgoing
            link._state = "disconnected" if ending else "reconnecting"

    def _dispatch(self, events: Iterable[FederationEvent]) -> None:
        for event in events:
            self._note(event)
            self._emit(event)

    # ---------------------------------------------------------------- the pump

    def _pump(self, session: LiveConnection) -> None:
        """After any input on ``session``: its events staged in the node, its timer re-armed,
        and a commit asked for (:meth:`_commit_soon`), which stores what every link staged,
        acknowledges it, wakes the writers and hands the events to the handlers."""
        conn, link = session.conn, session.link
        with self._guard():
            node_link = self._node.link(link.id)
            if node_link is not None and node_link.conn is conn:  # else a stale connection
                self._node.stage(link.id)
            closed = conn.closed
        session.rearm()
        if closed:
            session.closing()
        self._commit_soon()

    def _commit_soon(self) -> None:
        """Commit once every connection with input ready has been pumped (group commit). This
        commits at once; the asyncio adapter waits for the end of the loop's cycle."""
        self._commit()

    def _stream_sync(self, link: LinkBase, conn: FederationConnection) -> None:
        """The next batches of the link's sync (or push catch-up), until ``SYNC_BUFFER`` bytes
        wait to be written or none is ready: one write carries several batches."""
        self._node.sync_step(link.id)
        while conn.outbound_size < SYNC_BUFFER and link._sync_ready(conn):
            self._node.sync_step(link.id)

    def _sync_step(self, link: LinkBase, conn: FederationConnection) -> None:
        """:meth:`_stream_sync`; the events it made (a delta too large to send) are
        dispatched with the next commit."""
        self._stream_sync(link, conn)
        if self._node.has_events:
            self._commit_soon()

    def _commit(self) -> None:
        """Store what the links staged (one transaction), acknowledge it, wake the writers and
        dispatch the events."""
        events = self._node.commit()
        self._wake_writers()
        self._dispatch(events)

    def _fail(self, session: LiveConnection, exc: BaseException) -> None:
        """A transport failure: report it (``link:error``); the core sees the connection lost."""
        with self._guard():
            closed = session.conn.closed
        if not closed:  # else the core knows; make sure its last events were handled
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._transport_error(session.link, reason)
            with self._guard():
                session.conn.connection_lost(self._now(), reason)
        self._pump(session)

    def _transport_error(self, link: LinkBase, reason: str) -> None:
        link.failure = link.failure or reason
        self._emit(FederationEvent(type="link:error", link_id=link.id, reason=reason))

    def _retry_delay(self, link: LinkBase, attempt: int) -> float | None:
        """Seconds before retry ``attempt`` of an outgoing link, or ``None``: the policy gave up
        (the link is ``failed``, ``link:error`` says why)."""
        delay = link.config.reconnect.delay(attempt, random.random())
        if delay is None:
            reason = f"gave up on {link.remote_url} after {attempt} attempt(s)"
            first = f"; first failure: {link.failure}" if link.failure else ""
            link._state, link.failure = "failed", reason + first
            self._emit(FederationEvent(type="link:error", link_id=link.id, reason=link.failure))
        return delay

    def _settled_link(self, link: LinkT, url: str) -> LinkT:
        """``connect_to_remote(wait=True)`` once the link settled: the link if it connected,
        else it is forgotten and :class:`ConnectionError` says why."""
        if link._handshakes == 0:
            self._forget(link)
            raise ConnectionError(link.failure or f"could not connect to {url}")
        return link

    def _crashed(self, link: LinkBase, exc: Exception) -> None:
        """An outgoing link's loop failed unexpectedly (a bug): it is ``failed``."""
        self._logger.exception("link %s failed", link.id)
        link._state, link.failure = "failed", f"{type(exc).__name__}: {exc}"

    # ---------------------------------------------------------------- links

    def _new_connection(self, role: Role, **options: Any) -> FederationConnection:
        return FederationConnection(
            role,
            system_id=self._system_id,
            clock=self._clock,
            max_message_size=self._max_message_size,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            extensions=self._node.extensions,
            **options,
        )

    def _client_connection(
        self, link: LinkT, host: str, port: int, path: str, headers: Sequence[tuple[str, str]]
    ) -> FederationConnection:
        return self._new_connection(
            Role.CLIENT,
            config=link.config.to_wire(),
            host=host_port(host, port),
            path=path,
            extra_headers=headers,
        )

    def _add_link(
        self, config: LinkConfig | None, *, outgoing: bool, remote_url: str | None
    ) -> LinkT:
        with self._guard():
            node_link = self._node.add_link(
                str(uuid.uuid4()), config, outgoing=outgoing, remote_url=remote_url
            )
            link = self._new_link(node_link)
            self._links[link.id] = link
        return link

    def _incoming_link(self, peer: object) -> tuple[LinkT, FederationConnection] | None:
        """A link and server connection for a new incoming connection from ``peer`` (a socket
        address), or ``None`` when it must be refused (closed, or ``max_connections``)."""
        incoming = sum(1 for link in list(self._links.values()) if not link.outgoing)
        if self._closed or incoming >= self._max_connections:
            return None
        remote = host_port(str(peer[0]), peer[1]) if isinstance(peer, tuple) else None
        link = self._add_link(None, outgoing=False, remote_url=remote)
        conn = self._new_connection(Role.SERVER, link_id=link.id, path=self._server_path)
        return link, conn

    def _outgoing_link(
        self, url: str, config: LinkConfig | None, ssl: SSLContext | None
    ) -> tuple[LinkT, str, int, str, SSLContext | None]:
        """``connect_to_remote``'s checks, then the new link, the URL's host, port and path and
        the TLS context to use (``ssl``, or the system's trust store, for ``wss://``)."""
        self._check_open()
        host, port, path, secure = parse_url(url)
        if ssl is not None and not secure:
            raise ValueError(f"an ssl context needs a wss:// URL, not {url!r}")
        context = (ssl or create_default_context()) if secure else None
        link = self._add_link(config or LinkConfig(), outgoing=True, remote_url=url)
        return link, host, port, path, context

    def _start_server(self, auto_broadcast: bool | None) -> None:
        """``enable_server``'s checks and its ``auto_broadcast`` (which overrides the instance's
        setting, as the seed's server config does)."""
        self._check_open()
        if auto_broadcast is not None:
            self._node.auto_broadcast = auto_broadcast
        if self._server_url is not None:
            raise RuntimeError(f"the server is already running at {self._server_url}")

    def _serving(
        self, host: str, port: int, path: str, max_connections: int, secure: bool = False
    ) -> str:
        """The server listens on ``port``: remember where, return the URL."""
        self._server_path, self._max_connections = path, max_connections
        self._server_url = f"{'wss' if secure else 'ws'}://{host_port(host, port)}{path}"
        return self._server_url

    def _forget(self, link: LinkT) -> None:
        with self._guard():
            self._node.remove_link(link.id)
            self._links.pop(link.id, None)
        if link._state != "failed":
            link._state = "disconnected"
        link._settled.set()

    def _link(self, link_id: str) -> LinkT:
        link = self._links.get(link_id)
        if link is None:
            raise KeyError(f"no link {link_id!r}")
        return link

    def get_federation_links(self) -> list[LinkT]:
        return list(self._links.values())

    def get_federation_link(self, link_id: str) -> LinkT | None:
        return self._links.get(link_id)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this FederatedRhizomeDB is closed")
