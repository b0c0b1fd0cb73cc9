"""The threaded adapter: :class:`FederatedRhizomeDB` for plain blocking code, on threads.

The same API as the asyncio adapter with blocking methods: ``enable_server`` starts a listening
thread and returns the URL, ``connect_to_remote(url, config, wait=True)`` blocks until the link
is connected, ``close()`` (or leaving ``with``) closes every link and joins the threads. All the
threads are daemon threads.

The core is not thread-safe: every call into the node, its store and the connections happens
under one :class:`threading.Lock` owned by the instance, which is never held while a socket is
read or written or while user code runs. The flows are the base's (:mod:`._base`): this module
runs their steps with blocking sockets (:meth:`FederatedRhizomeDB._drive`). Each live
connection has two threads: the reader (``recv`` with a timeout from the core's deadline) and
the writer, on its own ``dup()`` of the socket whose timeout is the instance's ``ping_timeout``.

Event handlers are called from the adapter's threads (a connection's reader or writer, a link's
connect thread) or from the thread that called ``disconnect``/``close``: one at a time, in the
order the node produced the events, never under the lock, so they may call the instance's
methods. A slow handler delays that thread's connection. Coroutine handlers are refused.

TLS (``wss://``): ``enable_server(ssl=...)`` and ``connect_to_remote(..., ssl=...)`` take an
:class:`ssl.SSLContext`, as in the async adapter; the TLS work is the base's.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from rhizome_proto import Delta

from . import _base
from ._base import EventHandler, LinkStatus
from ._io import Accept, Connect, Flow, Receive, Send, Serve, Sleep, Start, Steps, Wait
from ._options import ConnectOptions, ServerOptions, takes

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]

log = logging.getLogger(__name__)

#: Seconds a TCP connect may take.
_CONNECT_TIMEOUT = 10.0
#: How often the listening thread looks whether the server was stopped.
_ACCEPT_POLL = 0.5
#: Connections the kernel queues for ``accept`` (a flood must not fill it before we evict).
_BACKLOG = 1024


@dataclass(frozen=True)
class _Connect(ConnectOptions):
    """With ``wait``, after ``timeout`` seconds without a handshake this raises
    :class:`TimeoutError` (the link is closed)."""

    _: KW_ONLY
    timeout: float | None = None


@dataclass(eq=False)
class _Run(_base.LinkRun):
    settled: threading.Event = field(default_factory=threading.Event)
    #: the link's thread: connecting, reading, waiting to retry
    thread: threading.Thread | None = None
    #: ends the wait before a retry
    wakeup: threading.Event = field(default_factory=threading.Event)


class _Session(_base.Session):
    """One live connection of a link: the reader's socket, and a ``dup()`` of it for the
    writer, with a timeout of its own (the reader's changes with each wait)."""

    woken: threading.Event

    def __init__(self, serve: Serve, sock: socket.socket, write_timeout: float) -> None:
        super().__init__(serve, sock, threading.Event())
        self.wsock = sock.dup()
        self.wsock.settimeout(write_timeout)

    def wait(self) -> None:
        self.woken.wait()
        self.woken.clear()


class FederationLink(_base.LinkBase):
    __doc__ = _base.LinkBase.__doc__

    def pause(self) -> None:
        self._run.pause(True)

    def resume(self) -> None:
        self._run.pause(False)

    def disconnect(self) -> None:
        self._run.disconnect()

    def send_delta(self, delta: Delta) -> None:
        self._run.send(delta)


class FederatedRhizomeDB(_base.DBBase[FederationLink, _Run]):
    """A RhizomeDB instance that federates over WebSocket, for threaded code.

    Use it as a context manager (``close()`` on exit); the parameters are those of the asyncio
    adapter. Handlers are plain functions, called from the adapter's threads (see the module
    documentation); a coroutine function is refused.
    """

    _coroutine_handlers = False
    _run_type, _link_type, _logger = _Run, FederationLink, log

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._server_thread: threading.Thread | None = None

    def _now(self) -> float:
        return time.monotonic()

    def _guard(self) -> contextlib.AbstractContextManager[object]:
        return self._lock

    def __enter__(self) -> FederatedRhizomeDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def persist_delta(self, delta: Delta) -> bool:
        return self._persist((delta,))[0]

    def persist_deltas(self, deltas: Iterable[Delta]) -> list[bool]:
        return self._persist(deltas)

    # ---------------------------------------------------------------- events

    def _schedule(self, pending: Awaitable[Any]) -> None:
        log.error("a federation event handler returned an awaitable: nothing runs it here")
        if inspect.iscoroutine(pending):
            pending.close()

    # ---------------------------------------------------------------- the base's flows

    def _drive(
        self, steps: Steps[None], sock: Any, own: bool = False, run: _Run | None = None
    ) -> None:
        """``run``'s wakeup ends a :class:`Sleep` early (an outgoing link's wait)."""
        with Flow(steps) as flow:
            try:
                for op in flow:
                    try:
                        match op:
                            case Receive(deadline):  # a timeout always: non-blocking underneath
                                sock.settimeout(max(deadline - time.monotonic(), 1e-6))
                                with contextlib.suppress(TimeoutError):
                                    flow.result = sock.recv(_base.READ_SIZE)
                            case Send(data, deadline):
                                if deadline is not None:
                                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                                sock.sendall(data)
                            case Sleep(seconds):
                                (time.sleep if run is None else run.wakeup.wait)(seconds)
                            case Wait(session):
                                session.wait()
                            case Connect(host, port):
                                if own:  # an attempt that failed before it was served
                                    sock.close()
                                sock = socket.create_connection((host, port), _CONNECT_TIMEOUT)
                                own = True
                            case Serve():
                                served, sock, own = sock, None, False
                                with served:
                                    self._serve_session(_Session(op, served, self._ping_timeout))
                            case Accept():
                                with contextlib.suppress(TimeoutError):  # polls _closed
                                    conn, peer = sock.accept()
                                    flow.result = conn, conn, peer
                            case Start(started, conn):
                                threading.Thread(
                                    target=self._drive, args=(started, conn, True), daemon=True
                                ).start()
                    except Exception as exc:
                        flow.error = exc
            finally:
                if own:
                    sock.close()

    def _serve_session(self, session: _Session) -> None:
        assert isinstance(session.run, _Run)
        session.run.thread = threading.current_thread()  # joined by ``_end_disconnect``
        writer = threading.Thread(
            target=self._write, args=(session,), daemon=True, name="rhizome-w"
        )
        self._attach(session)
        writer.start()
        try:
            self._drive(self._reading(session), session.sock)
        finally:
            session.wake()
            writer.join(_base.CLOSE_GRACE)
            _base.shut(session.sock)  # the writer is stuck in sendall: end it
            writer.join(_base.CLOSE_GRACE)
            session.wsock.close()
            self._detach(session)

    def _write(self, session: _Session) -> None:
        try:
            self._drive(self._writing(session), session.wsock)
        finally:
            _base.shut(session.sock)  # ends the reader's recv too

    # ---------------------------------------------------------------- server

    @takes(ServerOptions)
    def enable_server(self, server: ServerOptions) -> str:
        """Listen for federation links on a thread."""
        server = self._start_server(server)
        with server.listening():
            listener = socket.create_server((server.host, server.port), backlog=_BACKLOG)
        listener.settimeout(_ACCEPT_POLL)
        self._listener = listener
        url = self._serving(server, listener.getsockname()[1])
        self._server_thread = threading.Thread(
            target=self._drive,
            args=(self._listening(server.ssl), listener, True),
            daemon=True,
            name="rhizome-server",
        )
        self._server_thread.start()
        return url

    # ---------------------------------------------------------------- outgoing links

    @takes(_Connect)
    def connect_to_remote(self, link: _Connect) -> FederationLink:
        """Open an outgoing link, on a thread of its own."""
        run, target = self._outgoing_link(link)
        run.thread = threading.Thread(
            target=self._drive,
            args=(self._outgoing(run, target), None),
            kwargs={"run": run},
            daemon=True,
            name="rhizome-link",
        )
        run.thread.start()
        if not link.wait:
            return self._view(run)
        if not run.settled.wait(link.timeout):
            self._disconnect(run)
            raise TimeoutError(f"no handshake with {link.url} within {link.timeout} s")
        return self._settled_link(run, link.url)

    def disconnect_from_remote(self, link_id: str) -> None:
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
            thread.join(_base.DISCONNECT_WAIT)
            session = run.session
            if thread.is_alive() and isinstance(session, _Session):
                _base.shut(session.sock)
                thread.join(_base.CLOSE_GRACE)
        self._forget(run)

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close every link (close handshake), stop the server, join the threads, close the
        store we opened."""
        if not self._begin_close():
            return
        if self._listener is not None:
            _base.shut(self._listener)  # wakes accept() where it can
        if self._server_thread is not None:
            self._server_thread.join(_ACCEPT_POLL + _base.CLOSE_GRACE)
        while runs := list(self._runs.values()):  # again if one was accepted meanwhile
            for run in runs:
                self._stop(run)
            for run in runs:
                self._end_disconnect(run)
        self._close_store()
