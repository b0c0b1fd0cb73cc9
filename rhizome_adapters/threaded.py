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
  streams the initial sync several batches per write. A reader that never waits for writes is what
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
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rhizome_proto import (
    DEFAULT_PATH,
    Delta,
    FederationConnection,
    LinkConfig,
    NodeLink,
)

from ._base import (
    CLOSE_GRACE,
    DISCONNECT_WAIT,
    READ_SIZE,
    REFUSAL,
    DBBase,
    EventHandler,
    LinkBase,
    LinkRun,
    LinkStatus,
    head_read,
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


@dataclass(eq=False)
class _Run(LinkRun):
    settled: threading.Event
    #: the link's thread: connecting, reading, waiting to retry
    thread: threading.Thread | None = None
    #: ends the wait before a retry
    wakeup: threading.Event = field(default_factory=threading.Event)


class _Session:
    """One live connection of a link: the core's connection, its socket and two threads."""

    def __init__(
        self, run: _Run, conn: FederationConnection, sock: socket.socket, write_timeout: float
    ) -> None:
        self.run, self.conn, self.sock = run, conn, sock
        self.wsock = sock.dup()  # the writer's: a timeout of its own
        self.wsock.settimeout(write_timeout)
        self.woken = threading.Event()

    def wake(self) -> None:
        self.woken.set()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def rearm(self) -> None:
        """The reader looks at the deadline before every ``recv``."""

    def closing(self) -> None:
        self.woken.set()


class FederationLink(LinkBase):
    __doc__ = LinkBase.__doc__

    def pause(self) -> None:
        """Ask the peer to send no live deltas until :meth:`resume` (also after reconnects)."""
        self._run.pause(True)

    def resume(self) -> None:
        """Let the peer send again."""
        self._run.pause(False)

    def disconnect(self) -> None:
        """Close the link with the close handshake (an outgoing link stops reconnecting)."""
        self._run.disconnect()

    def send_delta(self, delta: Delta) -> None:
        """Send one delta on this link only (kept in the link's outbox while it is down)."""
        self._run.send(delta)


class FederatedRhizomeDB(DBBase[FederationLink, _Run]):
    """A RhizomeDB instance that federates over WebSocket, for threaded code.

    Use it as a context manager (``close()`` on exit); the parameters are those of the asyncio
    adapter. Handlers are plain functions, called from the adapter's threads (see the module
    documentation); a coroutine function is refused.
    """

    _coroutine_handlers = False

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._server_thread: threading.Thread | None = None

    def _log(self) -> logging.Logger:
        return log

    def _new_run(self, node_link: NodeLink) -> _Run:
        run = _Run(node_link, threading.Event())
        run.disconnect = lambda: self._disconnect(run)
        return run

    def _new_link(self, run: _Run) -> FederationLink:
        return FederationLink(run)

    def _now(self) -> float:
        return time.monotonic()

    def _guard(self) -> contextlib.AbstractContextManager[object]:
        return self._lock

    def __enter__(self) -> FederatedRhizomeDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def persist_delta(self, delta: Delta) -> bool:
        """Store a delta and send it to every link that should get it; ``False`` if known."""
        return self._persist((delta,))[0]

    def persist_deltas(self, deltas: Iterable[Delta]) -> list[bool]:
        """Store several deltas in one transaction (one fsync with SQLite) and send each to
        every link that should get it; ``False`` for each one already stored."""
        return self._persist(deltas)

    # ---------------------------------------------------------------- events

    def _schedule(self, pending: Awaitable[Any]) -> None:
        log.error("a federation event handler returned an awaitable: nothing runs it here")
        if inspect.iscoroutine(pending):
            pending.close()

    # ---------------------------------------------------------------- a live connection

    def _serve_session(self, session: _Session) -> None:
        """Attach the connection to its link and serve it until it is closed."""
        writer = threading.Thread(
            target=self._write_loop, args=(session,), daemon=True, name="rhizome-w"
        )
        self._attach(session)
        writer.start()
        try:
            self._read_loop(session)
        except Exception as exc:
            log.exception("link %s failed", session.run.id)
            self._fail(session, exc)
        finally:
            session.wake()
            writer.join(CLOSE_GRACE)
            session.abort()  # the writer is stuck in sendall: end it
            writer.join(CLOSE_GRACE)
            session.wsock.close()
            self._detach(session)

    def _read_loop(self, session: _Session) -> None:
        conn, sock = session.conn, session.sock
        while True:
            with self._lock:
                if conn.closed:
                    return
                deadline = conn.get_timer()
            wait = _MAX_WAIT if deadline is None else deadline - time.monotonic()
            sock.settimeout(min(max(wait, 0.001), _MAX_WAIT))
            try:
                data: bytes | None = sock.recv(READ_SIZE)
            except TimeoutError:
                data = None
            except OSError as exc:
                self._fail(session, exc)
                return
            self._received(session, data, time.monotonic())
            with self._lock:
                delay = conn.read_delay(time.monotonic())
            if delay > 0:  # over the rate limit: stop reading this link for a while
                session.wake()
                time.sleep(delay)

    def _write_loop(self, session: _Session) -> None:
        """The one place that writes; shuts the socket down once the core is done."""
        try:
            while True:
                session.woken.wait()
                session.woken.clear()
                while data := self._output(session):
                    session.wsock.sendall(data)
                if session.conn.should_close:
                    break
        except OSError as exc:
            self._fail(session, exc)
        except Exception as exc:
            log.exception("link %s failed while writing", session.run.id)
            self._fail(session, exc)
        finally:
            session.abort()  # ends the reader's recv too

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
                run, conn = made
                run.thread = threading.current_thread()
                try:
                    self._serve_session(_Session(run, conn, sock, self._ping_timeout))
                finally:
                    self._forget(run)
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
        run, host, port, path, _ = self._outgoing_link(url, config, None)
        run.thread = threading.Thread(
            target=self._run_outgoing,
            args=(run, host, port, path, headers),
            daemon=True,
            name="rhizome-link",
        )
        run.thread.start()
        if not wait:
            return self._view(run)
        if not run.settled.wait(timeout):
            self._disconnect(run)
            raise TimeoutError(f"no handshake with {url} within {timeout} s")
        return self._settled_link(run, url)

    def _run_outgoing(
        self, run: _Run, host: str, port: int, path: str, headers: Sequence[tuple[str, str]]
    ) -> None:
        """Connect, run the session, wait per the reconnect policy, repeat until stopped."""
        try:
            for wait in self._attempts(run):
                if wait is not None:
                    run.wakeup.wait(wait)
                    continue
                try:
                    sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT)
                except OSError as exc:
                    self._connect_failed(run, exc)
                    continue
                with sock:
                    conn = self._client_connection(run, host, port, path, headers)
                    self._serve_session(_Session(run, conn, sock, self._ping_timeout))
        except Exception as exc:
            self._crashed(run, exc)
        finally:
            run.settled.set()

    def disconnect_from_remote(self, link_id: str) -> None:
        """Close a link (outgoing or incoming) with the close handshake and forget it."""
        self._disconnect(self._run_of(link_id))

    def _disconnect(self, run: _Run) -> None:
        self._stop(run)
        self._end_disconnect(run)

    def _stop(self, run: _Run) -> None:
        run.wakeup.set()
        self._begin_disconnect(run)

    def _end_disconnect(self, run: _Run) -> None:
        thread = run.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(DISCONNECT_WAIT)
            session = run.session
            if thread.is_alive() and isinstance(session, _Session):
                session.abort()
                thread.join(CLOSE_GRACE)
        self._forget(run)

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
        while runs := list(self._runs.values()):  # again if one was accepted meanwhile
            for run in runs:
                self._stop(run)
            for run in runs:
                self._end_disconnect(run)
        self._close_store()


def _refuse(sock: socket.socket) -> None:
    """Answer a connection over the limit with HTTP 503 (after its request head, so the client
    reads the answer rather than a reset); the caller closes it."""
    sock.settimeout(2.0)
    with contextlib.suppress(OSError):
        head = b""
        while not head_read(head):
            chunk = sock.recv(READ_SIZE)
            if not chunk:
                return
            head += chunk
        sock.sendall(REFUSAL)
