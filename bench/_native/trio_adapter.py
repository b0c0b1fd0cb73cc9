"""The trio adapter: :class:`FederatedRhizomeDB` runs a :class:`~rhizome_proto.FederationNode` on
trio, with the same API as the asyncio adapter (``pip install rhizome-federation[trio]``).

``async with FederatedRhizomeDB(...) as db:`` opens the nursery that every connection, the
listening server and the coroutine event handlers run in; leaving the block closes the links
(close handshake), stops the server and waits for all of it. Each live connection has three
tasks in a nursery of its own:

* the reader feeds the core what ``receive_some`` returns and runs the pump (the node's events,
  every writer woken, the timer re-armed, the handlers called);
* the writer is the only task that writes: ``data_to_send()`` then ``send_all`` (backpressure),
  the initial sync one batch at a time while ``NodeLink.sync_ready``; once the core is done it
  closes the stream (within a grace period, flushed or not) and ends the connection;
* the timer sleeps until the core's one deadline (``trio.move_on_at``) and calls
  ``handle_timer``; the pump wakes it whenever the deadline moves.

TLS (``wss://``) is trio's :class:`trio.SSLStream`: ``ssl=`` takes an :class:`ssl.SSLContext`
as in the asyncio adapter. A connection beyond ``max_connections`` gets ``HTTP/1.1 503``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Awaitable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from ssl import SSLContext
from types import TracebackType
from typing import Any

import trio

from bench._native._base import (
    CLOSE_GRACE,
    DISCONNECT_WAIT,
    READ_SIZE,
    REFUSAL,
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

#: Seconds a TLS handshake may take (asyncio's default).
_TLS_HANDSHAKE_TIMEOUT = 60.0
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _cause(exc: BaseException) -> BaseException:
    """trio wraps transport errors (``BrokenResourceError``); the original says why."""
    return exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc


class _Session:
    """One live connection of a link: the core's connection and its stream."""

    def __init__(
        self,
        db: FederatedRhizomeDB,
        link: FederationLink,
        conn: FederationConnection,
        stream: trio.abc.Stream,
    ) -> None:
        self.db, self.link, self.conn, self.stream = db, link, conn, stream
        self.wake = trio.Event()
        self.rearmed = trio.Event()
        self.armed: float | None = None
        self.write_scope = trio.CancelScope()  # gets the grace deadline once the core is done
        self.scope: trio.CancelScope | None = None

    async def run(self) -> None:
        """Attach the connection to the link and serve it until it is closed."""
        db, link, conn = self.db, self.link, self.conn
        db._node.attach(link.id, conn)
        link._session = self
        db._sessions.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                conn.start(trio.current_time())
                db._pump(self)
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._timer_loop)
                await self._read_loop()
        finally:
            if not conn.closed:  # cancelled
                conn.connection_lost(trio.current_time(), "connection task cancelled")
                db._pump(self)
            db._sessions.discard(self)
            link._session = None
            await trio.aclose_forcefully(self.stream)

    async def _read_loop(self) -> None:
        conn, link = self.conn, self.link
        try:
            while not conn.closed:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except _BROKEN as exc:
                    self.db._fail(self, _cause(exc))
                    return
                if data:
                    link.stats.bytes_received += len(data)
                    with contextlib.suppress(RemoteProtocolError):  # answered; close queued
                        conn.receive_data(bytes(data), trio.current_time())
                else:
                    conn.receive_eof(trio.current_time())
                self.db._pump(self)
        except Exception as exc:
            log.exception("link %s failed", link.id)
            self.db._fail(self, exc)

    async def _write_loop(self) -> None:
        """The one place that writes; ends the connection once the core is done."""
        conn, link = self.conn, self.link
        try:
            with self.write_scope:
                while True:
                    await self.wake.wait()
                    self.wake = trio.Event()
                    while True:
                        data = conn.data_to_send()
                        self.rearm()  # sending may set a deadline (the closing handshake's)
                        if data:
                            await self.stream.send_all(data)
                            link.stats.bytes_sent += len(data)
                            continue  # more may have been queued meanwhile
                        if not link._sync_ready(conn):
                            break
                        self.db._sync_step(link, conn)
                        await trio.lowlevel.checkpoint()  # let the reader in between writes
                    if conn.should_close:
                        break
        except _BROKEN as exc:
            self.db._fail(self, _cause(exc))
        except Exception as exc:
            log.exception("link %s failed while writing", link.id)
            self.db._fail(self, exc)
        finally:
            with trio.move_on_after(1.0), contextlib.suppress(*_BROKEN):
                await self.stream.aclose()  # TLS: close_notify
            await trio.aclose_forcefully(self.stream)
            if self.scope is not None:
                self.scope.cancel()  # the reader and the timer

    async def _timer_loop(self) -> None:
        """Sleep until the core's deadline (or until it moves), then ``handle_timer``."""
        try:
            while True:
                self.armed = self.conn.get_timer()
                self.rearmed = trio.Event()
                deadline = math.inf if self.armed is None else self.armed
                with trio.move_on_at(deadline) as sleeping:
                    await self.rearmed.wait()
                if sleeping.cancelled_caught:
                    self.conn.handle_timer(max(trio.current_time(), deadline))
                    self.db._pump(self)
        except Exception as exc:
            log.exception("link %s failed", self.link.id)
            self.db._fail(self, exc)

    def rearm(self) -> None:
        if self.conn.get_timer() != self.armed:
            self.rearmed.set()

    def closing(self) -> None:
        if math.isinf(self.write_scope.deadline):
            self.write_scope.deadline = trio.current_time() + CLOSE_GRACE
        self.wake.set()


class FederationLink(LinkBase):
    __doc__ = LinkBase.__doc__
    _settled: trio.Event

    def __init__(self, db: FederatedRhizomeDB, node_link: NodeLink) -> None:
        super().__init__(db, node_link, trio.Event())
        self._owner = db
        self._scope = trio.CancelScope()  # the link's task: connecting, sessions, backoff
        self._done = trio.Event()

    async def pause(self) -> None:
        """Ask the peer to send no live deltas until :meth:`resume` (also after reconnects)."""
        self._pause(True)
        await trio.lowlevel.checkpoint()

    async def resume(self) -> None:
        """Let the peer send again."""
        self._pause(False)
        await trio.lowlevel.checkpoint()

    async def disconnect(self) -> None:
        """Close the link with the close handshake (an outgoing link stops reconnecting)."""
        await self._owner._disconnect(self)

    async def send_delta(self, delta: Delta) -> None:
        """Send one delta on this link only (kept in the link's outbox while it is down)."""
        self._send_delta(delta)
        await trio.lowlevel.checkpoint()


class FederatedRhizomeDB(DBBase[FederationLink]):
    """A RhizomeDB instance that federates over WebSocket, for trio.

    Use it as ``async with FederatedRhizomeDB(...) as db:`` (the block owns the instance's
    nursery); the parameters are those of the asyncio adapter.
    """

    def _init_runtime(self) -> None:
        self._sessions: set[_Session] = set()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._handler_scopes: set[trio.CancelScope] = set()
        self._server_scope: trio.CancelScope | None = None
        self._store_closed = False

    def _log(self) -> logging.Logger:
        return log

    def _new_link(self, node_link: NodeLink) -> FederationLink:
        return FederationLink(self, node_link)

    def _now(self) -> float:
        return trio.current_time()

    def _wake_writers(self) -> None:
        for session in self._sessions:
            session.wake.set()

    def _schedule(self, pending: Awaitable[Any]) -> None:
        if self._nursery is None:  # not entered, or already left
            if inspect.iscoroutine(pending):
                pending.close()
            return
        self._nursery.start_soon(self._run_handler, pending)

    async def _run_handler(self, pending: Awaitable[Any]) -> None:
        with trio.CancelScope() as scope:
            self._handler_scopes.add(scope)
            try:
                await pending
            except Exception as exc:
                self._handlers.failed(exc)
            finally:
                self._handler_scopes.discard(scope)

    def _running(self) -> trio.Nursery:
        self._check_open()
        if self._nursery is None:
            raise RuntimeError("use the instance as `async with FederatedRhizomeDB(...) as db:`")
        return self._nursery

    async def __aenter__(self) -> FederatedRhizomeDB:
        if self._nursery_cm is not None or self._closed:
            raise RuntimeError("this FederatedRhizomeDB was already entered")
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.close()
        finally:
            nursery_cm, self._nursery_cm = self._nursery_cm, None
            try:
                if nursery_cm is not None:  # the block's own exception propagates by itself
                    await nursery_cm.__aexit__(None, None, None)
            finally:
                self._nursery = None
                self._close_store()

    async def persist_delta(self, delta: Delta) -> bool:
        """Store a delta and send it to every link that should get it; ``False`` if known."""
        return (await self.persist_deltas((delta,)))[0]

    async def persist_deltas(self, deltas: Iterable[Delta]) -> list[bool]:
        """Store several deltas in one transaction (one fsync with SQLite) and send each to
        every link that should get it; ``False`` for each one already stored."""
        stored = self._persist(deltas)
        await trio.lowlevel.checkpoint()
        return stored

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
        ``wss://...`` when ``ssl`` (a server context holding the certificate) is given."""
        nursery = self._running()
        self._start_server(auto_broadcast)
        try:
            listeners = await nursery.start(self._serve, host, port, ssl)
        except OSError as exc:
            raise listen_error(exc, host, port) from exc
        first = listeners[0]
        if isinstance(first, trio.SSLListener):
            first = first.transport_listener
        actual_port = first.socket.getsockname()[1]
        return self._serving(host, actual_port, path, max_connections, ssl is not None)

    async def _serve(
        self,
        host: str,
        port: int,
        ssl: SSLContext | None,
        *,
        task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as self._server_scope:
            if ssl is None:
                await trio.serve_tcp(
                    self._accept,
                    port,
                    host=host,
                    handler_nursery=self._nursery,
                    task_status=task_status,
                )
            else:
                await trio.serve_ssl_over_tcp(
                    self._accept,
                    port,
                    ssl,
                    host=host,
                    handler_nursery=self._nursery,
                    task_status=task_status,
                )

    async def _accept(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        try:
            sock = stream.socket if isinstance(stream, trio.SocketStream) else None
            if isinstance(stream, trio.SSLStream):
                sock = stream.transport_stream.socket
                with trio.move_on_after(_TLS_HANDSHAKE_TIMEOUT) as handshake:
                    await stream.do_handshake()
                if handshake.cancelled_caught:
                    return
            peer: object = None
            with contextlib.suppress(OSError):
                peer = sock.getpeername() if sock is not None else None
            made = self._incoming_link(peer)
            if made is None:
                await _refuse(stream)
                return
            link, conn = made
            try:
                with link._scope:
                    await _Session(self, link, conn, stream).run()
            finally:
                self._forget(link)
                link._done.set()
        except _BROKEN:  # a failed TLS handshake, or gone before anything was said
            pass
        except Exception:
            log.exception("incoming connection failed")
        finally:
            await trio.aclose_forcefully(stream)

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
        """Open an outgoing link to ``ws://host[:port]/path`` or ``wss://...``, reconnecting
        per ``config.reconnect`` (a failed first connect is retried too).

        With ``wait`` this returns once the handshake completed and raises
        :class:`ConnectionError` if the policy gives up first; without, it returns at once.
        """
        nursery = self._running()
        link, host, port, path, context = self._outgoing_link(url, config, ssl)
        nursery.start_soon(self._run_outgoing, link, host, port, path, headers, context)
        if not wait:
            return link
        try:
            await link._settled.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
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
            with link._scope:
                while not link._stopping:
                    self._emit(FederationEvent(type="link:connecting", link_id=link.id))
                    try:
                        stream = await _open(host, port, ssl)
                    except (*_BROKEN, trio.TooSlowError) as exc:
                        why = f"cannot connect to {link.remote_url}: {_cause(exc)}"
                        self._transport_error(link, why)
                    else:
                        handshakes = link._handshakes
                        conn = self._client_connection(link, host, port, path, headers)
                        await _Session(self, link, conn, stream).run()
                        if link._handshakes > handshakes:
                            attempt = 0
                    if link._stopping:
                        return
                    attempt += 1
                    delay = self._retry_delay(link, attempt)
                    if delay is None:
                        return
                    await trio.sleep(delay)
        except Exception as exc:
            self._crashed(link, exc)
        finally:
            link._settled.set()
            link._done.set()

    async def disconnect_from_remote(self, link_id: str) -> None:
        """Close a link (outgoing or incoming) with the close handshake and forget it."""
        await self._disconnect(self._link(link_id))

    async def _disconnect(self, link: FederationLink) -> None:
        link._stopping = True
        session = link._session
        if session is not None and not session.conn.closed:
            session.conn.close(now=self._now())
            self._pump(session)
        if not link._done.is_set():
            if session is None:
                link._scope.cancel()  # connecting, or waiting to reconnect
            with trio.move_on_after(DISCONNECT_WAIT):
                await link._done.wait()
            if not link._done.is_set():
                link._scope.cancel()
                await link._done.wait()
        self._forget(link)

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        """Close every link (close handshake), stop the server, close the store we opened."""
        if self._closed:
            return
        self._closed = True
        if self._server_scope is not None:
            self._server_scope.cancel()
        if self._nursery is not None:
            async with trio.open_nursery() as nursery:
                for link in list(self._links.values()):
                    nursery.start_soon(self._disconnect, link)
        for scope in self._handler_scopes:
            scope.cancel()
        self._close_store()

    def _close_store(self) -> None:
        if self._owns_store and not self._store_closed:
            self._store_closed = True
            self._store.close()


async def _open(host: str, port: int, ssl: SSLContext | None) -> trio.abc.Stream:
    """A TCP stream to ``host:port``; with ``ssl``, TLS checked against ``host`` before use."""
    if ssl is None:
        return await trio.open_tcp_stream(host, port)
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl)
    try:
        with trio.fail_after(_TLS_HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _refuse(stream: trio.abc.Stream) -> None:
    """Answer a connection over the limit with HTTP 503 (after its request head, so the client
    reads the answer rather than a reset); the caller closes it."""
    with trio.move_on_after(2.0), contextlib.suppress(*_BROKEN):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < READ_SIZE:
            chunk = await stream.receive_some(READ_SIZE)
            if not chunk:
                return
            head += chunk
        await stream.send_all(REFUSAL)
