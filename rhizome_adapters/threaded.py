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
* the writer (on its own ``dup()`` of the socket, whose timeout is the instance's
  ``ping_timeout``): woken after anything that may have queued output, it takes
  ``data_to_send()`` under the lock and ``sendall``\\ s it outside it, and streams the initial
  sync several batches per write. A reader that never waits for writes is what keeps two peers
  streaming to each other from deadlocking: over plain TCP the reader writes the answers its
  own input made (the acknowledgements) while the writer is idle, but only what the kernel
  takes at once; the rest is the writer's (a thread switch less per round trip).

Event handlers are called from the adapter's threads (a connection's reader or writer, a link's
connect thread) or from the thread that called ``disconnect``/``close``: one at a time, in the
order the node produced the events, never under the lock, so they may call the instance's
methods. A slow handler delays that thread's connection. Coroutine handlers are refused.

TLS (``wss://``): ``enable_server(ssl=...)`` and ``connect_to_remote(..., ssl=...)`` take an
:class:`ssl.SSLContext`, as in the async adapter. The TLS work runs on memory BIOs under a lock
of the connection's own, held only around it, so the reader still never waits for the writer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from ssl import SSLContext
from typing import Any

from rhizome_proto import Delta, FederationConnection, Ticket

from . import _base
from ._base import EventHandler, LinkStatus
from ._options import ConnectOptions, ServerOptions, Target, takes

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]

log = logging.getLogger(__name__)

#: Longest a reader waits in ``recv`` before looking at the core's deadline again.
_MAX_WAIT = 1.0
#: Seconds a TCP connect may take.
_CONNECT_TIMEOUT = 10.0
#: Seconds a client's TLS handshake may take.
_TLS_HANDSHAKE_TIMEOUT = 60.0
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


class _Channel:
    """A connection's byte stream over its socket: the reader's ``recv`` and, on a ``dup()``
    of the socket with a timeout of its own, the writer's ``send``."""

    def __init__(self, sock: socket.socket, write_timeout: float) -> None:
        self.sock = sock
        self.wsock = sock.dup()
        self.wsock.settimeout(write_timeout)
        #: the writer must look (TLS: records to send that the reader made)
        self.wake: Callable[[], None] = lambda: None
        #: whether the reader may write with :meth:`try_send` (not over TLS)
        self.direct = True
        self.unsent = b""  # what :meth:`try_send` left, written first by the next ``send``

    def recv(self, timeout: float) -> bytes | None:
        """Bytes read (``b""``: end of stream), or ``None`` when none came within
        ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(_base.READ_SIZE)
        except TimeoutError:
            return None

    def send(self, data: bytes) -> None:
        """Write ``data`` (blocks until the kernel has it; ``b""``: what is pending)."""
        if self.unsent:
            data, self.unsent = self.unsent + data, b""
        if data:
            self.wsock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Write what of ``data`` the kernel takes now, without waiting (the socket has a
        timeout, so it is non-blocking underneath); the rest waits for :meth:`send`. Returns
        whether all of it was written (a failure is left to ``send``, the writer's)."""
        try:
            sent = os.write(self.sock.fileno(), data) if data and not self.unsent else 0
        except OSError:  # would block, or broken
            sent = 0
        self.unsent += data[sent:]
        return not self.unsent

    def abort(self) -> None:
        """End both directions now (a blocked ``recv`` or ``send`` returns)."""
        _shut(self.sock)

    def close(self) -> None:
        self.wsock.close()


class _TLSChannel(_Channel):
    """TLS over a socket through memory BIOs: the reader and the writer use one
    :class:`ssl.SSLObject` under a lock held only for the TLS work (never while a socket
    blocks), so reading never waits for writing, as over plain TCP."""

    def __init__(
        self,
        sock: socket.socket,
        write_timeout: float,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        super().__init__(sock, write_timeout)
        self.tls, self.incoming, self.outgoing = tls, incoming, outgoing
        self.lock = threading.Lock()
        self.pending = bytearray()  # records the reader's TLS work made, for the writer
        self.eof = False
        self.direct = False

    def recv(self, timeout: float) -> bytes | None:
        # records may wait in the BIO already: those that came with the handshake's last ones
        out = self._decrypt(None)
        if out or self.eof:
            return out
        raw = super().recv(timeout)
        if raw is None:
            return None
        return self._decrypt(raw) or (b"" if not raw or self.eof else None)

    def _decrypt(self, raw: bytes | None) -> bytes:
        """Feed ``raw`` (``b""``: end of stream; ``None``: nothing new) to TLS; the plaintext
        it makes. Records TLS makes meanwhile go to the writer."""
        out = bytearray()
        with self.lock:
            if raw:
                self.incoming.write(raw)
            elif raw is not None:
                self.incoming.write_eof()
            try:
                while chunk := self.tls.read(_base.READ_SIZE):
                    out += chunk
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True  # closed (with or without close_notify)
            made = self.outgoing.read()
            self.pending += made
        if made:
            self.wake()
        return bytes(out)

    def send(self, data: bytes) -> None:
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[self.tls.write(view) :]
            out = bytes(self.pending) + self.outgoing.read()
            self.pending.clear()
        super().send(out)


def _tls_channel(
    sock: socket.socket,
    context: ssl.SSLContext,
    write_timeout: float,
    deadline: float,
    hostname: str | None = None,
) -> _TLSChannel:
    """The TLS handshake over ``sock`` (a server's when ``hostname`` is ``None``, else a
    client's, checking the certificate for ``hostname``), done before ``deadline``
    (``time.monotonic``; else :class:`TimeoutError`)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(
        incoming, outgoing, server_side=hostname is None, server_hostname=hostname
    )
    while True:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        out = outgoing.read()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the TLS handshake took too long")
        sock.settimeout(left)
        if out:
            sock.sendall(out)
        if done:
            return _TLSChannel(sock, write_timeout, tls, incoming, outgoing)
        data = sock.recv(_base.READ_SIZE)
        if not data:
            raise ConnectionError("closed during the TLS handshake")
        incoming.write(data)


class _Session:
    """One live connection of a link: the core's connection, its channel and two threads.

    Whoever writes holds ``writing``: the writer while it takes output and sends it, the
    reader when it writes what its own input made (only if the writer is idle, and without
    waiting: what the kernel does not take at once is left to the writer)."""

    def __init__(
        self, run: _Run, conn: FederationConnection, channel: _Channel, head: bytes = b""
    ) -> None:
        self.run, self.conn, self.channel = run, conn, channel
        self.head = head  # what was read before the connection was made (a server's request)
        self.woken = threading.Event()
        self.writing = threading.Lock()
        #: the reader's thread while it feeds the core: its wakes are noted in ``deferred``,
        #: and it writes the output itself afterwards if it can
        self.reader: int | None = None
        self.deferred = False
        channel.wake = self.wake

    def wake(self) -> None:
        if self.reader == threading.get_ident():
            self.deferred = True
        else:
            self.woken.set()

    def abort(self) -> None:
        self.channel.abort()

    def rearm(self) -> None:
        """The reader looks at the deadline before every ``recv``."""

    def closing(self) -> None:
        self.woken.set()


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
            writer.join(_base.CLOSE_GRACE)
            session.abort()  # the writer is stuck in sendall: end it
            writer.join(_base.CLOSE_GRACE)
            session.channel.close()
            self._detach(session)

    def _read_loop(self, session: _Session) -> None:
        conn, channel = session.conn, session.channel
        if session.head:
            self._feed(session, session.head)
            session.head = b""
        while True:
            with self._lock:
                if conn.closed:
                    return
                deadline = conn.get_timer()
            wait = _MAX_WAIT if deadline is None else deadline - time.monotonic()
            try:
                data = channel.recv(min(max(wait, 0.001), _MAX_WAIT))
            except OSError as exc:
                self._fail(session, exc)
                return
            self._feed(session, data)
            if delay := self._read_delay(session):  # over the rate limit
                time.sleep(delay)

    def _feed(self, session: _Session, data: bytes | None) -> None:
        """What the reader read goes to the core (and is committed); the answers it made are
        written by the reader itself when the writer is idle and the kernel takes them at
        once (a thread switch less per answer), else by the writer."""
        session.reader = threading.get_ident()
        try:
            self._received(session, data, time.monotonic())
        finally:
            session.reader = None
        if session.deferred:
            session.deferred = False
            if not (session.channel.direct and self._write_now(session)):
                session.woken.set()

    def _write_now(self, session: _Session) -> bool:
        """The reader writes the connection's output if the writer is idle, without waiting;
        whether that was all (else the writer has something to do)."""
        if not session.writing.acquire(blocking=False):
            return False
        try:
            data, done = self._answers(session)
            return session.channel.try_send(data) and done
        finally:
            session.writing.release()

    def _write_loop(self, session: _Session) -> None:
        """The writer (with the reader's direct writes, the only ones that write); shuts the
        socket down once the core is done."""
        try:
            while True:
                session.woken.wait()
                session.woken.clear()
                with session.writing:
                    while data := self._output(session):
                        session.channel.send(data)
                    session.channel.send(b"")  # what the reader (or its TLS work) left
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
            target=self._serve, args=(listener, server.ssl), daemon=True, name="rhizome-server"
        )
        self._server_thread.start()
        return url

    def _serve(self, listener: socket.socket, context: SSLContext | None) -> None:
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
                ticket = self._admit(peer, functools.partial(_shut, sock))
                thread = threading.Thread(
                    target=self._accept,
                    args=(sock, peer, ticket, context),
                    daemon=True,
                    name="rhizome-r",
                )
                thread.start()

    def _accept(
        self, sock: socket.socket, peer: object, ticket: Ticket, context: SSLContext | None
    ) -> None:
        """A new connection: pending (the TLS handshake, the request head) under admission,
        then a link, or refused."""
        with sock:
            try:
                if context is None:
                    channel = _Channel(sock, self._ping_timeout)
                else:
                    try:
                        channel = _tls_channel(sock, context, self._ping_timeout, ticket.deadline)
                    except OSError:  # a failed handshake, evicted, or its deadline
                        self._pending_expired()
                        return
                try:
                    self._serve_pending(channel, peer, ticket)
                finally:
                    channel.close()
            except Exception:
                log.exception("incoming connection failed")
            finally:
                self._release(ticket)

    def _serve_pending(self, channel: _Channel, peer: object, ticket: Ticket) -> None:
        """Read the request head before the deadline, then serve the link or refuse it."""
        head = _read_head(channel, ticket.deadline)
        if head is None:
            if not ticket.released and time.monotonic() >= ticket.deadline:
                self._pending_expired()
            return
        made = self._upgrade(ticket, peer)
        if made is None:
            return
        if isinstance(made, bytes):
            with contextlib.suppress(OSError):
                channel.wsock.settimeout(2.0)
                channel.send(made)
            return
        run, conn = made
        run.thread = threading.current_thread()
        try:
            self._serve_session(_Session(run, conn, channel, head))
        finally:
            self._forget(run)

    # ---------------------------------------------------------------- outgoing links

    @takes(_Connect)
    def connect_to_remote(self, link: _Connect) -> FederationLink:
        """Open an outgoing link, on a thread of its own."""
        run, target = self._outgoing_link(link)
        run.thread = threading.Thread(
            target=self._run_outgoing, args=(run, target), daemon=True, name="rhizome-link"
        )
        run.thread.start()
        if not link.wait:
            return self._view(run)
        if not run.settled.wait(link.timeout):
            self._disconnect(run)
            raise TimeoutError(f"no handshake with {link.url} within {link.timeout} s")
        return self._settled_link(run, link.url)

    def _run_outgoing(self, run: _Run, target: Target) -> None:
        """Connect, run the session, wait per the reconnect policy, repeat until stopped."""
        try:
            for wait in self._attempts(run):
                if wait is not None:
                    run.wakeup.wait(wait)
                    continue
                try:
                    sock = socket.create_connection(
                        (target.host, target.port), timeout=_CONNECT_TIMEOUT
                    )
                except OSError as exc:
                    self._connect_failed(run, exc)
                    continue
                with sock:
                    channel: _Channel
                    try:
                        if target.ssl is None:
                            channel = _Channel(sock, self._ping_timeout)
                        else:
                            deadline = time.monotonic() + _TLS_HANDSHAKE_TIMEOUT
                            channel = _tls_channel(
                                sock, target.ssl, self._ping_timeout, deadline, target.host
                            )
                    except OSError as exc:
                        self._connect_failed(run, exc)
                        continue
                    try:
                        conn = self._client_connection(run, target)
                        self._serve_session(_Session(run, conn, channel))
                    finally:
                        channel.close()
        except Exception as exc:
            self._crashed(run, exc)
        finally:
            run.settled.set()

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
                session.abort()
                thread.join(_base.CLOSE_GRACE)
        self._forget(run)

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close every link (close handshake), stop the server, join the threads, close the
        store we opened."""
        if not self._begin_close():
            return
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() where it can
        if self._server_thread is not None:
            self._server_thread.join(_ACCEPT_POLL + _base.CLOSE_GRACE)
        while runs := list(self._runs.values()):  # again if one was accepted meanwhile
            for run in runs:
                self._stop(run)
            for run in runs:
                self._end_disconnect(run)
        self._close_store()


def _shut(sock: socket.socket) -> None:
    """Close a pending connection (its thread's ``recv`` returns)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _read_head(channel: _Channel, deadline: float) -> bytes | None:
    """The request head (or as much as :func:`head_read` wants), read before ``deadline``
    (``time.monotonic``); ``None`` when the connection ended or the deadline passed first."""
    head = b""
    try:
        while not _base.head_read(head):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            chunk = channel.recv(left)
            if chunk == b"":
                return None
            head += chunk or b""
    except OSError:  # the deadline (TimeoutError), or closed to make room
        return None
    return head
