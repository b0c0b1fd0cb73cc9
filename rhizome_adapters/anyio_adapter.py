"""The async adapter: :class:`FederatedRhizomeDB` runs a :class:`~rhizome_proto.FederationNode`
over real sockets with anyio, so the same code runs on asyncio and on trio
(``anyio.run(main, backend="trio")``); :mod:`rhizome_adapters.aio` and
:mod:`rhizome_adapters.trio_adapter` are the names users import.

``async with FederatedRhizomeDB(...) as db:`` opens the task group that the connections, the
server, the commits and coroutine handlers run in; leaving it closes the links (close
handshake), stops the server and waits for all of it. The flows, group commit and TLS
(``ssl=`` takes an :class:`ssl.SSLContext`) are the base's (:mod:`._base`); this module runs
them as anyio tasks: a live connection's reader and writer, a group commit, the server.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from rhizome_proto import Delta

from . import _base
from ._base import EventHandler, LinkStatus
from ._io import Accept, Connect, Flow, Receive, Send, Serve, Sleep, Start, Steps, Wait
from ._options import ConnectOptions, ServerOptions, takes

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]

log = logging.getLogger(__name__)

#: Bytes per ``receive``: all an asyncio transport reads at once, as each costs a turn.
_RECEIVE_SIZE = 4 * _base.READ_SIZE
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - anyio.current_time()


@dataclass(eq=False)
class _Run(_base.LinkRun):
    settled: anyio.Event = field(default_factory=anyio.Event)
    #: an outgoing link's task (connecting, its sessions, waiting), or an incoming one's session
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)  # that has ended


class _Session(_base.Session):
    """One live connection of a link, over its socket stream."""

    woken: anyio.Event

    def __init__(self, serve: Serve, stream: anyio.abc.SocketStream) -> None:
        super().__init__(serve, stream.extra(SocketAttribute.raw_socket), anyio.Event())
        self.stream = stream
        self.write_scope = anyio.CancelScope()  # gets the grace deadline once the core is done
        self.reading: anyio.CancelScope | None = None  # the reader's wait for input

    def rearm(self) -> None:
        when, reading = self.conn.get_timer(), self.reading
        if when is not None and reading is not None and when < reading.deadline:
            reading.deadline = when

    async def wait(self) -> None:
        await self.woken.wait()
        self.woken = anyio.Event()

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
    """A RhizomeDB instance that federates over WebSocket, on asyncio or trio (anyio): use it as
    ``async with FederatedRhizomeDB(...) as db:`` (the block owns its task group)."""

    _run_type, _link_type, _logger = _Run, FederationLink, log
    _group_commit, _broken, _read_wait = True, _BROKEN, math.inf

    def _init_runtime(self) -> None:
        self._tasks: anyio.abc.TaskGroup | None = None
        self._handler_scopes: set[anyio.CancelScope] = set()
        self._listeners: Sequence[anyio.abc.Listener[Any]] = ()
        self._committing = False  # a commit task was started and has not run yet

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

    def _commit_later(self) -> None:
        """A task commits after the readers woken in this turn of the loop, which run before it
        (unless a writer commits first); at once if tasks cannot start (leaving the block)."""
        if not self._can_spawn():
            self._commit_if_due()
        elif not self._committing:
            self._committing = True
            self._spawn(self._commit_task)

    async def _commit_task(self) -> None:
        self._committing = False
        self._commit_if_due()

    # ---------------------------------------------------------------- the base's flows

    async def _drive(self, steps: Steps[None], conn: Any, own: bool = False) -> None:
        with Flow(steps) as flow:
            try:
                for op in flow:
                    try:
                        match op:
                            case Receive(deadline, session):
                                with anyio.CancelScope(deadline=deadline) as scope:
                                    if isinstance(session, _Session):
                                        session.reading = scope
                                    flow.result = await conn.receive(_RECEIVE_SIZE)
                            case Send(data, deadline):
                                with anyio.fail_after(_left(deadline)):
                                    await conn.send(data)
                            case Sleep(seconds):
                                await anyio.sleep(seconds)
                            case Wait(session):
                                await session.wait()
                            case Connect(host, port):
                                if own:  # an attempt that failed before it was served
                                    await anyio.aclose_forcefully(conn)
                                conn, own = await anyio.connect_tcp(host, port), True
                            case Serve():
                                served, conn, own = conn, None, False
                                await self._serve_session(_Session(op, served))
                            case Accept():
                                stream = await conn.accept()
                                sock = stream.extra(SocketAttribute.raw_socket)
                                peer = stream.extra(SocketAttribute.remote_address, None)
                                flow.result = stream, sock, peer
                            case Start(started, stream):
                                self._spawn(self._drive, started, stream, True)
                    except anyio.EndOfStream:
                        flow.result = b""
                    except Exception as exc:
                        flow.error = exc
            finally:
                if own:
                    await anyio.aclose_forcefully(conn)

    async def _serve_session(self, session: _Session) -> None:
        run = session.run
        assert isinstance(run, _Run)
        scope = run.scope if not run.node_link.outgoing else anyio.CancelScope()
        try:
            with scope:
                async with anyio.create_task_group() as tasks:
                    self._attach(session)
                    tasks.start_soon(self._write, session, tasks.cancel_scope)
                    await self._drive(self._reading(session), session.stream)
        finally:
            self._detach(session)
            await anyio.aclose_forcefully(session.stream)
            if not run.node_link.outgoing:
                run.done.set()

    async def _write(self, session: _Session, tasks: anyio.CancelScope) -> None:
        try:
            with session.write_scope:
                await self._drive(self._writing(session), session.stream)
        finally:
            tasks.cancel()  # the reader
            await anyio.aclose_forcefully(session.stream)

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
        self._listeners = listener.listeners  # closed by close(): accept() ends
        for each in listener.listeners:
            self._spawn(self._drive, self._listening(server.ssl), each, True)
        return url

    # ---------------------------------------------------------------- outgoing links

    @takes(ConnectOptions)
    async def connect_to_remote(self, link: ConnectOptions) -> FederationLink:
        """Open an outgoing link."""
        self._running()
        run, target = self._outgoing_link(link)
        self._spawn(self._run_outgoing, run, self._outgoing(run, target))
        if not link.wait:
            return self._view(run)
        try:
            await run.settled.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._disconnect(run)
            raise
        return self._settled_link(run, link.url)

    async def _run_outgoing(self, run: _Run, steps: Steps[None]) -> None:
        try:
            with run.scope:
                await self._drive(steps, None)
        finally:
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
        for listener in self._listeners:
            await listener.aclose()
        async with anyio.create_task_group() as tasks:
            for run in list(self._runs.values()):
                tasks.start_soon(self._disconnect, run)
        self._commit_if_due()  # what the last turn staged
        for scope in list(self._handler_scopes):
            scope.cancel()
        self._close_store()
