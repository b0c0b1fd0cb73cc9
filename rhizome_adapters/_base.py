"""What the adapters (anyio for asyncio and trio, threads) share that has nothing to do with their
runtime.

:class:`DBBase` holds an instance's state and every decision an adapter would otherwise make:
the store it opened, the :class:`~rhizome_proto.FederationNode`, the event handlers, the links
(one :class:`LinkRun` each: status, live connection, handshakes, failure), the pump after every
input, group commit, streaming an initial sync, transport failures, driving each outgoing link's
:class:`~rhizome_proto.ReconnectSupervisor` (:meth:`DBBase._attempts`: the core decides when to
connect again), disconnecting, admission and refusing a connection over the limit.
:class:`LinkBase` is the link view users hold; it reads its :class:`LinkRun` and acts through
the callables the instance put there.

It also holds every flow of I/O, once, as a generator of steps (:mod:`._io`): a connection's
reader (:meth:`DBBase._reading`, which answers its own input while the writer waits) and writer
(:meth:`DBBase._writing`), the server's accepting (:meth:`DBBase._listening`) and pending
connections (:meth:`DBBase._pending`: admission, TLS handshake, request head, then a link or a
refusal), an outgoing link's attempts (:meth:`DBBase._outgoing`) and TLS
(:class:`~._io.TLS`, sans-IO). An adapter runs a flow with its ``_drive``, which does each step
in its runtime's way.

An adapter subclasses both classes and adds only what its runtime decides: its ``_drive``,
tasks or threads, how a writer waits to be woken (:class:`Session`), running coroutine
handlers, and the ``async`` (or blocking) form of the public methods declared (and documented)
here; ``enable_server`` and ``connect_to_remote`` take their parameters from :mod:`._options`.
It talks to the base through the methods below (its own, by inheritance) and reads no private
attribute of another object. The abstract methods and the class attributes ``_run_type``,
``_link_type`` and ``_logger`` are what it must supply; the threaded adapter also overrides
:meth:`DBBase._guard` (its lock around the node), the anyio adapter sets ``_group_commit``
(with :meth:`DBBase._commit_later`: a task per turn that needs one) and ``_broken`` (anyio's
transport errors).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from ssl import SSLContext, create_default_context
from typing import Any, Generic, Literal, Protocol, TypeAlias, TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rhizome_proto import (
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_ID_LENGTH,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_PATH,
    Admission,
    AdmissionLimits,
    Credentials,
    Delta,
    DeltaFilter,
    ErrorCode,
    EventType,
    FederationConnection,
    FederationEvent,
    FederationNode,
    LinkConfig,
    LinkStats,
    NodeLink,
    Pointer,
    ReconnectState,
    ReconnectSupervisor,
    RemoteProtocolError,
    Role,
    Ticket,
    TrustPolicy,
    server_path,
)

from ._io import TLS, Accept, Connect, Receive, Send, Serve, Sleep, Start, Steps, Wait
from ._options import ConnectOptions, ServerOptions, Target
from .storage import Store, open_store

__all__ = [
    "CLOSE_GRACE",
    "DISCONNECT_WAIT",
    "READ_SIZE",
    "READ_WAIT",
    "REFUSAL",
    "SYNC_BUFFER",
    "DBBase",
    "EventHandler",
    "EventHandlers",
    "LinkBase",
    "LinkRun",
    "LinkStatus",
    "Session",
    "head_read",
    "host_port",
    "parse_url",
    "refusal",
    "shut",
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
#: Seconds a refused client is asked to wait (``Retry-After``) before trying again.
RETRY_AFTER = 5
#: Seconds a refusal may take to write.
REFUSAL_WAIT = 2.0
#: Seconds the server waits after ``accept`` failed (out of file descriptors, perhaps).
ACCEPT_RETRY = 0.5
#: Longest a reader waits for input before it looks at the core's deadline again (one set
#: meanwhile by another thread: an adapter whose :meth:`Session.rearm` cannot move a read's
#: deadline).
READ_WAIT = 1.0
#: Seconds a client's TLS handshake may take.
TLS_HANDSHAKE_TIMEOUT = 60.0
#: How early a runtime's timer may fire (asyncio's goes by its clock's resolution).
CLOCK_SLACK = 0.002


def refusal(reason: str = "Too many connections") -> bytes:
    """The whole answer to an upgrade refused for want of an open slot: HTTP 503 with
    ``Retry-After`` (the connection is closed after it)."""
    body = f"{reason}\n".encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nretry-after: %d\r\nconnection: close\r\n\r\n%s"
        % (len(body), RETRY_AFTER, body)
    )


#: The answer to a connection beyond the server's limits (:func:`refusal`'s default).
REFUSAL = refusal()


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


def shut(sock: socket.socket) -> None:
    """End a connection's both directions now: a blocked read or write returns."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def cause(exc: BaseException) -> BaseException:
    """The error a transport failure is told by: the OS error a runtime wrapped (anyio raises
    its own from the socket's), else ``exc``."""
    return exc.__cause__ if isinstance(exc.__cause__, OSError) else exc


def head_read(head: bytes) -> bool:
    """Whether a server has read enough of a new connection to make it a link (or refuse it):
    a whole HTTP request head, ``READ_SIZE`` bytes of one, or a first byte that no HTTP
    request starts with (a TLS hello to a plain server: the core answers it)."""
    return b"\r\n\r\n" in head or len(head) >= READ_SIZE or (not head[:1].isalpha() and head != b"")


class EventHandlers:
    """The handlers subscribed with ``on_federation_event``, called in subscription order.

    A handler's exception is logged (to the adapter's logger) and never reaches a link. What a
    coroutine handler returns is handed back to the adapter to schedule in its runtime.
    """

    def __init__(self, log: logging.Logger) -> None:
        #: each handler with the event types it asked for (``None``: all)
        self._handlers: list[tuple[EventHandler, frozenset[EventType | str] | None]] = []
        self.log = log

    def subscribe(
        self, handler: EventHandler, types: Iterable[EventType | str] | None = None
    ) -> Callable[[], None]:
        entry = (handler, None if types is None else frozenset(types))
        self._handlers.append(entry)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._handlers.remove(entry)

        return unsubscribe

    def wants(self, event_type: EventType) -> bool:
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
    """``anyio.Event`` or ``threading.Event``: set once a link settled."""

    def set(self) -> None: ...


class Session(abc.ABC):
    """A live connection of a link: the core's connection over a plain socket (through
    :class:`~._io.TLS` for ``wss://``). An adapter subclasses it with its event, which wakes
    the writer, and the way the writer waits for it.

    Whoever writes holds :attr:`writing`: the writer while it takes output and sends it, and
    the reader when it writes the answers its own input made while the writer waits (without
    blocking: what the kernel does not take at once is left in :attr:`unsent` for the writer).
    """

    def __init__(self, serve: Serve, sock: socket.socket, woken: _Settable) -> None:
        self.run, self.conn, self.tls, self.head = serve.run, serve.conn, serve.tls, serve.head
        self.sock, self.woken = sock, woken
        self.writing = threading.Lock()
        self.unsent = b""
        #: the reader's thread while it feeds the core: a wake from it is noted in
        #: :attr:`deferred`, and the reader answers or signals the writer afterwards
        self.reader: int | None = None
        self.deferred = False

    def wake(self) -> None:
        """Something may have been queued: let the writer look."""
        if self.reader == threading.get_ident():
            self.deferred = True
        else:
            self.signal()

    def signal(self) -> None:
        """Wake the writer."""
        self.woken.set()

    def rearm(self) -> None:  # noqa: B027 -- optional: without it the reader polls
        """The core's deadline may have moved earlier: a read waiting for a later one must
        end by it (else the reader sees it within ``DBBase._read_wait``)."""

    @abc.abstractmethod
    def wait(self) -> Any:
        """The writer waits to be signalled (a coroutine on anyio, blocking on threads)."""

    def closing(self) -> None:
        """The core is done: the writer ends, and the transport within ``CLOSE_GRACE``,
        flushed or not."""
        self.signal()


def _no_action(*args: Any) -> Any:
    raise RuntimeError("the link is not registered with an instance")


@dataclass(eq=False)
class LinkRun:
    """What an instance keeps of one link beside the node's :class:`~rhizome_proto.NodeLink`;
    adapters subclass it to add their own handles (a cancel scope, a thread)."""

    node_link: NodeLink
    #: set at the first handshake, or when the link ended without one
    settled: _Settable = field(default_factory=threading.Event)
    state: LinkStatus = "connecting"
    session: Session | None = None
    #: ``disconnect``/``close`` was asked: end, do not reconnect
    stopping: bool = False
    handshakes: int = 0
    #: the first transport failure since the last handshake, if any
    failure: str | None = None
    #: an outgoing link's reconnect decisions (``None`` for an incoming link)
    reconnect: ReconnectSupervisor | None = None
    #: what ended the current attempt or connection, for :attr:`reconnect`: the error code
    #: (the peer's fatal ``error``, or ours), why (text for people), the HTTP status of a
    #: refused upgrade
    end_code: ErrorCode | str | None = None
    end_reason: str | None = None
    reject_status: int | None = None
    #: the link view users hold (a :class:`LinkBase`), set by the instance
    view: Any = None
    #: the link view's actions, bound by the instance: pause(paused), send(delta), disconnect()
    pause: Callable[[bool], None] = _no_action
    send: Callable[[Delta], None] = _no_action
    disconnect: Callable[[], Any] = _no_action

    @property
    def id(self) -> str:
        return self.node_link.id


class LinkBase(abc.ABC):
    """A view over one link: the node's :class:`~rhizome_proto.NodeLink` and its live connection.

    ``status``: ``"connecting"`` (before the first handshake), ``"connected"``, ``"paused"``
    (we paused the peer), ``"reconnecting"`` (an outgoing link lost its connection),
    ``"disconnected"`` (ended) or ``"failed"`` (the reconnect policy gave up).
    """

    def __init__(self, run: LinkRun) -> None:
        self._run = run

    @property
    def id(self) -> str:
        return self._run.id

    @property
    def outgoing(self) -> bool:
        return self._run.node_link.outgoing

    @property
    def remote_system_id(self) -> str | None:
        return self._run.node_link.remote_system_id

    @property
    def remote_url(self) -> str | None:
        return self._run.node_link.remote_url

    @property
    def config(self) -> LinkConfig:
        return self._run.node_link.config

    @property
    def stats(self) -> LinkStats:
        """The node's counters; the adapter counts ``bytes_sent`` / ``bytes_received``."""
        return self._run.node_link.stats

    @property
    def failure(self) -> str | None:
        """The first transport failure since the last handshake, or why the link failed."""
        return self._run.failure

    @property
    def reconnect(self) -> ReconnectSupervisor | None:
        """An outgoing link's reconnect state (attempts, failures, the last failure, why it
        gave up); ``None`` for an incoming link. Read it; the instance drives it."""
        return self._run.reconnect

    @property
    def status(self) -> LinkStatus:
        run = self._run
        return "paused" if run.state == "connected" and run.node_link.paused else run.state

    def __repr__(self) -> str:
        return f"<FederationLink {self.id} {self.remote_url} {self.status}>"

    # the actions, blocking or ``async`` as the adapter's API is (documented once, here)

    @abc.abstractmethod
    def pause(self) -> Any:
        """Ask the peer to send no live deltas until :meth:`resume` (also after reconnects)."""

    @abc.abstractmethod
    def resume(self) -> Any:
        """Let the peer send again."""

    @abc.abstractmethod
    def disconnect(self) -> Any:
        """Close the link with the close handshake (an outgoing link stops reconnecting)."""

    @abc.abstractmethod
    def send_delta(self, delta: Delta) -> Any:
        """Send one delta on this link only (kept in the link's outbox while it is down)."""


LinkT = TypeVar("LinkT", bound=LinkBase)
RunT = TypeVar("RunT", bound=LinkRun)


class DBBase(abc.ABC, Generic[LinkT, RunT]):
    """The runtime-independent half of ``FederatedRhizomeDB``.

    ``storage`` picks a new ``"memory"`` or ``"sqlite"`` store (``path`` for the file) unless
    ``store`` is given; a store passed in is not closed by ``close()``. ``trust_policy`` applies
    to links without one of their own; ``auto_broadcast`` relays what one link brings to the
    others; ``batch_size`` is the deltas per initial-sync batch served; ``ping_interval`` and
    ``ping_timeout`` (seconds) keep quiet links alive and detect dead ones; a message over
    ``max_message_size`` bytes closes its connection; ``extensions`` are those of ours to
    offer and accept (``()``: plain v1; see docs/extensions.md).
    """

    #: whether a handler may be a coroutine function (run as a task of the adapter's runtime)
    _coroutine_handlers = True
    #: whether to commit once per turn of the adapter's loop (:meth:`_commit_later`)
    _group_commit = False
    #: what the adapter's ``_drive`` throws into a flow when the transport fails
    _broken: tuple[type[BaseException], ...] = (OSError,)
    #: seconds a reader waits at most before it looks at the core's deadline again (``inf``:
    #: the adapter's :meth:`Session.rearm` moves the deadline of a read in progress)
    _read_wait = READ_WAIT

    def __init__(
        self,
        *,
        system_id: str | None = None,
        storage: Literal["memory", "sqlite"] = "memory",
        path: str | None = None,
        store: Store | None = None,
        trust_policy: TrustPolicy | None = None,
        auto_broadcast: bool = True,
        batch_size: int = 100,
        ping_interval: float = 30.0,
        ping_timeout: float = 90.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        max_connection_memory: int | None = None,
        rate_limit: tuple[float, float] | None = None,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= 0 or max_message_size < 1:
            raise ValueError("ping_interval, ping_timeout and max_message_size must be positive")
        self._system_id = system_id or str(uuid.uuid4())
        self._owns_store = store is None
        self._store: Store = open_store(storage, path) if store is None else store
        self._node = FederationNode(
            self._system_id,
            self._store,
            clock=self._clock,
            trust_policy=trust_policy,
            auto_broadcast=auto_broadcast,
            batch_size=batch_size,
            extensions=extensions,
            max_message_size=max_message_size,
            memory_budget=memory_budget,
            max_connection_memory=max_connection_memory,
            rate_limit=rate_limit,
            signing_key=signing_key,
        )
        if max_id_length < 1:
            raise ValueError("max_id_length must be positive")
        self._max_id_length = max_id_length
        # until a handler asks for them, no event per received or acknowledged delta
        self._node.report_received = self._node.report_sent = False
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_message_size = max_message_size
        self._runs: dict[str, RunT] = {}
        self._sessions: set[Session] = set()
        self._handlers = EventHandlers(self._logger)
        self._events: deque[FederationEvent] = deque()
        self._events_lock = threading.Lock()
        self._emitting = False
        self._server_url: str | None = None
        self._server_path = DEFAULT_PATH
        self._admission = Admission()
        #: how to close each pending connection (to evict it, or at its deadline)
        self._pending_closers: dict[Ticket, Callable[[], None]] = {}
        self._credentials: Credentials | None = None
        self._closed = False
        self._store_closed = False
        self._commit_due = False  # (group commit) staged input waits for a commit
        self._feeding = False  # a reader is feeding the core (it commits, if it is alone)
        self._init_runtime()

    # ---------------------------------------------------------------- for the adapters

    def _init_runtime(self) -> None:
        """Set up the adapter's own state (called at the end of ``__init__``)."""

    #: the adapter's record of a link, the link view users hold, and the adapter's logger
    _run_type: type[RunT]
    _link_type: type[LinkT]
    _logger: logging.Logger

    @abc.abstractmethod
    def _disconnect(self, run: RunT) -> Any:
        """``link.disconnect()``: close the link with the close handshake and forget it (the
        adapter's blocking function, or coroutine function)."""
        ...

    @abc.abstractmethod
    def _drive(self, steps: Steps[None], conn: Any, own: bool = False) -> Any:
        """Run a flow of the base (see :mod:`._io`) over ``conn``, the adapter's connection or
        listener: do each step the flow yields and send its result back in, or throw its error
        in (the flow tells the transport's, ``_broken``, from the others). ``conn`` is closed
        at the end if the flow owns it (``own``, or a :class:`~._io.Connect` step opened it)
        and did not hand it to a :class:`~._io.Serve` step (which serves it: the reader here,
        the writer on its own, and closes it)."""
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

    # the public methods whose form is the adapter's, blocking or ``async`` (documented once,
    # here; ``enable_server`` and ``connect_to_remote`` take :mod:`._options`)

    @abc.abstractmethod
    def persist_delta(self, delta: Delta) -> Any:
        """Store a delta and send it to every link that should get it; ``False`` if known."""

    @abc.abstractmethod
    def persist_deltas(self, deltas: Iterable[Delta]) -> Any:
        """Store several deltas in one transaction (one fsync with SQLite) and send each to
        every link that should get it; ``False`` for each one already stored."""

    @abc.abstractmethod
    def disconnect_from_remote(self, link_id: str) -> Any:
        """Close a link (outgoing or incoming) with the close handshake and forget it."""

    @abc.abstractmethod
    def close(self) -> Any:
        """Close every link (close handshake), stop the server, close the store we opened."""

    @staticmethod
    def _clock() -> int:
        return int(time.time() * 1000)

    # ---------------------------------------------------------------- properties

    @property
    def system_id(self) -> str:
        return self._system_id

    @property
    def store(self) -> Store:
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
        self, handler: EventHandler, types: Iterable[EventType | str] | None = None
    ) -> Callable[[], None]:
        """Call ``handler(event)`` for every event, or only for events whose ``type`` is in
        ``types``; returns a function that unsubscribes.

        A coroutine handler runs as its own task. Exceptions are logged and never reach a link.
        While no handler asks for ``delta:received`` (or ``delta:sent``), received (or
        acknowledged) deltas are not reported one by one (a sync still reports
        ``sync:progress`` per batch): asking only for the types you use saves an event per
        delta.
        """
        if not self._coroutine_handlers and inspect.iscoroutinefunction(handler):
            raise TypeError("the threaded adapter calls plain functions, not coroutines")
        unsubscribe = self._handlers.subscribe(handler, types)
        self._per_delta_events()

        def unsubscribe_and_update() -> None:
            unsubscribe()
            self._per_delta_events()

        return unsubscribe_and_update

    def _per_delta_events(self) -> None:
        """Make an event per received or acknowledged delta only if a handler wants it."""
        self._node.report_received = self._handlers.wants(EventType.DELTA_RECEIVED)
        self._node.report_sent = self._handlers.wants(EventType.DELTA_SENT)

    def _emit(self, *events: FederationEvent) -> None:
        """Hand ``events`` to the handlers after those queued before them: one at a time, in
        order; an event made while a handler runs (on this thread or another) waits its turn,
        handled by whichever thread is handing them out."""
        self._events.extend(events)
        while True:
            with self._events_lock:
                if self._emitting or not self._events:
                    return
                self._emitting = True
                event = self._events.popleft()
            try:
                for pending in self._handlers.call(event):
                    self._schedule(pending)
            finally:
                with self._events_lock:
                    self._emitting = False

    def _note(self, event: FederationEvent) -> None:
        """A link's status as the node's events tell it, and what ended its connection."""
        run = self._runs.get(event.link_id)
        if run is None:
            return
        kind = event.type
        if kind is EventType.LINK_CONNECTED:
            run.state, run.failure = "connected", None
            run.handshakes += 1
            supervisor = run.reconnect
            if supervisor is not None and supervisor.state is ReconnectState.CONNECTING:
                supervisor.connected(self._now())
            run.settled.set()
        elif kind is EventType.LINK_DISCONNECTED:
            if run.state != "connected" and event.reason:  # why it never opened (HTTP 401, 503)
                run.failure = run.failure or event.reason
            ending = run.stopping or not run.node_link.outgoing
            run.state = "disconnected" if ending else "reconnecting"
            run.end_reason = run.end_reason or event.reason or "the connection closed"
        elif kind is EventType.LINK_ERROR and event.fatal:  # the peer's fatal error, a timeout
            run.end_code, run.end_reason = event.code, event.reason

    # ---------------------------------------------------------------- the pump

    def _attach(self, session: Session) -> None:
        """A new live connection of its link: attached to the node, started, pumped (closed at
        once if the link was disconnected while it was being opened)."""
        conn, run = session.conn, session.run
        with self._guard():
            self._node.attach(run.id, conn)
            run.session = session
            self._sessions.add(session)
            conn.start(self._now())
            if run.stopping:
                conn.close(now=self._now())
        self._pump(session)

    def _detach(self, session: Session) -> None:
        """The live connection has ended (the core is told, if it was cut short)."""
        with self._guard():
            lost = not session.conn.closed
            if lost:
                session.conn.connection_lost(self._now(), "connection task cancelled")
        if lost:
            self._pump(session)
        with self._guard():
            self._sessions.discard(session)
            session.run.session = None
            session.run.reject_status = session.conn.reject_status

    def _pump(self, session: Session) -> None:
        """After any input on ``session``: its events staged in the node, its timer re-armed,
        and a commit asked for (:meth:`_commit_soon`), which stores what every link staged,
        acknowledges it, wakes the writers and hands the events to the handlers."""
        conn, run = session.conn, session.run
        with self._guard():
            node_link = self._node.link(run.id)
            if node_link is not None and node_link.conn is conn:  # else a stale connection
                self._node.stage(run.id)
            closed, output = conn.closed, conn.outbound_size > 0
        if output:  # answers that need no commit (a pong, a sync request) go out at once
            session.wake()
        session.rearm()
        if closed:
            session.closing()
        self._commit_soon()

    def _commit_soon(self) -> None:
        """Commit at once, or (group commit) once every connection with input ready has been
        pumped: at the end of this turn of the loop (:meth:`_commit_later`), or by the reader
        that is feeding the core (:meth:`_feed`)."""
        if not self._group_commit:
            self._commit()
            return
        self._commit_due = True
        if not self._feeding:
            self._commit_later()

    def _commit_later(self) -> None:
        """Group commit: make :meth:`_commit_if_due` run at the end of this turn of the loop
        (the anyio adapter starts a task). Without a loop to wait for, it commits now."""
        self._commit_if_due()

    def _commit_if_due(self) -> None:
        """Commit now what waits for a group commit, if anything does."""
        if self._commit_due:
            self._commit_due = False
            self._commit()

    def _commit(self) -> None:
        """Store what the links staged (one transaction), acknowledge it, wake the writers and
        dispatch the events. If storing fails, nothing staged was acknowledged: every
        connection is dropped and the peers send it again."""
        try:
            with self._guard():  # the events are noted and queued in the node's order
                events = self._node.commit()
                for event in events:
                    self._note(event)
                self._events.extend(events)
        except Exception as exc:
            self._logger.exception("storing received deltas failed; closing every connection")
            for session in list(self._sessions):
                self._fail(session, exc)
            return
        self._wake_writers()
        self._emit()

    def _wake_writers(self) -> None:
        """Something may have been queued on any connection: let every writer look."""
        for session in list(self._sessions):
            session.wake()
            if session.conn.should_close:  # the node ended it (a peer that does not read)
                session.closing()

    def _received(self, session: Session, data: bytes | None, now: float) -> None:
        """What a read returned (``b""``: end of stream; ``None``: nothing, the time has come)
        goes to the core, the timer runs if it is due, then the pump (not when nothing came and
        nothing was due: a reader looking at the deadline again costs no commit)."""
        conn = session.conn
        with self._guard():
            if data:
                session.run.node_link.stats.bytes_received += len(data)
                try:
                    conn.receive_data(data, now)
                except RemoteProtocolError as exc:  # answered; close queued
                    session.run.end_code, session.run.end_reason = exc.code, str(exc)
            elif data is not None and not conn.closed:
                conn.receive_eof(now)
            deadline = conn.get_timer()  # due even while data keeps arriving
            due = deadline is not None and now >= deadline
            if due:
                conn.handle_timer(now)
        if data is not None or due:
            self._pump(session)

    def _output(self, session: Session) -> bytes:
        """The next bytes the writer must write (counted as sent), streaming the link's initial
        sync when nothing else waits; ``b""``: nothing now."""
        while True:
            with self._guard():
                data = session.conn.data_to_send()
                session.rearm()  # sending may set a deadline (the closing handshake's)
                syncing = not data and self._sync_ready(session)
                if data:
                    session.run.node_link.stats.bytes_sent += len(data)
            if not syncing:
                return data if session.tls is None else session.tls.encrypt(data)
            if self._stream_sync(session):
                self._commit_soon()  # a delta too large to send: say so

    def _answers(self, session: Session) -> tuple[bytes, bool]:
        """For a reader that writes what its input made while the writer is idle: the bytes
        queued now (counted as sent), and whether that is all (no sync to stream, the
        connection goes on), else the writer has more to do."""
        with self._guard():
            conn = session.conn
            data = conn.data_to_send()
            session.run.node_link.stats.bytes_sent += len(data)
            done = not (conn.should_close or self._sync_ready(session))
        return (data if session.tls is None else session.tls.encrypt(data)), done

    def _sync_ready(self, session: Session) -> bool:
        """``session`` is its link's live connection and the node has a batch to stream on it."""
        node_link = session.run.node_link
        return node_link.conn is session.conn and node_link.sync_ready

    def _stream_sync(self, session: Session) -> bool:
        """The next batches of the link's sync (or push catch-up), until ``SYNC_BUFFER`` bytes
        wait to be written or none is ready: one write carries several batches. Returns whether
        it made events (a delta too large to send), to be dispatched by a commit."""
        with self._guard():
            conn, link_id = session.conn, session.run.id
            self._node.sync_step(link_id)
            while conn.outbound_size < SYNC_BUFFER and self._sync_ready(session):
                self._node.sync_step(link_id)
            return self._node.has_events

    def _read_delay(self, session: Session, now: float) -> float:
        """Seconds the reader of ``session`` must wait before its next read (the rate limit);
        when it must, its writer is woken (the core may have queued output)."""
        with self._guard():
            delay = session.conn.read_delay(now)
        if delay > 0:
            session.wake()
        return delay

    def _fail(self, session: Session, exc: BaseException) -> None:
        """A transport failure: report it (``link:error``); the core sees the connection lost."""
        with self._guard():
            closed = session.conn.closed
        if not closed:  # else the core knows; make sure its last events were handled
            exc = cause(exc)
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._transport_error(session.run, reason)
            with self._guard():
                session.conn.connection_lost(self._now(), reason)
        self._pump(session)

    # ---------------------------------------------------------------- the flows

    def _reading(self, session: Session) -> Steps[None]:
        """A live connection's reader: what it reads goes to the core (through TLS, if any),
        and the timer runs when its deadline comes (the reader looks at it again at least
        every ``_read_wait`` seconds); over the rate limit, it sleeps. Ends once the core is
        done or the transport failed."""
        conn, tls = session.conn, session.tls
        try:
            if session.head:
                self._feed(session, session.head, self._now())
            while True:
                with self._guard():
                    if conn.closed:
                        return
                    timer = conn.get_timer()
                deadline = math.inf if timer is None else timer
                if self._read_wait < math.inf:  # (the clock is read once per input where it can)
                    deadline = min(deadline, self._now() + self._read_wait)
                raw = yield Receive(deadline, session)
                now = self._now()
                if raw is None:  # the time came (a runtime's timer may fire a bit early)
                    with self._guard():
                        timer = conn.get_timer()
                    due = min(deadline, math.inf if timer is None else timer)
                    self._feed(session, None, max(now, due) if due - now < CLOCK_SLACK else now)
                    continue
                data: bytes | None = raw
                if tls is not None:
                    data = tls.decrypt(raw)
                    if tls.pending:  # TLS answered something itself
                        session.wake()
                    if raw and not data and not tls.closed:
                        data = None  # records, no plaintext yet
                self._feed(session, data, now)
                if delay := self._read_delay(session, now):  # over the rate limit
                    yield Sleep(delay)
        except self._broken as exc:
            self._fail(session, exc)
        except Exception as exc:
            self._logger.exception("link %s failed", session.run.id)
            self._fail(session, exc)

    def _feed(self, session: Session, data: bytes | None, now: float) -> None:
        """The reader's input goes to the core (see :meth:`_received`), then the answers it
        made go out: the reader writes them itself while the writer waits (a thread switch, or
        a turn of the loop, less per round trip), else the writer is signalled. With group
        commit, the reader of the only live connection commits at once; otherwise the commit
        waits for the end of the turn (the writer's, if it waits, or a commit task's)."""
        session.reader, self._feeding = threading.get_ident(), True
        try:
            self._received(session, data, now)
            if self._commit_due and len(self._sessions) == 1:
                self._commit_if_due()
        finally:
            session.reader, self._feeding = None, False
        deferred, session.deferred = session.deferred, False
        if self._commit_due:
            if session.writing.locked():
                self._commit_later()
            else:
                session.signal()  # it commits when it runs, then writes
        elif deferred and not self._answer(session):
            session.signal()

    def _answer(self, session: Session) -> bool:
        """The reader writes its input's answers while the writer waits, as much as the kernel
        takes at once (the rest waits in ``unsent`` for the writer). Returns whether the
        writer has nothing to do.

        A waiting writer's last write has returned, so every byte it wrote is with the kernel
        (trio's socket keeps none; anyio sets its asyncio transport's write buffer limits to 0,
        so its ``send`` returns once the transport's buffer is empty; threads ``sendall``):
        writing to the socket keeps the order."""
        if not session.writing.acquire(blocking=False):
            return False
        try:
            data, done = self._answers(session)
            data = session.unsent + data
            try:  # its number now: -1 once closed (EBADF), never another socket's since
                sent = os.write(session.sock.fileno(), data) if data else 0
            except OSError:  # would block, broken or closed: the writer finds out
                sent = 0
            session.unsent = data[sent:]
            return done and not session.unsent
        finally:
            session.writing.release()

    def _writing(self, session: Session) -> Steps[None]:
        """A live connection's writer: once signalled, commits if a group commit is due, then
        writes what the reader left and the core's output (streaming the initial sync), until
        the core is done."""
        try:
            while True:
                yield Wait(session)
                with session.writing:
                    self._commit_if_due()
                    if session.unsent:
                        data, session.unsent = session.unsent, b""
                        yield Send(data)
                    while data := self._output(session):
                        yield Send(data)
                if session.conn.should_close:
                    return
        except self._broken as exc:
            self._fail(session, exc)
        except Exception as exc:
            self._logger.exception("link %s failed while writing", session.run.id)
            self._fail(session, exc)
        finally:
            data = b""  # not kept by this frame if a traceback outlives it (a cycle)

    def _handshake(self, tls: TLS, deadline: float) -> Steps[None]:
        """The TLS handshake, done before ``deadline`` (else :class:`TimeoutError`)."""
        data = None
        while True:
            done, out = tls.handshake(data)
            if out:
                yield Send(out, deadline)
            if done:
                return
            data = yield Receive(deadline)
            if data is None:
                raise TimeoutError("the TLS handshake took too long")
            if not data:
                raise ConnectionError("closed during the TLS handshake")

    def _listening(self, ssl: SSLContext | None) -> Steps[None]:
        """The server: accept connections and start each one's :meth:`_pending` flow, until
        the instance is closed."""
        while not self._closed:
            try:
                accepted = yield Accept()
            except self._broken:
                if self._closed:
                    return
                self._logger.exception("accepting a connection failed")
                yield Sleep(ACCEPT_RETRY)  # out of file descriptors, perhaps
                continue
            if accepted is not None:  # else none came within the runtime's poll
                conn, sock, peer = accepted
                yield Start(self._pending(peer, sock, ssl), conn)

    def _pending(self, peer: object, sock: socket.socket, ssl: SSLContext | None) -> Steps[None]:
        """A new connection to the server, pending under admission until its request head is
        read (after the TLS handshake, with ``ssl``) or its deadline passes; then served as a
        link, or refused (HTTP 503). To make room for a newer one, its socket is shut down."""
        ticket = self._admit(peer, functools.partial(shut, sock))
        try:
            yield from self._admitted(peer, ticket, ssl)
        except Exception:
            self._logger.exception("incoming connection failed")
        finally:
            self._release(ticket)

    def _admitted(self, peer: object, ticket: Ticket, ssl: SSLContext | None) -> Steps[None]:
        """:meth:`_pending` once admitted: the TLS handshake and the request head before the
        ticket's deadline, then the link or the refusal."""
        tls = None if ssl is None else TLS(ssl)
        head = b""
        try:
            if tls is not None:
                yield from self._handshake(tls, ticket.deadline)
                head = tls.decrypt(None)  # sent behind the handshake's last records
            while not head_read(head):
                raw = yield Receive(ticket.deadline)
                if raw is None:
                    raise TimeoutError("no request head before the deadline")
                if not raw:
                    return  # gone, or shut down to make room
                head += raw if tls is None else tls.decrypt(raw)
        except TimeoutError:
            self._pending_expired(ticket.deadline)
            return
        except self._broken:  # a failed TLS handshake, or shut down to make room
            return
        made = self._upgrade(ticket, peer)
        if isinstance(made, bytes):
            with contextlib.suppress(*self._broken):
                yield Send(made if tls is None else tls.encrypt(made), self._now() + REFUSAL_WAIT)
        elif made is not None:
            run, conn = made
            try:
                yield Serve(run, conn, tls, head)
            finally:
                self._forget(run)

    def _outgoing(self, run: LinkRun, target: Target) -> Steps[None]:
        """An outgoing link: connect (and the TLS handshake, for ``wss://``), serve the
        connection until it ends, wait as the reconnect policy says, and again, until the link
        is stopped or the policy gives up. The link is settled at the end, whatever ends it."""
        try:
            for wait in self._attempts(run):
                if wait is not None:
                    yield Sleep(wait)
                    continue
                tls = None if target.ssl is None else TLS(target.ssl, target.host)
                try:
                    yield Connect(target.host, target.port)
                    if tls is not None:
                        yield from self._handshake(tls, self._now() + TLS_HANDSHAKE_TIMEOUT)
                    # (a transport error here is the runtime's, setting the session up: out
                    # of file descriptors, say; the session's own are handled in it)
                    yield Serve(run, self._client_connection(run, target), tls)
                except self._broken as exc:
                    self._connect_failed(run, exc)
        except Exception as exc:
            self._crashed(run, exc)
        finally:
            run.settled.set()

    def _transport_error(self, run: LinkRun, reason: str, cause: str | None = None) -> None:
        """Report a transport failure (``cause``: the reason without what
        :meth:`_connect_failed` adds; it is what ended the attempt)."""
        run.failure = run.failure or reason
        run.end_reason = run.end_reason or cause or reason
        self._emit(FederationEvent(type=EventType.LINK_ERROR, link_id=run.id, reason=reason))

    # ---------------------------------------------------------------- outgoing links

    def _attempts(self, run: LinkRun) -> Iterator[float | None]:
        """The reconnect schedule of an outgoing link, as its supervisor decides it: yields
        ``None`` for "connect once now and run the session until it ends" (``link:connecting``
        was emitted; a transport that cannot open is reported with :meth:`_connect_failed`),
        else the seconds to wait before the next attempt. Ends when the link is stopping, or
        when the supervisor gave up: the link is then ``failed`` and ``link:error`` gives
        :attr:`~rhizome_proto.ReconnectSupervisor.final_reason`, with the code of the last
        failure."""
        supervisor = run.reconnect
        assert supervisor is not None, "an outgoing link has a supervisor"
        while not run.stopping:
            with self._guard():
                now = self._now()
                connect = supervisor.should_connect(now)
                if connect:
                    supervisor.connecting(now)
                    run.end_code = run.end_reason = run.reject_status = None
                due = supervisor.get_timer()
            if due is not None:
                yield max(due - now, 0.0)
                with self._guard():  # the wait is over, whatever the clock's resolution
                    supervisor.handle_timer(max(self._now(), due))
                continue
            if not connect:  # gave up
                self._gave_up(run, supervisor)
                return
            self._emit(FederationEvent(type=EventType.LINK_CONNECTING, link_id=run.id))
            yield None
            if run.stopping:
                return
            self._commit_if_due()  # the attempt's last events are noted
            with self._guard():
                self._attempt_ended(run, supervisor)

    def _attempt_ended(self, run: LinkRun, supervisor: ReconnectSupervisor) -> None:
        """Tell the supervisor how the attempt (or the connection it opened) ended."""
        now, code, reason = self._now(), run.end_code, run.end_reason or ""
        self_link = code == ErrorCode.SELF_LINK
        if supervisor.state is ReconnectState.CONNECTED:
            supervisor.disconnected(now, code=code, self_link=self_link, reason=reason)
        else:
            status = run.reject_status
            supervisor.connection_failed(
                now, status=status, code=code, self_link=self_link, reason=reason
            )

    def _gave_up(self, run: LinkRun, supervisor: ReconnectSupervisor) -> None:
        """The supervisor gave up: the link is ``failed``; ``link:error`` says why."""
        last = supervisor.last_failure
        run.state, run.failure = "failed", supervisor.final_reason
        self._emit(
            FederationEvent(
                type=EventType.LINK_ERROR,
                link_id=run.id,
                reason=run.failure,
                code=None if last is None else last.code,
                fatal=True,
            )
        )

    def _connect_failed(self, run: LinkRun, exc: BaseException) -> None:
        """An attempt of an outgoing link could not open its transport."""
        exc = cause(exc)
        why = str(exc) or type(exc).__name__
        self._transport_error(run, f"cannot connect to {run.node_link.remote_url}: {why}", why)

    def _crashed(self, run: LinkRun, exc: Exception) -> None:
        """An outgoing link's loop failed unexpectedly (a bug): it is ``failed``."""
        self._logger.exception("link %s failed", run.id)
        run.state, run.failure = "failed", f"{type(exc).__name__}: {exc}"

    def _settled_link(self, run: RunT, url: str) -> LinkT:
        """``connect_to_remote(wait=True)`` once the link settled: the link if it connected,
        else it is forgotten and :class:`ConnectionError` says why."""
        if run.handshakes == 0:
            self._forget(run)
            raise ConnectionError(run.failure or f"could not connect to {url}")
        return self._view(run)

    def _view(self, run: RunT) -> LinkT:
        view: LinkT = run.view
        return view

    def _begin_disconnect(self, run: LinkRun) -> bool:
        """``disconnect``: the link stops (no more reconnecting) and its live connection, if
        any, starts the close handshake. Returns whether it has a live connection to wait for."""
        run.stopping = True
        with self._guard():
            session = run.session
            if session is None or session.conn.closed:
                return session is not None
            session.conn.close(now=self._now())
        self._pump(session)
        return True

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
            max_id_length=self._max_id_length,
            **options,
        )

    def _client_connection(self, run: LinkRun, target: Target) -> FederationConnection:
        return self._new_connection(
            Role.CLIENT,
            config=run.node_link.config.to_wire(),
            host=host_port(target.host, target.port),
            path=target.path,
            extra_headers=target.headers,
            token=target.token,
        )

    def _add_link(
        self, config: LinkConfig | None, *, outgoing: bool, remote_url: str | None
    ) -> RunT:
        with self._guard():
            node_link = self._node.add_link(
                str(uuid.uuid4()), config, outgoing=outgoing, remote_url=remote_url
            )
            run = self._run_type(node_link)
            run.disconnect = functools.partial(self._disconnect, run)
            run.pause = functools.partial(self._pause_link, run)
            run.send = functools.partial(self._send_on_link, run)
            run.view = self._link_type(run)
            self._runs[run.id] = run
        return run

    def _pause_link(self, run: LinkRun, paused: bool) -> None:
        """``pause()`` / ``resume()``: on the open connection, and for every later one."""
        with self._guard():
            session = run.session
            if session is None or not session.conn.is_open:
                raise ConnectionError(self._describe(run))
            (self._node.pause if paused else self._node.resume)(run.id)
        self._wake_writers()

    def _send_on_link(self, run: LinkRun, delta: Delta) -> None:
        """``send_delta()``: on this link only (kept in the link's outbox while it is down)."""
        if run.state in ("disconnected", "failed"):
            raise ConnectionError(self._describe(run))
        with self._guard():
            self._node.send_delta(run.id, delta)
        self._wake_writers()

    def _describe(self, run: LinkRun) -> str:
        failure = f": {run.failure}" if run.failure else ""
        return f"link {run.id} to {run.node_link.remote_url} is {run.state}{failure}"

    # ---------------------------------------------------------------- admission (server)

    def _admit(self, peer: object, close: Callable[[], None]) -> Ticket:
        """A connection was accepted from ``peer`` (a socket address): its admission ticket,
        pending until its request head is read (:meth:`_upgrade`) or its deadline
        (``ticket.deadline``, on :meth:`_now`'s clock) passes. ``close`` ends it if it must
        make room for a newer one; the oldest pending connection is closed here if this one
        took its slot."""
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        with self._guard():
            ticket, evicted = self._admission.connected(address, self._now())
            self._pending_closers[ticket] = close
            evict = None if evicted is None else self._pending_closers.pop(evicted, None)
        if evict is not None:
            evict()
        return ticket

    def _pending_expired(self, deadline: float) -> None:
        """A pending connection's ``deadline`` passed: close every one past it (a runtime's
        timer may fire a bit before its clock reaches the deadline)."""
        with self._guard():
            expired = self._admission.expired(max(self._now(), deadline))
            closers = [self._pending_closers.pop(t, None) for t in expired]
        for close in closers:
            if close is not None:
                close()

    def _release(self, ticket: Ticket) -> None:
        """The connection of ``ticket`` ended (at any stage)."""
        with self._guard():
            self._admission.release(ticket)
            self._pending_closers.pop(ticket, None)

    def _upgrade(
        self, ticket: Ticket, peer: object
    ) -> tuple[RunT, FederationConnection] | bytes | None:
        """The connection's request head is read: a link and server connection to feed it
        to, or the bytes of a refusal (HTTP 503, then close), or ``None`` when it was closed
        meanwhile (evicted, or past its deadline)."""
        with self._guard():
            self._pending_closers.pop(ticket, None)
            if ticket.released:
                return None
            if self._closed:
                self._admission.release(ticket)
                return refusal("Shutting down")
            why = self._admission.upgrade(ticket)
        if why is not None:
            self._logger.info("refused a connection from %s: %s", ticket.address, why)
            return refusal(f"Service Unavailable: {why}")
        remote = host_port(str(peer[0]), peer[1]) if isinstance(peer, tuple) else None
        run = self._add_link(None, outgoing=False, remote_url=remote)
        conn = self._new_connection(
            Role.SERVER,
            link_id=run.id,
            path=self._server_path,
            open_timeout=self._admission.limits.pending_timeout,
            credentials=self._credentials,
        )
        return run, conn

    @property
    def admission(self) -> Admission:
        """The server's admission counters and limits (``evicted``, ``timed_out``,
        ``refused``, ``pending``, ``open``)."""
        return self._admission

    def _outgoing_link(self, link: ConnectOptions) -> tuple[RunT, Target]:
        """``connect_to_remote``'s checks, then the new link and where it connects (with the
        TLS context to use for ``wss://``: ``ssl``, or the system's trust store)."""
        self._check_open()
        host, port, path, secure = parse_url(link.url)
        if link.ssl is not None and not secure:
            raise ValueError(f"an ssl context needs a wss:// URL, not {link.url!r}")
        context = (link.ssl or create_default_context()) if secure else None
        config = link.config or LinkConfig()
        run = self._add_link(config, outgoing=True, remote_url=link.url)
        run.reconnect = ReconnectSupervisor(config.reconnect)
        return run, Target(host, port, path, context, link.headers, link.token)

    def _start_server(self, server: ServerOptions) -> ServerOptions:
        """``enable_server``'s checks and its ``auto_broadcast`` (which overrides the instance's
        setting, as the seed's server config does); the options with the path checked."""
        self._check_open()
        if self._server_url is not None:
            raise RuntimeError(f"the server is already running at {self._server_url}")
        checked = server_path(server.path)
        if server.auto_broadcast is not None:
            self._node.auto_broadcast = server.auto_broadcast
        return replace(server, path=checked)

    def _serving(self, server: ServerOptions, port: int) -> str:
        """The server listens on ``port``: remember where, its admission limits
        (``max_connections``, if given, is their ``max_links``) and credentials; return the
        URL."""
        limits = server.limits or AdmissionLimits()
        if server.max_connections is not None:
            limits = replace(limits, max_links=server.max_connections)
        self._server_path, self._credentials = server.path, server.credentials
        self._admission = Admission(limits)
        scheme = "ws" if server.ssl is None else "wss"
        self._server_url = f"{scheme}://{host_port(server.host, port)}{server.path}"
        return self._server_url

    def _forget(self, run: LinkRun) -> None:
        with self._guard():
            self._node.remove_link(run.id)
            self._runs.pop(run.id, None)
        if run.state != "failed":
            run.state = "disconnected"
        run.settled.set()

    def _run_of(self, link_id: str) -> RunT:
        run = self._runs.get(link_id)
        if run is None:
            raise KeyError(f"no link {link_id!r}")
        return run

    def get_federation_links(self) -> list[LinkT]:
        return [self._view(run) for run in list(self._runs.values())]

    def get_federation_link(self, link_id: str) -> LinkT | None:
        run = self._runs.get(link_id)
        return None if run is None else self._view(run)

    def _close_store(self) -> None:
        """Close the store if we opened it (once)."""
        with self._guard():
            if self._owns_store and not self._store_closed:
                self._store_closed = True
                self._store.close()

    def _begin_close(self) -> bool:
        """``close()`` begins: whether this is the first; the instance is closed from now on."""
        with self._guard():
            first, self._closed = not self._closed, True
        return first

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this FederatedRhizomeDB is closed")
