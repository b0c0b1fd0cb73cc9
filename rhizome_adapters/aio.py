"""The asyncio adapter: :class:`FederatedRhizomeDB` runs a :class:`~rhizome_proto.FederationNode`
over real sockets.

The adapter owns what the core cannot: sockets, tasks, one timer per connection, the listening
server and the reconnect loop. Every rule of the protocol lives in ``rhizome_proto``.

Each live connection (:class:`_Session`) has one reader task and one writer task:

* the reader reads up to 64 KiB, feeds the core and runs the pump (``FederatedRhizomeDB._pump``):
  take the node's events for that link, wake every connection's writer (a broadcast queues
  output on other links), re-arm the core's one timer, hand the events to the handlers;
* the writer is the only place that writes: it takes ``data_to_send()``, awaits ``drain()``
  (backpressure), streams the link's initial sync one batch per ``drain()`` (memory bounded by
  the transport buffer) and closes the transport when the core says so.

Reading never waits for writing, so a peer's ``pause``, pings and acks are read while a large
sync is written (one task doing both could deadlock with a peer that writes nacks as it reads).

A connection beyond ``max_connections`` gets a minimal ``HTTP/1.1 503`` answer and is closed.

TLS (``wss://``) is asyncio's: the server and the client take an :class:`ssl.SSLContext` and
hand it to ``start_server`` / ``open_connection``; the protocol above it does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from ssl import SSLContext, create_default_context
from types import TracebackType
from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit

from rhizome_proto import (
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
    RemoteProtocolError,
    Role,
    TrustPolicy,
)

from .storage import open_store

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]

log = logging.getLogger(__name__)

LinkStatus: TypeAlias = Literal[
    "connecting", "connected", "paused", "disconnected", "reconnecting", "failed"
]
#: A handler of federation events: a plain function or a coroutine function.
EventHandler: TypeAlias = Callable[[FederationEvent], Awaitable[None] | None]

_READ_SIZE = 64 * 1024
#: Seconds a closed connection's transport gets to flush its last bytes before it is aborted.
_CLOSE_GRACE = 5.0
#: Seconds ``disconnect``/``close`` wait for a link to end (the core's close timeout is 10 s).
_DISCONNECT_WAIT = 15.0
_REFUSAL_BODY = b"Too many connections\n"
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


class _Session:
    """One live connection of a link: the core's connection and its stream."""

    def __init__(
        self,
        db: FederatedRhizomeDB,
        link: FederationLink,
        conn: FederationConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.db, self.link, self.conn = db, link, conn
        self.reader, self.writer = reader, writer
        self.wake = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        self._abort_later: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Attach the connection to the link and serve it until it is closed."""
        loop = asyncio.get_running_loop()
        self.db._node.attach(self.link.id, self.conn)
        self.link._session = self
        self.db._sessions.add(self)
        writer_task = asyncio.create_task(self._write_loop())
        try:
            self.conn.start(loop.time())
            self.db._pump(self)
            while not self.conn.closed:
                try:
                    data = await self.reader.read(_READ_SIZE)
                except OSError as exc:
                    self.fail(exc)
                    break
                if data:
                    self.link.stats.bytes_received += len(data)
                    with contextlib.suppress(RemoteProtocolError):  # answered; close queued
                        self.conn.receive_data(data, loop.time())
                else:
                    self.conn.receive_eof(loop.time())
                self.db._pump(self)
        except Exception as exc:
            log.exception("link %s failed", self.link.id)
            self.fail(exc)
        finally:
            if not self.conn.closed:  # cancelled
                self.conn.connection_lost(loop.time(), "connection task cancelled")
                self.db._pump(self)
            self.wake.set()
            await asyncio.wait({writer_task})  # bounded: closing() arms the abort
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            for handle in (self.timer, self._abort_later):
                if handle is not None:
                    handle.cancel()
            self.db._sessions.discard(self)
            self.link._session = None

    async def _write_loop(self) -> None:
        """The one place that writes; ends (closing the transport) once the core is done."""
        conn, link = self.conn, self.link
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while True:
                    data = conn.data_to_send()
                    self.db._rearm(self)  # sending may set a deadline (the closing handshake's)
                    if data:
                        self.writer.write(data)
                        link.stats.bytes_sent += len(data)
                        await self.writer.drain()
                        continue  # more may have been queued meanwhile
                    node_link = link._node_link
                    if not (node_link.conn is conn and node_link.sync_ready):
                        break
                    self.db._node.sync_step(link.id)
                    await asyncio.sleep(0)  # let the reader in between batches
                if conn.should_close:
                    break
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.exception("link %s failed while writing", link.id)
            self.fail(exc)
        finally:
            self.writer.close()

    def fail(self, exc: BaseException) -> None:
        """A transport failure: report it (``link:error``); the core sees the connection lost."""
        if self.conn.closed:  # the core knows; make sure its last events were handled
            self.db._pump(self)
            return
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.db._transport_error(self.link, reason)
        self.conn.connection_lost(asyncio.get_running_loop().time(), reason)
        self.db._pump(self)

    def closing(self) -> None:
        """The core is done: the transport must end within the grace, flushed or not."""
        if self._abort_later is None:
            loop = asyncio.get_running_loop()
            self._abort_later = loop.call_later(_CLOSE_GRACE, self.writer.transport.abort)
            self.wake.set()


class FederationLink:
    """A view over one link: the node's :class:`~rhizome_proto.NodeLink` and its live connection.

    ``status``: ``"connecting"`` (before the first handshake), ``"connected"``, ``"paused"``
    (we paused the peer), ``"reconnecting"`` (an outgoing link lost its connection),
    ``"disconnected"`` (ended) or ``"failed"`` (the reconnect policy gave up).
    """

    def __init__(self, db: FederatedRhizomeDB, node_link: NodeLink) -> None:
        self._db = db
        self._node_link = node_link
        self._state: LinkStatus = "connecting"
        self._session: _Session | None = None
        self._task: asyncio.Task[Any] | None = None
        self._stopping = False
        self._handshakes = 0
        self._settled = asyncio.Event()  # first handshake, or the link ended without one
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

    async def pause(self) -> None:
        """Ask the peer to send no live deltas until :meth:`resume` (also after reconnects)."""
        self._open_conn()
        self._db._node.pause(self.id)
        self._db._wake_writers()

    async def resume(self) -> None:
        """Let the peer send again."""
        self._open_conn()
        self._db._node.resume(self.id)
        self._db._wake_writers()

    async def disconnect(self) -> None:
        """Close the link with the close handshake (an outgoing link stops reconnecting)."""
        await self._db._disconnect(self)

    async def send_delta(self, delta: Delta) -> None:
        """Send one delta on this link only (kept in the link's outbox while it is down)."""
        if self._state in ("disconnected", "failed"):
            raise ConnectionError(self._describe())
        self._db._node.send_delta(self.id, delta)
        self._db._wake_writers()

    def _open_conn(self) -> FederationConnection:
        session = self._session
        if session is None or not session.conn.is_open:
            raise ConnectionError(self._describe())
        return session.conn

    def _describe(self) -> str:
        failure = f": {self.failure}" if self.failure else ""
        return f"link {self.id} to {self.remote_url} is {self.status}{failure}"

    def __repr__(self) -> str:
        return f"<FederationLink {self.id} {self.remote_url} {self.status}>"


class FederatedRhizomeDB:
    """A RhizomeDB instance that federates over WebSocket, for asyncio.

    Use it as an async context manager (``close()`` on exit). ``storage`` picks a new
    ``"memory"`` or ``"sqlite"`` store (``path`` for the file) unless ``store`` is given; a store
    passed in is not closed by :meth:`close`.
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
        )
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_message_size = max_message_size
        self._links: dict[str, FederationLink] = {}
        self._sessions: set[_Session] = set()
        self._handlers: list[EventHandler] = []
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        self._accept_tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._server_url: str | None = None
        self._server_path = DEFAULT_PATH
        self._max_connections = 100
        self._closed = False

    @staticmethod
    def _clock() -> int:
        return int(time.time() * 1000)

    async def __aenter__(self) -> FederatedRhizomeDB:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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
        """``ws://host:port/path`` (``wss://`` with TLS) once :meth:`enable_server` ran, else
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
        """A new validated delta of this system (not stored: see :meth:`persist_delta`)."""
        return self._node.create_delta(
            author, pointers, id=id or str(uuid.uuid4()), timestamp=timestamp
        )

    async def persist_delta(self, delta: Delta) -> bool:
        """Store a delta and send it to every link that should get it; ``False`` if known."""
        self._check_open()
        stored = self._node.persist_delta(delta)
        self._wake_writers()
        return stored

    def get_delta_by_id(self, delta_id: str) -> Delta | None:
        return self._store.get(delta_id)

    def scan_deltas(
        self, filter: DeltaFilter | None = None, *, limit: int | None = None
    ) -> list[Delta]:
        """Stored deltas matching ``filter``, in storage order, at most ``limit``."""
        out: list[Delta] = []
        after = 0
        while limit is None or len(out) < limit:
            page_size = 1000 if limit is None else min(1000, limit - len(out))
            page = self._store.scan(after=after, filter=filter, limit=page_size)
            if not page:
                break
            out.extend(delta for _, delta in page)
            after = page[-1][0]
        return out

    # ---------------------------------------------------------------- events

    def on_federation_event(self, handler: EventHandler) -> Callable[[], None]:
        """Call ``handler(event)`` for every event; returns a function that unsubscribes.

        A coroutine handler runs as its own task. Exceptions are logged and never reach a link.
        """
        self._handlers.append(handler)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._handlers.remove(handler)

        return unsubscribe

    def _emit(self, event: FederationEvent) -> None:
        for handler in list(self._handlers):
            try:
                result = handler(event)
            except Exception:
                log.exception("federation event handler failed on %s", event.type)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._handler_tasks.add(task)
                task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("federation event handler failed", exc_info=task.exception())

    def _transport_error(self, link: FederationLink, reason: str) -> None:
        link.failure = link.failure or reason
        self._emit(FederationEvent(type="link:error", link_id=link.id, reason=reason))

    # ---------------------------------------------------------------- the pump

    def _pump(self, session: _Session) -> None:
        """After any input on ``session``: its events, every writer woken, its timer re-armed."""
        conn, link_id = session.conn, session.link.id
        node_link = self._node.link(link_id)
        events = self._node.handle_events(link_id) if node_link and node_link.conn is conn else []
        self._wake_writers()
        self._rearm(session)
        if conn.closed:
            session.closing()
        for event in events:
            link = self._links.get(event.link_id)
            if link is not None and event.type == "link:connected":
                link._state, link.failure = "connected", None
                link._handshakes += 1
                link._settled.set()
            elif link is not None and event.type == "link:disconnected":
                ending = link._stopping or not link.outgoing
                link._state = "disconnected" if ending else "reconnecting"
            self._emit(event)

    def _wake_writers(self) -> None:
        for session in self._sessions:
            session.wake.set()

    def _rearm(self, session: _Session) -> None:
        when = session.conn.get_timer()
        if session.timer is not None:
            if when == session.timer.when():
                return
            session.timer.cancel()
            session.timer = None
        if when is not None:
            loop = asyncio.get_running_loop()
            session.timer = loop.call_at(when, self._on_timer, session, when)

    def _on_timer(self, session: _Session, when: float) -> None:
        session.timer = None
        # call_at may fire up to the clock resolution early: never hand the core an earlier time
        session.conn.handle_timer(max(asyncio.get_running_loop().time(), when))
        self._pump(session)

    def _new_connection(self, role: Role, **options: Any) -> FederationConnection:
        return FederationConnection(
            role,
            system_id=self._system_id,
            clock=self._clock,
            max_message_size=self._max_message_size,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            **options,
        )

    def _add_link(
        self, config: LinkConfig | None, *, outgoing: bool, remote_url: str | None
    ) -> FederationLink:
        node_link = self._node.add_link(
            str(uuid.uuid4()), config, outgoing=outgoing, remote_url=remote_url
        )
        link = FederationLink(self, node_link)
        self._links[link.id] = link
        return link

    def _forget(self, link: FederationLink) -> None:
        self._node.remove_link(link.id)
        self._links.pop(link.id, None)
        if link._state != "failed":
            link._state = "disconnected"
        link._settled.set()

    # ---------------------------------------------------------------- server

    async def enable_server(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        path: str = DEFAULT_PATH,
        max_connections: int = 100,
        auto_broadcast: bool | None = None,
        ssl: SSLContext | None = None,
    ) -> str:
        """Listen for federation links; returns ``ws://host:port/path`` (the actual port), or
        ``wss://host:port/path`` when ``ssl`` (a server context holding the certificate) is given.

        ``auto_broadcast`` (as in the seed's server config) overrides the instance's setting:
        relay what one link brings to the others.
        """
        self._check_open()
        if auto_broadcast is not None:
            self._node.auto_broadcast = auto_broadcast
        if self._server is not None:
            raise RuntimeError(f"the server is already running at {self._server_url}")
        try:
            server = await asyncio.start_server(self._accept, host, port, ssl=ssl)
        except OSError as exc:
            why = "the address is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {why or exc}") from exc
        self._server, self._server_path, self._max_connections = server, path, max_connections
        actual_port = server.sockets[0].getsockname()[1]
        scheme = "ws" if ssl is None else "wss"
        self._server_url = f"{scheme}://{_host_port(host, actual_port)}{path}"
        return self._server_url

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._accept_tasks.add(task)
        try:
            incoming = sum(1 for link in self._links.values() if not link.outgoing)
            if self._closed or incoming >= self._max_connections:
                await _refuse(reader, writer)
                return
            peer = writer.get_extra_info("peername")
            remote = _host_port(str(peer[0]), peer[1]) if isinstance(peer, tuple) else None
            link = self._add_link(None, outgoing=False, remote_url=remote)
            link._task = task
            conn = self._new_connection(Role.SERVER, link_id=link.id, path=self._server_path)
            try:
                await _Session(self, link, conn, reader, writer).run()
            finally:
                self._forget(link)
        finally:
            self._accept_tasks.discard(task)

    # ---------------------------------------------------------------- outgoing links

    async def connect_to_remote(
        self,
        url: str,
        config: LinkConfig | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        wait: bool = True,
        ssl: SSLContext | None = None,
    ) -> FederationLink:
        """Open an outgoing link to ``ws://host[:port]/path`` or ``wss://host[:port]/path``,
        reconnecting per ``config.reconnect`` (a failed first connect is retried too).

        A ``wss://`` URL connects with TLS, verifying the server's certificate for the URL's host
        with ``ssl`` (default: :func:`ssl.create_default_context`, the system's trust store).
        A TLS failure (such as an untrusted certificate) is a connect failure like any other.

        With ``wait`` this returns once the handshake completed and raises
        :class:`ConnectionError` if the policy gives up first; without, it returns at once.
        """
        self._check_open()
        host, port, path, secure = _parse_url(url)
        if ssl is not None and not secure:
            raise ValueError(f"an ssl context needs a wss:// URL, not {url!r}")
        context = (ssl or create_default_context()) if secure else None
        link = self._add_link(config or LinkConfig(), outgoing=True, remote_url=url)
        link._task = asyncio.create_task(
            self._run_outgoing(link, host, port, path, headers, context)
        )
        if not wait:
            return link
        try:
            await link._settled.wait()
        except asyncio.CancelledError:
            await self._disconnect(link)
            raise
        if link._handshakes == 0:
            self._forget(link)
            raise ConnectionError(link.failure or f"could not connect to {url}")
        return link

    async def _run_outgoing(
        self,
        link: FederationLink,
        host: str,
        port: int,
        path: str,
        headers: Sequence[tuple[str, str]],
        ssl: SSLContext | None,
    ) -> None:
        """Connect, run the session, wait per the reconnect policy, repeat until stopped."""
        attempt = 0  # failed attempts since the last handshake
        try:
            while not link._stopping:
                self._emit(FederationEvent(type="link:connecting", link_id=link.id))
                try:
                    # with ssl, asyncio checks the certificate against ``host``; a failed TLS
                    # handshake raises ssl.SSLError, an OSError
                    reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
                except OSError as exc:
                    self._transport_error(link, f"cannot connect to {link.remote_url}: {exc}")
                else:
                    conn = self._new_connection(
                        Role.CLIENT,
                        config=link.config.to_wire(),
                        host=_host_port(host, port),
                        path=path,
                        extra_headers=headers,
                    )
                    handshakes = link._handshakes
                    await _Session(self, link, conn, reader, writer).run()
                    if link._handshakes > handshakes:
                        attempt = 0
                if link._stopping:
                    return
                attempt += 1
                delay = link.config.reconnect.delay(attempt, random.random())
                if delay is None:
                    reason = f"gave up on {link.remote_url} after {attempt} attempt(s)"
                    first = f"; first failure: {link.failure}" if link.failure else ""
                    link._state, link.failure = "failed", reason + first
                    event = FederationEvent(type="link:error", link_id=link.id, reason=link.failure)
                    self._emit(event)
                    return
                await asyncio.sleep(delay)
        except Exception as exc:
            log.exception("link %s failed", link.id)
            link._state, link.failure = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            link._settled.set()

    async def disconnect_from_remote(self, link_id: str) -> None:
        """Close a link (outgoing or incoming) with the close handshake and forget it."""
        link = self._links.get(link_id)
        if link is None:
            raise KeyError(f"no link {link_id!r}")
        await self._disconnect(link)

    async def _disconnect(self, link: FederationLink) -> None:
        link._stopping = True
        session = link._session
        if session is not None and not session.conn.closed:
            session.conn.close()
            self._pump(session)
        task = link._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            if session is None:
                task.cancel()  # connecting, or waiting to reconnect
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_WAIT)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        self._forget(link)

    def get_federation_links(self) -> list[FederationLink]:
        return list(self._links.values())

    def get_federation_link(self, link_id: str) -> FederationLink | None:
        return self._links.get(link_id)

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        """Close every link (close handshake), stop the server, close the store we opened."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(self._disconnect(link) for link in list(self._links.values())))
        current = asyncio.current_task()
        pending = {
            t for t in self._accept_tasks | self._handler_tasks if not t.done() and t is not current
        }
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
        if self._owns_store:
            self._store.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this FederatedRhizomeDB is closed")


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a connection over the limit with HTTP 503 (after its request head, so the client
    reads the answer rather than a reset) and close it."""
    errors = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
    try:
        with contextlib.suppress(*errors):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            writer.write(_REFUSAL)
            await asyncio.wait_for(writer.drain(), 2.0)
    finally:
        writer.close()


def _parse_url(url: str) -> tuple[str, int, str, bool]:
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


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
