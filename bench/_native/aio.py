"""The asyncio adapter: :class:`FederatedRhizomeDB` runs a :class:`~rhizome_proto.FederationNode`
over real sockets.

The adapter owns what the core cannot: sockets, tasks, one timer per connection, the listening
server and the reconnect loop. Every rule of the protocol lives in ``rhizome_proto``.

Each live connection (:class:`_Session`) has one reader task and one writer task:

* the reader reads up to 64 KiB, feeds the core and runs the pump (``FederatedRhizomeDB._pump``):
  take the node's events for that link, wake every connection's writer (a broadcast queues
  output on other links), re-arm the core's one timer, hand the events to the handlers;
* the writer takes ``data_to_send()``, awaits ``drain()`` (backpressure), streams the link's
  initial sync (memory bounded by the transport buffer) and closes the transport when the core
  says so; when the transport has nothing buffered, what a commit queued (acknowledgements,
  live deltas) is written at once instead (``_Session.flush``), without a turn of the loop.

Reading never waits for writing, so a peer's ``pause``, pings and acks are read while a large
sync is written (one task doing both could deadlock with a peer that writes nacks as it reads).

A connection beyond ``max_connections`` gets a minimal ``HTTP/1.1 503`` answer and is closed.

TLS (``wss://``) is asyncio's: the server and the client take an :class:`ssl.SSLContext` and
hand it to ``start_server`` / ``open_connection``; the protocol above it does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable, Sequence
from ssl import SSLContext
from types import TracebackType
from typing import Any

from bench._native._base import (
    CLOSE_GRACE,
    DISCONNECT_WAIT,
    READ_SIZE,
    REFUSAL,
    SYNC_BUFFER,
    DBBase,
    EventHandler,
    LinkBase,
    LinkStatus,
    listen_error,
)
from rhizome_proto import (
    DEFAULT_PATH,
    Delta,
    FederationConnection,
    FederationEvent,
    LinkConfig,
    NodeLink,
    RemoteProtocolError,
)

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]

log = logging.getLogger(__name__)


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
                    data = await self.reader.read(READ_SIZE)
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
        yielded_at = 0
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while True:
                    data = conn.data_to_send()
                    self.rearm()  # sending may set a deadline (the closing handshake's)
                    if data:
                        self.writer.write(data)
                        link.stats.bytes_sent += len(data)
                        await self.writer.drain()
                        continue  # more may have been queued meanwhile
                    if not link._sync_ready(conn):
                        break
                    self.db._sync_step(link, conn)
                    if link.stats.bytes_sent - yielded_at >= SYNC_BUFFER:
                        yielded_at = link.stats.bytes_sent
                        await asyncio.sleep(0)  # let the reader and the other links in
                if conn.should_close:
                    break
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.exception("link %s failed while writing", link.id)
            self.fail(exc)
        finally:
            self.writer.close()

    def flush(self) -> None:
        """Write what the core has queued now if the transport has nothing buffered (the usual
        case: acknowledgements, live deltas), saving the writer task a turn of the loop; else,
        or when a sync batch or the close is due, wake the writer. Bytes are taken and written
        with no ``await`` in between here and in the writer, so they stay in order."""
        transport = self.writer.transport
        if not transport.is_closing() and transport.get_write_buffer_size() == 0:
            data = self.conn.data_to_send()
            if data:
                self.writer.write(data)
                self.link.stats.bytes_sent += len(data)
            self.rearm()
            if not self.conn.should_close and not self.link._sync_ready(self.conn):
                return
        self.wake.set()

    def fail(self, exc: BaseException) -> None:
        """A transport failure: report it (``link:error``); the core sees the connection lost."""
        self.db._fail(self, exc)

    def rearm(self) -> None:
        """Arm the one timer for the core's deadline (if it moved)."""
        when = self.conn.get_timer()
        if self.timer is not None:
            if when == self.timer.when():
                return
            self.timer.cancel()
            self.timer = None
        if when is not None:
            self.timer = asyncio.get_running_loop().call_at(when, self._on_timer, when)

    def _on_timer(self, when: float) -> None:
        self.timer = None
        # call_at may fire up to the clock resolution early: never hand the core an earlier time
        self.conn.handle_timer(max(asyncio.get_running_loop().time(), when))
        self.db._pump(self)

    def closing(self) -> None:
        """The core is done: the transport must end within the grace, flushed or not."""
        if self._abort_later is None:
            loop = asyncio.get_running_loop()
            self._abort_later = loop.call_later(CLOSE_GRACE, self.writer.transport.abort)
            self.wake.set()


class FederationLink(LinkBase):
    __doc__ = LinkBase.__doc__
    _settled: asyncio.Event
    _session: _Session | None

    def __init__(self, db: FederatedRhizomeDB, node_link: NodeLink) -> None:
        super().__init__(db, node_link, asyncio.Event())
        self._owner = db
        self._task: asyncio.Task[Any] | None = None

    async def pause(self) -> None:
        """Ask the peer to send no live deltas until :meth:`resume` (also after reconnects)."""
        self._pause(True)

    async def resume(self) -> None:
        """Let the peer send again."""
        self._pause(False)

    async def disconnect(self) -> None:
        """Close the link with the close handshake (an outgoing link stops reconnecting)."""
        await self._owner._disconnect(self)

    async def send_delta(self, delta: Delta) -> None:
        """Send one delta on this link only (kept in the link's outbox while it is down)."""
        self._send_delta(delta)


class FederatedRhizomeDB(DBBase[FederationLink]):
    """A RhizomeDB instance that federates over WebSocket, for asyncio.

    Use it as an async context manager (``close()`` on exit). ``storage`` picks a new
    ``"memory"`` or ``"sqlite"`` store (``path`` for the file) unless ``store`` is given; a store
    passed in is not closed by :meth:`close`.
    """

    def _init_runtime(self) -> None:
        self._sessions: set[_Session] = set()
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        self._accept_tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._commit_scheduled = False

    def _log(self) -> logging.Logger:
        return log

    def _new_link(self, node_link: NodeLink) -> FederationLink:
        return FederationLink(self, node_link)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def __aenter__(self) -> FederatedRhizomeDB:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def persist_delta(self, delta: Delta) -> bool:
        """Store a delta and send it to every link that should get it; ``False`` if known."""
        return self._persist((delta,))[0]

    async def persist_deltas(self, deltas: Iterable[Delta]) -> list[bool]:
        """Store several deltas in one transaction (one fsync with SQLite) and send each to
        every link that should get it; ``False`` for each one already stored."""
        return self._persist(deltas)

    # ---------------------------------------------------------------- events

    def _schedule(self, pending: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(pending)
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._handlers.failed(exc)

    def _wake_writers(self) -> None:
        for session in self._sessions:
            session.flush()

    def _commit_soon(self) -> None:
        """Group commit: the readers that got data in this turn of the loop all stage what
        they received; one callback at the end of the turn stores it in one transaction."""
        if not self._commit_scheduled:
            self._commit_scheduled = True
            asyncio.get_running_loop().call_soon(self._commit_cycle)

    def _commit_cycle(self) -> None:
        self._commit_scheduled = False
        try:
            events = self._node.commit()
        except Exception as exc:
            # nothing staged was acknowledged: drop the connections, their peers send it again
            log.exception("storing received deltas failed; closing every connection")
            for session in list(self._sessions):
                if not session.conn.closed:
                    session.fail(exc)
            return
        self._wake_writers()
        self._dispatch(events)

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
        self._start_server(auto_broadcast)
        try:
            server = await asyncio.start_server(self._accept, host, port, ssl=ssl)
        except OSError as exc:
            raise listen_error(exc, host, port) from exc
        self._server = server
        actual_port = server.sockets[0].getsockname()[1]
        return self._serving(host, actual_port, path, max_connections, ssl is not None)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._accept_tasks.add(task)
        try:
            made = self._incoming_link(writer.get_extra_info("peername"))
            if made is None:
                await _refuse(reader, writer)
                return
            link, conn = made
            link._task = task
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
        link, host, port, path, context = self._outgoing_link(url, config, ssl)
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
        return self._settled_link(link, url)

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
                    conn = self._client_connection(link, host, port, path, headers)
                    handshakes = link._handshakes
                    await _Session(self, link, conn, reader, writer).run()
                    if link._handshakes > handshakes:
                        attempt = 0
                if link._stopping:
                    return
                attempt += 1
                delay = self._retry_delay(link, attempt)
                if delay is None:
                    return
                await asyncio.sleep(delay)
        except Exception as exc:
            self._crashed(link, exc)
        finally:
            link._settled.set()

    async def disconnect_from_remote(self, link_id: str) -> None:
        """Close a link (outgoing or incoming) with the close handshake and forget it."""
        await self._disconnect(self._link(link_id))

    async def _disconnect(self, link: FederationLink) -> None:
        link._stopping = True
        session = link._session
        if session is not None and not session.conn.closed:
            session.conn.close(now=self._now())
            self._pump(session)
        task = link._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            if session is None:
                task.cancel()  # connecting, or waiting to reconnect
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_WAIT)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        self._forget(link)

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


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a connection over the limit with HTTP 503 (after its request head, so the client
    reads the answer rather than a reset) and close it."""
    errors = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
    try:
        with contextlib.suppress(*errors):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            writer.write(REFUSAL)
            await asyncio.wait_for(writer.drain(), 2.0)
    finally:
        writer.close()
