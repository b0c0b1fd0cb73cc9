"""The async adapter: :class:`FederatedRhizomeDB` runs a :class:`~rhizome_proto.FederationNode`
over real sockets with anyio, so the same code runs on asyncio and on trio
(``anyio.run(main, backend="trio")``); :mod:`rhizome_adapters.aio` and
:mod:`rhizome_adapters.trio_adapter` are the names users import.

``async with FederatedRhizomeDB(...) as db:`` opens the task group that the connections, the
server, the committer and coroutine handlers run in; leaving it closes the links (close
handshake), stops the server and waits for all of it. Each live connection has three tasks:

* the reader feeds the core what ``receive`` returns and runs the pump (the node stages the
  input, the timer is re-armed, a commit is asked for);
* the writer writes (``send`` returns once the kernel has the bytes: backpressure), streams
  the initial sync several batches per write, and once the core is done closes the stream
  (within a grace period, flushed or not);
* the timer sleeps until the core's deadline; the pump wakes it only when the deadline moves
  earlier (a later one is found when it wakes).

Group commit: one committer task, woken by an event, commits after every reader woken in the
same turn of the loop has staged its input: one transaction per turn, acknowledged after it.
The only live connection over plain TCP needs no group: its reader commits at once and,
while its writer is idle, writes the acknowledgements itself (what the kernel does not take at
once is left to the writer), so a round trip takes one turn of the loop.
Reading never waits for writing, so pings and acks are read while a large sync is written.
TLS (``wss://``) is ``anyio.streams.tls``; ``ssl=`` takes an :class:`ssl.SSLContext`.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from ssl import SSLContext, SSLError
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSStream

from rhizome_proto import Delta, FederationConnection

from . import _base
from ._base import EventHandler, LinkStatus
from ._options import ConnectOptions, ServerOptions, Target, takes

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]

log = logging.getLogger(__name__)

#: Bytes per ``receive``: all an asyncio transport reads at once, as each costs a turn.
_RECEIVE_SIZE = 4 * _base.READ_SIZE
#: Seconds a TLS handshake may take.
TLS_HANDSHAKE_TIMEOUT = 60.0
#: How early a deadline may fire (asyncio's ``call_at`` goes by the clock's resolution).
_CLOCK_SLACK = 0.002
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_HANDSHAKE_FAILED = (*_BROKEN, anyio.EndOfStream, SSLError, TimeoutError)


def _cause(exc: BaseException) -> BaseException:
    """anyio wraps transport errors; the original says why."""
    return exc.__cause__ if isinstance(exc.__cause__, OSError) else exc


@dataclass(eq=False)
class _Run(_base.LinkRun):
    settled: anyio.Event = field(default_factory=anyio.Event)
    #: the link's task: connecting, its sessions, waiting to reconnect
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)  # the link's task has ended


class _Session:
    """One live connection of a link: the core's connection and its stream."""

    def __init__(
        self,
        run: _Run,
        conn: FederationConnection,
        stream: anyio.abc.ByteStream,
        head: bytes = b"",
    ):
        self.run, self.conn, self.stream = run, conn, stream
        self.head = head  # what was read before the connection was made (a server's request)
        self.woken, self.rearmed, self.armed = anyio.Event(), anyio.Event(), math.inf
        self.idle = False  # the writer waits to be woken
        #: the socket under a plain TCP stream, which the reader writes to while the writer
        #: is idle (nothing is held above the kernel then: see :meth:`_answer_now`)
        self.sock = stream.extra(SocketAttribute.raw_socket) if _plain(stream) else None
        self.answering = False  # the reader writes the answers: wakes are for it, not the writer
        self.unsent = b""  # what the reader could not write at once, the writer's first bytes
        self.write_scope = anyio.CancelScope()  # gets the grace deadline once the core is done
        self.scope: anyio.CancelScope | None = None  # the session's tasks

    def wake(self) -> None:
        if not self.answering:
            self.woken.set()

    def rearm(self) -> None:
        when = self.conn.get_timer()
        if when is not None and when < self.armed:
            self.rearmed.set()

    def closing(self) -> None:
        if math.isinf(self.write_scope.deadline):
            self.write_scope.deadline = anyio.current_time() + _base.CLOSE_GRACE
        self.woken.set()


class FederationLink(_base.LinkBase):
    __doc__ = _base.LinkBase.__doc__

    async def pause(self) -> None:
        self._run.pause(True)
        await anyio.lowlevel.checkpoint()

    async def resume(self) -> None:
        self._run.pause(False)
        await anyio.lowlevel.checkpoint()

    async def disconnect(self) -> None:
        await self._run.disconnect()

    async def send_delta(self, delta: Delta) -> None:
        self._run.send(delta)
        await anyio.lowlevel.checkpoint()


class FederatedRhizomeDB(_base.DBBase[FederationLink, _Run]):
    """A RhizomeDB instance that federates over WebSocket, on asyncio or trio (anyio).

    Use it as ``async with FederatedRhizomeDB(...) as db:`` (the block owns its task group).
    ``storage`` picks a new ``"memory"`` or ``"sqlite"`` store (``path`` for the file) unless
    ``store`` is given; a store passed in is not closed by :meth:`close`.
    """

    _run_type, _link_type, _logger = _Run, FederationLink, log

    def _init_runtime(self) -> None:
        self._tasks: anyio.abc.TaskGroup | None = None
        self._handler_scopes: set[anyio.CancelScope] = set()
        self._server_scope: anyio.CancelScope | None = None
        self._commit_due = False  # staged input waits for a commit
        self._reading: _Session | None = None  # the reader running the pump, if one is
        self._commit_wanted: anyio.Event | None = None  # wakes the committer
        self._committer: anyio.CancelScope | None = None

    def _now(self) -> float:
        return anyio.current_time()

    def _spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Start ``func(*args)`` in the instance's task group."""
        assert self._tasks is not None
        self._tasks.start_soon(func, *args)

    def _can_spawn(self) -> bool:
        """Whether :meth:`_spawn` can start tasks (inside ``async with``)."""
        return self._tasks is not None

    def _running(self) -> None:
        self._check_open()
        if not self._can_spawn():
            raise RuntimeError("use the instance as `async with FederatedRhizomeDB(...) as db:`")

    async def __aenter__(self) -> FederatedRhizomeDB:
        if self._tasks is not None or self._closed:
            raise RuntimeError("this FederatedRhizomeDB was already entered")
        self._tasks = await anyio.create_task_group().__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.close()
        finally:
            tasks, self._tasks = self._tasks, None
            try:  # the block's own exception propagates by itself
                if tasks is not None:
                    await tasks.__aexit__(None, None, None)
            finally:
                self._close_store()

    async def persist_delta(self, delta: Delta) -> bool:
        return (await self.persist_deltas((delta,)))[0]

    async def persist_deltas(self, deltas: Iterable[Delta]) -> list[bool]:
        stored = self._persist(deltas)
        await anyio.lowlevel.checkpoint()
        return stored

    # ---------------------------------------------------------------- handlers and commits

    def _schedule(self, pending: Awaitable[Any]) -> None:
        if self._can_spawn():
            self._spawn(self._run_handler, pending)
        elif inspect.iscoroutine(pending):  # not entered, or already left
            pending.close()

    async def _run_handler(self, pending: Awaitable[Any]) -> None:
        with anyio.CancelScope() as scope:
            self._handler_scopes.add(scope)
            try:
                await pending
            except Exception as exc:
                self._handlers.failed(exc)
            finally:
                self._handler_scopes.discard(scope)

    def _commit_soon(self) -> None:
        """Group commit: the commit is due in the next turn of the loop, once every reader
        woken in this one has staged its input. The first task to run then commits: a writer
        its idle reader woke (which then writes the acknowledgements in that turn) or the
        committer."""
        self._commit_due = True
        if self._reading is None:  # else the reader hands the commit on
            self._wake_committer()

    def _wake_committer(self) -> None:
        if self._commit_wanted is None:
            self._commit_wanted, self._committer = anyio.Event(), anyio.CancelScope()
            self._spawn(self._commit_loop, self._committer)
        self._commit_wanted.set()

    def _commit_if_due(self) -> None:
        if self._commit_due:
            self._commit_due = False
            self._commit()

    async def _commit_loop(self, scope: anyio.CancelScope) -> None:
        with scope:
            while self._commit_wanted is not None:
                await self._commit_wanted.wait()
                self._commit_wanted = anyio.Event()
                self._commit_if_due()

    # ---------------------------------------------------------------- a live connection

    async def _serve_session(self, session: _Session) -> None:
        """Attach the connection to its link and serve it until it is closed."""
        try:
            async with anyio.create_task_group() as tasks:
                session.scope = tasks.cancel_scope
                self._attach(session)
                tasks.start_soon(self._write_loop, session)
                tasks.start_soon(self._timer_loop, session)
                await self._read_loop(session)
        finally:
            self._detach(session)
            await anyio.aclose_forcefully(session.stream)

    async def _read_loop(self, session: _Session) -> None:
        try:
            while not session.conn.closed:
                data: bytes | None = session.head
                if data:
                    session.head = b""
                else:
                    try:
                        data = await session.stream.receive(_RECEIVE_SIZE)
                    except anyio.EndOfStream:
                        data = b""
                self._reading = session
                try:
                    self._received(session, data, anyio.current_time())
                finally:
                    self._reading = None
                if not session.idle:
                    self._wake_committer()
                elif not self._answer_now(session):
                    session.wake()  # its writer commits, if nothing did before, and answers
                if delay := self._read_delay(session):  # over the rate limit
                    await anyio.sleep(delay)
        except _BROKEN as exc:
            self._fail(session, _cause(exc))
        except Exception as exc:
            log.exception("link %s failed", session.run.id)
            self._fail(session, exc)

    def _answer_now(self, session: _Session) -> bool:
        """The reader of the only live connection (no other reader can add to the group
        commit) commits what it staged and writes the answers itself, in its own turn of the
        loop, when its writer is idle and the stream is plain TCP: what the kernel does not
        take at once is left to the writer. Returns whether the writer has nothing to do.

        An idle writer's last ``send`` has returned, so every byte it wrote is with the kernel
        (trio's socket keeps none; anyio sets its asyncio transport's write buffer limits to 0,
        so its ``send`` returns once the transport's buffer is empty): writing to the socket
        keeps the order."""
        sock = session.sock
        if sock is None or len(self._sessions) > 1:
            return False
        session.answering = True
        try:
            self._commit_if_due()
            data, done = self._answers(session)
        finally:
            session.answering = False
        try:
            # its number now: -1 once closed (EBADF), never another socket's since
            sent = os.write(sock.fileno(), data) if data else 0
        except OSError:  # would block, broken or closed: the writer finds out
            sent = 0
        session.unsent = data[sent:]
        return done and not session.unsent

    async def _write_loop(self, session: _Session) -> None:
        """Writes (the reader too, in :meth:`_answer_now`'s case); ends the connection once the
        core is done."""
        try:
            with session.write_scope:
                while True:
                    session.idle = True
                    await session.woken.wait()
                    session.idle, session.woken = False, anyio.Event()
                    self._commit_if_due()
                    if session.unsent:
                        data, session.unsent = session.unsent, b""
                        await session.stream.send(data)
                    while data := self._output(session):
                        await session.stream.send(data)
                    if session.conn.should_close:
                        break
        except _BROKEN as exc:
            self._fail(session, _cause(exc))
        except Exception as exc:
            log.exception("link %s failed while writing", session.run.id)
            self._fail(session, exc)
        finally:
            data = b""  # not kept by this frame if a traceback outlives it (a cycle)
            if session.scope is not None:
                session.scope.cancel()  # the reader and the timer
            await anyio.aclose_forcefully(session.stream)

    async def _timer_loop(self, session: _Session) -> None:
        """Sleep until the core's deadline (or until it moves earlier); run it if it is due."""
        conn = session.conn
        while True:
            when = conn.get_timer()
            session.armed, session.rearmed = math.inf if when is None else when, anyio.Event()
            with anyio.CancelScope(deadline=session.armed):
                await session.rearmed.wait()
            when, now = conn.get_timer(), anyio.current_time()
            if when is not None and now + _CLOCK_SLACK >= when:
                self._received(session, None, max(now, when))

    # ---------------------------------------------------------------- server

    @takes(ServerOptions)
    async def enable_server(self, server: ServerOptions) -> str:
        """Listen for federation links."""
        self._running()
        server = self._start_server(server)
        with server.listening():
            listener = await anyio.create_tcp_listener(
                local_host=server.host, local_port=server.port
            )
        url = self._serving(server, listener.extra(SocketAttribute.local_port))
        self._server_scope = anyio.CancelScope()
        self._spawn(self._serve, listener, server.ssl, self._server_scope)
        return url

    async def _serve(
        self, listener: MultiListener[Any], ssl: SSLContext | None, scope: anyio.CancelScope
    ) -> None:
        with scope:
            async with listener, anyio.create_task_group() as tasks:
                for each in listener.listeners:
                    assert isinstance(each, anyio.abc.SocketListener)
                    tasks.start_soon(self._accept_loop, each, ssl)

    async def _accept_loop(
        self, listener: anyio.abc.SocketListener, ssl: SSLContext | None
    ) -> None:
        while True:
            try:
                self._spawn(self._accept, await listener.accept(), ssl)
            except OSError:
                log.exception("accepting a connection failed")
                await anyio.sleep(0.5)  # out of file descriptors, perhaps

    async def _accept(self, stream: anyio.abc.SocketStream, ssl: SSLContext | None) -> None:
        """A new connection: pending (TLS handshake, request head) under admission, then a
        link, or refused."""
        io: anyio.abc.ByteStream = stream
        peer = stream.extra(SocketAttribute.remote_address, None)
        pending = anyio.CancelScope()
        ticket = self._admit(peer, pending.cancel)
        pending.deadline = ticket.deadline
        try:
            made = None
            head = b""
            with pending:
                if ssl is not None:
                    io = await TLSStream.wrap(
                        stream, server_side=True, ssl_context=ssl, standard_compatible=False
                    )
                while not _base.head_read(head):
                    head += await io.receive(_base.READ_SIZE)
                made = self._upgrade(ticket, peer)
            if made is None:
                if pending.cancelled_caught and not ticket.released:
                    self._pending_expired()  # its deadline passed (else it was evicted)
                return
            if isinstance(made, bytes):
                with anyio.move_on_after(2.0):
                    await io.send(made)
                return
            run, conn = made
            try:
                with run.scope:
                    await self._serve_session(_Session(run, conn, io, head))
            finally:
                self._forget(run)
                run.done.set()
        except _HANDSHAKE_FAILED:  # a failed TLS handshake, or gone before anything was said
            pass
        except Exception:
            log.exception("incoming connection failed")
        finally:
            self._release(ticket)
            await anyio.aclose_forcefully(io)

    # ---------------------------------------------------------------- outgoing links

    @takes(ConnectOptions)
    async def connect_to_remote(self, link: ConnectOptions) -> FederationLink:
        """Open an outgoing link."""
        self._running()
        run, target = self._outgoing_link(link)
        self._spawn(self._run_outgoing, run, target)
        if not link.wait:
            return self._view(run)
        try:
            await run.settled.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._disconnect(run)
            raise
        return self._settled_link(run, link.url)

    async def _run_outgoing(self, run: _Run, target: Target) -> None:
        """Connect, run the session, wait per the reconnect policy, repeat until stopped."""
        try:
            with run.scope:
                for wait in self._attempts(run):
                    if wait is not None:
                        await anyio.sleep(wait)
                        continue
                    try:
                        stream = await _open(target)
                    except (*_BROKEN, TimeoutError) as exc:
                        self._connect_failed(run, _cause(exc))
                        continue
                    conn = self._client_connection(run, target)
                    await self._serve_session(_Session(run, conn, stream))
        except Exception as exc:
            self._crashed(run, exc)
        finally:
            run.settled.set()
            run.done.set()

    async def disconnect_from_remote(self, link_id: str) -> None:
        await self._disconnect(self._run_of(link_id))

    async def _disconnect(self, run: _Run) -> None:
        if not self._begin_disconnect(run):
            run.scope.cancel()  # connecting, or waiting to reconnect
        with anyio.move_on_after(_base.DISCONNECT_WAIT):
            await run.done.wait()
        run.scope.cancel()
        await run.done.wait()
        self._forget(run)

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        if not self._begin_close():
            return
        if self._server_scope is not None:
            self._server_scope.cancel()
        async with anyio.create_task_group() as tasks:
            for run in list(self._runs.values()):
                tasks.start_soon(self._disconnect, run)
        if self._committer is not None:
            self._committer.cancel()
            self._commit_if_due()  # what the last turn staged
        for scope in list(self._handler_scopes):
            scope.cancel()
        await self._stop_tasks()
        self._close_store()

    async def _stop_tasks(self) -> None:
        """What is still running once the links ended (asyncio without ``async with``)."""


def _plain(stream: anyio.abc.ByteStream) -> bool:
    """Whether the stream is a socket's (not TLS over it)."""
    return isinstance(stream, anyio.abc.SocketStream)


async def _open(target: Target) -> anyio.abc.ByteStream:
    """A TCP stream to the target; with its ``ssl``, TLS checked against its host before use."""
    stream = await anyio.connect_tcp(target.host, target.port)
    try:
        with anyio.fail_after(TLS_HANDSHAKE_TIMEOUT):
            if target.ssl is None:
                return stream
            return await TLSStream.wrap(
                stream, hostname=target.host, ssl_context=target.ssl, standard_compatible=False
            )
    except anyio.EndOfStream as exc:
        await anyio.aclose_forcefully(stream)
        raise anyio.BrokenResourceError("closed by the server during the TLS handshake") from exc
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
