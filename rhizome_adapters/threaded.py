"""The threaded adapter: :class:`FederatedRhizomeDB` for plain blocking code, on threads.

The same API as the asyncio adapter with blocking methods: ``enable_server`` starts a listening
thread and returns the URL, ``connect_to_remote(url, config, wait=True)`` blocks until the link
is connected, ``close()`` (or leaving ``with``) closes every link and joins the threads. All the
threads are daemon threads.

The core is not thread-safe: every call into the node, its store and the connections happens
under one :class:`threading.Lock` owned by the instance, which is never held while a socket is
read or written or while user code runs. Each live connection has two threads:

* the reader calls ``recv`` with a socket timeout derived from the core's ``get_timer()``
  (at most a second, so a deadline another thread set is not missed), feeds the core, calls
  ``handle_timer`` when the deadline passed, and runs the pump;
* the writer is the only thread that writes (on its own ``dup()`` of the socket, whose
  timeout is the instance's ``ping_timeout``): woken after anything that may have queued
  output, it takes ``data_to_send()`` under the lock and ``sendall``\\ s it outside it, and
  streams the initial sync one batch at a time. A reader that never waits for writes is what
  keeps two peers streaming to each other from deadlocking.

Event handlers are called from the adapter's threads (a connection's reader or writer, a link's
connect thread) or from the thread that called ``disconnect``/``close``: one at a time, in the
order the node produced the events, never under the lock, so they may call the instance's
methods. A slow handler delays that thread's connection. Coroutine handlers are refused.

TLS (``wss://``) is not offered here yet: use the asyncio or trio adapter for it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

from rhizome_proto import (
    DEFAULT_PATH,
    Delta,
    EventType,
    FederationConnection,
    FederationEvent,
    LinkConfig,
    NodeLink,
    RemoteProtocolError,
)

from ._base import (
    CLOSE_GRACE,
    DISCONNECT_WAIT,
    READ_SIZE,
    REFUSAL,
    DBBase,
    EventHandler,
    LinkBase,
    LinkStatus,
    listen_error,
    parse_url,
)

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]

log = logging.getLogger(__name__)

#: Longest a reader waits in ``recv`` before looking at the core's deadline again.
_MAX_WAIT = 1.0
#: Seconds a TCP connect may take.
_CONNECT_TIMEOUT = 10.0
#: How often the listening thread looks whether the server was stopped.
_ACCEPT_POLL = 0.5


class _Session:
    """One live connection of a link: the core's connection, its socket and two threads."""

    def __init__(
        self,
        db: FederatedRhizomeDB,
        link: FederationLink,
        conn: FederationConnection,
        sock: socket.socket,
    ) -> None:
        self.db, self.link, self.conn, self.sock = db, link, conn, sock
        self.wsock = sock.dup()  # the writer's: a timeout of its own
        self.wsock.settimeout(db._ping_timeout)
        self.wake = threading.Event()
        self.writer = threading.Thread(target=self._write_loop, daemon=True, name="rhizome-w")

    def run(self) -> None:
        """Attach the connection to the link and serve it until it is closed."""
        db, link, conn = self.db, self.link, self.conn
        with db._lock:
            db._node.attach(link.id, conn)
            link._session = self
            db._sessions.add(self)
            conn.start(time.monotonic())
            if link._stopping:  # disconnected while this connection was being opened
                conn.close(now=time.monotonic())
        self.writer.start()
        db._pump(self)
        try:
            self._read_loop()
        except Exception as exc:
            log.exception("link %s failed", link.id)
            db._fail(self, exc)
        finally:
            self.wake.set()
            self.writer.join(CLOSE_GRACE)
            self.abort()  # the writer is stuck in sendall: end it
            self.writer.join(CLOSE_GRACE)
            self.wsock.close()
            with db._lock:
                db._sessions.discard(self)
                link._session = None

    def _read_loop(self) -> None:
        db, conn, link = self.db, self.conn, self.link
        while True:
            with db._lock:
                if conn.closed:
                    return
                deadline = conn.get_timer()
            wait = _MAX_WAIT if deadline is None else deadline - time.monotonic()
            self.sock.settimeout(min(max(wait, 0.001), _MAX_WAIT))
            try:
                data: bytes | None = self.sock.recv(READ_SIZE)
            except TimeoutError:
                data = None
            except OSError as exc:
                db._fail(self, exc)
                return
            with db._lock:
                now = time.monotonic()
                if data:
                    link.stats.bytes_received += len(data)
                    with contextlib.suppress(RemoteProtocolError):  # answered; close queued
                        conn.receive_data(data, now)
                elif data is not None and not conn.closed:
                    conn.receive_eof(now)
                deadline = conn.get_timer()  # due even while data keeps arriving
                if deadline is not None and now >= deadline:
                    conn.handle_timer(now)
            db._pump(self)

    def _write_loop(self) -> None:
        """The one place that writes; shuts the socket down once the core is done."""
        db, conn, link = self.db, self.conn, self.link
        try:
            while True:
                self.wake.wait()
                self.wake.clear()
                while True:
                    stepped = reported = False
                    with db._lock:
                        data = conn.data_to_send()
                        if not data and link._sync_ready(conn):
                            db._stream_sync(link, conn)
                            stepped, reported = True, db._node.has_events
                        done = conn.should_close
                    if reported:  # a delta too large to send: say so now
                        db._commit()
                    if stepped:
                        continue
                    if not data:
                        break
                    self.wsock.sendall(data)
                    with db._lock:
                        link.stats.bytes_sent += len(data)
                if done:
                    break
        except OSError as exc:
            db._fail(self, exc)
        except Exception as exc:
            log.exception("link %s failed while writing", link.id)
            db._fail(self, exc)
        finally:
            self.abort()  # ends the reader's recv too

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def rearm(self) -> None:
        """The reader looks at the deadline before every ``recv``."""

    def closing(self) -> None:
        self.wake.set()


class FederationLink(LinkBase):
    __doc__ = LinkBase.__doc__
    _settled: threading.Event
    _session: _Session | None

    def __init__(self, db: FederatedRhizomeDB, node_link: NodeLink) -> None:
        super().__init__(db, node_link, threading.Event())
        self._owner = db
        self._thread: threading.Thread | None = None  # connecting, reading, waiting to retry
        self._wakeup = threading.Event()  # ends the wait before a retry

    def pause(self) -> None:
        """Ask the peer to send no live deltas until :meth:`resume` (also after reconnects)."""
        self._pause(True)

    def resume(self) -> None:
        """Let the peer send again."""
        self._pause(False)

    def disconnect(self) -> None:
        """Close the link with the close handshake (an outgoing link stops reconnecting)."""
        self._owner._disconnect(self)

    def send_delta(self, delta: Delta) -> None:
        """Send one delta on this link only (kept in the link's outbox while it is down)."""
        self._send_delta(delta)


class FederatedRhizomeDB(DBBase[FederationLink]):
    """A RhizomeDB instance that federates over WebSocket, for threaded code.

    Use it as a context manager (``close()`` on exit); the parameters are those of the asyncio
    adapter.
    """

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._sessions: set[_Session] = set()
        self._events: deque[FederationEvent] = deque()
        self._events_lock = threading.Lock()
        self._emitting = False
        self._listener: socket.socket | None = None
        self._server_thread: threading.Thread | None = None

    def _log(self) -> logging.Logger:
        return log

    def _new_link(self, node_link: NodeLink) -> FederationLink:
        return FederationLink(self, node_link)

    def _now(self) -> float:
        return time.monotonic()

    def _guard(self) -> contextlib.AbstractContextManager[object]:
        return self._lock

    def _wake_writers(self) -> None:
        for session in list(self._sessions):
            session.wake.set()

    def __enter__(self) -> FederatedRhizomeDB:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def persist_delta(self, delta: Delta) -> bool:
        """Store a delta and send it to every link that should get it; ``False`` if known."""
        return self._persist((delta,))[0]

    def persist_deltas(self, deltas: Iterable[Delta]) -> list[bool]:
        """Store several deltas in one transaction (one fsync with SQLite) and send each to
        every link that should get it; ``False`` for each one already stored."""
        return self._persist(deltas)

    # ---------------------------------------------------------------- events

    def on_federation_event(
        self, handler: EventHandler, types: Iterable[str] | None = None
    ) -> Callable[[], None]:
        """Call ``handler(event)`` for every event (or those whose ``type`` is in ``types``),
        from the adapter's threads (see the module documentation); returns a function that
        unsubscribes. Exceptions are logged."""
        if inspect.iscoroutinefunction(handler):
            raise TypeError("the threaded adapter calls plain functions, not coroutines")
        return super().on_federation_event(handler, types)

    def _commit(self) -> None:
        """Commit under the lock, and queue the events there: handlers get them in the order
        the node made them, from whichever thread flushes."""
        with self._lock:
            events = self._node.commit()
            for event in events:
                self._note(event)
            self._events.extend(events)
        self._wake_writers()
        self._flush_events()

    def _emit(self, event: FederationEvent) -> None:
        self._events.append(event)
        self._flush_events()

    def _flush_events(self) -> None:
        """Call the handlers for the queued events, one at a time, in order; a thread that
        finds another one doing it leaves the events to it."""
        while True:
            with self._events_lock:
                if self._emitting or not self._events:
                    return
                self._emitting = True
                event = self._events.popleft()
            try:
                DBBase._emit(self, event)
            finally:
                with self._events_lock:
                    self._emitting = False

    def _schedule(self, pending: Awaitable[Any]) -> None:
        log.error("a federation event handler returned an awaitable: nothing runs it here")
        if inspect.iscoroutine(pending):
            pending.close()

    # ---------------------------------------------------------------- server

    def enable_server(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        path: str = DEFAULT_PATH,
        max_connections: int = 100,
        auto_broadcast: bool | None = None,
    ) -> str:
        """Listen for federation links on a thread; returns ``ws://host:port/path``."""
        self._start_server(auto_broadcast)
        try:
            listener = socket.create_server((host, port))
        except OSError as exc:
            raise listen_error(exc, host, port) from exc
        listener.settimeout(_ACCEPT_POLL)
        self._listener = listener
        url = self._serving(host, listener.getsockname()[1], path, max_connections)
        self._server_thread = threading.Thread(
            target=self._serve, args=(listener,), daemon=True, name="rhizome-server"
        )
        self._server_thread.start()
        return url

    def _serve(self, listener: socket.socket) -> None:
        with listener:
            while not self._closed:
                try:
                    sock, peer = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._closed:
                        return
                    log.exception("accepting a connection failed")
                    time.sleep(_ACCEPT_POLL)  # out of file descriptors, perhaps
                    continue
                thread = threading.Thread(
                    target=self._accept, args=(sock, peer), daemon=True, name="rhizome-r"
                )
                thread.start()

    def _accept(self, sock: socket.socket, peer: object) -> None:
        with sock:
            try:
                made = self._incoming_link(peer)
                if made is None:
                    _refuse(sock)
                    return
                link, conn = made
                link._thread = threading.current_thread()
                try:
                    _Session(self, link, conn, sock).run()
                finally:
                    self._forget(link)
            except Exception:
                log.exception("incoming connection failed")

    # ---------------------------------------------------------------- outgoing links

    def connect_to_remote(
        self,
        url: str,
        config: LinkConfig | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        wait: bool = True,
        timeout: float | None = None,
    ) -> FederationLink:
        """Open an outgoing link to ``ws://host[:port]/path``, reconnecting per
        ``config.reconnect`` on a thread of its own (a failed first connect is retried too).

        With ``wait`` this blocks until the handshake completed and raises
        :class:`ConnectionError` if the policy gives up first, or :class:`TimeoutError` (the
        link is closed) after ``timeout`` seconds; without, it returns at once.
        """
        if parse_url(url)[3]:
            raise ValueError(f"{url!r}: the threaded adapter has no TLS; use asyncio or trio")
        link, host, port, path, _ = self._outgoing_link(url, config, None)
        link._thread = threading.Thread(
            target=self._run_outgoing,
            args=(link, host, port, path, headers),
            daemon=True,
            name="rhizome-link",
        )
        link._thread.start()
        if not wait:
            return link
        if not link._settled.wait(timeout):
            self._disconnect(link)
            raise TimeoutError(f"no handshake with {url} within {timeout} s")
        return self._settled_link(link, url)

    def _run_outgoing(
        self,
        link: FederationLink,
        host: str,
        port: int,
        path: str,
        headers: Sequence[tuple[str, str]],
    ) -> None:
        """Connect, run the session, wait per the reconnect policy, repeat until stopped."""
        attempt = 0  # failed attempts since the last handshake
        try:
            while not link._stopping:
                self._emit(FederationEvent(type=EventType.LINK_CONNECTING, link_id=link.id))
                try:
                    sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT)
                except OSError as exc:
                    self._transport_error(link, f"cannot connect to {link.remote_url}: {exc}")
                else:
                    with sock:
                        handshakes = link._handshakes
                        conn = self._client_connection(link, host, port, path, headers)
                        _Session(self, link, conn, sock).run()
                    if link._handshakes > handshakes:
                        attempt = 0
                if link._stopping:
                    return
                attempt += 1
                delay = self._retry_delay(link, attempt)
                if delay is None:
                    return
                link._wakeup.wait(delay)
        except Exception as exc:
            self._crashed(link, exc)
        finally:
            link._settled.set()

    def disconnect_from_remote(self, link_id: str) -> None:
        """Close a link (outgoing or incoming) with the close handshake and forget it."""
        self._disconnect(self._link(link_id))

    def _disconnect(self, link: FederationLink) -> None:
        self._begin_disconnect(link)
        self._end_disconnect(link)

    def _begin_disconnect(self, link: FederationLink) -> None:
        link._stopping = True
        link._wakeup.set()
        with self._lock:
            session = link._session
            if session is None or session.conn.closed:
                return
            session.conn.close(now=self._now())
        self._pump(session)

    def _end_disconnect(self, link: FederationLink) -> None:
        thread = link._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(DISCONNECT_WAIT)
            session = link._session
            if thread.is_alive() and session is not None:
                session.abort()
                thread.join(CLOSE_GRACE)
        self._forget(link)

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close every link (close handshake), stop the server, join the threads, close the
        store we opened."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() where it can
        if self._server_thread is not None:
            self._server_thread.join(_ACCEPT_POLL + CLOSE_GRACE)
        while links := list(self._links.values()):  # again if one was accepted meanwhile
            for link in links:
                self._begin_disconnect(link)
            for link in links:
                self._end_disconnect(link)
        if self._owns_store:
            with self._lock:
                self._store.close()


def _refuse(sock: socket.socket) -> None:
    """Answer a connection over the limit with HTTP 503 (after its request head, so the client
    reads the answer rather than a reset); the caller closes it."""
    sock.settimeout(2.0)
    with contextlib.suppress(OSError):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < READ_SIZE:
            chunk = sock.recv(READ_SIZE)
            if not chunk:
                return
            head += chunk
        sock.sendall(REFUSAL)
