"""The base's flows (``rhizome_adapters._base``) driven by hand, step by step: no socket is
read or written, no thread started, no time waited.

A flow is a generator of I/O steps (``rhizome_adapters._io``); an adapter runs it through
:class:`Flow`, doing each step and sending its result (or throwing its error) back in. Here the
test plays the adapter: it answers each step itself, with bytes made in memory (TLS over memory
BIOs for ``wss://``) and a fake clock, so these tests show the flows are sans-IO and pin what
they do: :class:`Flow` and :class:`TLS` themselves, a server's pending connection (admission,
upgrade, refusal, the TLS handshake), the TLS handshake alone, and an outgoing link's attempts.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import cast

import anyio
import pytest
import trustme
from anyio.abc import SocketAttribute

from rhizome_adapters import _base, anyio_adapter, threaded
from rhizome_adapters._io import (
    TLS,
    Accept,
    Connect,
    Flow,
    Receive,
    Send,
    Serve,
    Sleep,
    Start,
    Steps,
    Wait,
)
from rhizome_adapters._options import ConnectOptions, ServerOptions
from rhizome_proto import (
    DEFAULT_PATH,
    AdmissionLimits,
    EventType,
    FederationEvent,
    LinkConfig,
    ReconnectPolicy,
    ReconnectSupervisor,
    Role,
)
from tests.aio_support import deadline

REQUEST = (
    f"GET {DEFAULT_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
).encode()
PEER = ("127.0.0.1", 5000)
#: the fake clock's start (the instance's ``_now``)
T0 = 100.0
#: the default admission limits' ``pending_timeout``
PENDING_TIMEOUT = AdmissionLimits().pending_timeout


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Accepted:
    """Stands for an accepted socket: a pending flow only ever shuts it down (to evict it, or
    at its deadline); any other use would fail here."""

    def __init__(self) -> None:
        self.shut = False

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_RDWR
        self.shut = True


def accepted() -> tuple[Accepted, socket.socket]:
    fake = Accepted()
    return fake, cast(socket.socket, fake)


def rest(flow: Flow[None], most: int = 10) -> list[object]:
    """The steps left in ``flow`` (each sent ``None``), failing if it does not end soon."""
    steps: list[object] = []
    for op in flow:
        steps.append(op)
        assert len(steps) <= most, f"the flow does not end: {steps}"
    return steps


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> Iterator[threaded.FederatedRhizomeDB]:
    """An instance on the fake clock (constructing it starts no thread)."""
    instance = threaded.FederatedRhizomeDB(system_id="server")
    monkeypatch.setattr(instance, "_now", clock)
    try:
        yield instance
    finally:
        instance.close()


# ---------------------------------------------------------------- Flow


def test_flow_sends_results_throws_errors_and_ends_with_the_generator() -> None:
    seen: list[object] = []

    def steps() -> Steps[str]:
        try:
            seen.append((yield Receive(1.0)))
            try:
                yield Send(b"out")
            except ConnectionResetError as exc:
                seen.append(exc)  # caught: the flow goes on
            seen.append((yield Sleep(0.5)))
            return "done"
        finally:
            seen.append("finally")

    error = ConnectionResetError("reset")
    with Flow(steps()) as flow:
        ops = []
        for op in flow:
            ops.append(op)
            if isinstance(op, Receive):
                flow.result = b"in"
            elif isinstance(op, Send):
                flow.error = error
        assert ops == [Receive(1.0), Send(b"out"), Sleep(0.5)]
        # a step without a result set gets None; the result is cleared once sent in
        assert seen == [b"in", error, None, "finally"]
        assert flow.result is None and flow.error is None


def test_leaving_a_flow_early_closes_its_generator() -> None:
    closed: list[type[BaseException] | None] = []

    def steps() -> Steps[None]:
        try:
            yield Receive(1.0)
            yield Receive(2.0)
        except BaseException as exc:
            closed.append(type(exc))
            raise
        finally:
            closed.append(None)

    with Flow(steps()) as flow:
        assert next(flow) == Receive(1.0)
    assert closed == [GeneratorExit, None]

    with pytest.raises(KeyError), Flow(steps()) as flow:  # left by an error of the adapter's
        next(flow)
        raise KeyError("the adapter's own failure")
    assert closed == [GeneratorExit, None, GeneratorExit, None]


# ---------------------------------------------------------------- TLS


def shake(client: TLS, server: TLS) -> bytes:
    """The handshake in memory; returns the server's last records (TLS 1.3 session tickets)
    still on their way to the client."""
    client_done, to_server = client.handshake(None)
    while True:
        server_done, to_client = server.handshake(to_server)
        if client_done and server_done:
            return to_client
        assert not client_done, "the client finished before the server could"
        client_done, to_server = client.handshake(to_client)


def test_tls_in_memory_both_ways_byte_exact(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    client, server = TLS(client_tls, "localhost"), TLS(server_tls)
    tickets = shake(client, server)
    big = bytes(range(256)) * 400  # 100 KB: several records, more than one read's chunk
    assert server.decrypt(client.encrypt(b"hello")) == b"hello"
    assert server.decrypt(client.encrypt(big)) == big
    assert client.decrypt(tickets + server.encrypt(b"hi")) == b"hi"
    assert client.decrypt(server.encrypt(big)) == big
    records = server.encrypt(big)
    half = len(records) // 2
    assert client.decrypt(records[:half]) + client.decrypt(records[half:]) == big
    assert server.encrypt(b"") == b""  # nothing waits (and b"" to decrypt is the end)
    assert not client.closed and not server.closed


def test_tls_plaintext_behind_the_handshake_s_last_records(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    """TLS 1.3 lets a client send data right behind its ``Finished``: the server gets both in
    one buffer, ends its handshake, and ``decrypt(None)`` gives the data already there."""
    client, server = TLS(client_tls, "localhost"), TLS(server_tls)
    _, hello = client.handshake(None)
    server_done, flight = server.handshake(hello)
    client_done, finished = client.handshake(flight)
    assert client_done and not server_done
    server_done, _ = server.handshake(finished + client.encrypt(REQUEST))
    assert server_done
    assert server.decrypt(None) == REQUEST
    assert server.decrypt(None) == b""


def test_tls_end_of_stream_closes(server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
    client, server = TLS(client_tls, "localhost"), TLS(server_tls)
    shake(client, server)
    assert server.decrypt(b"") == b""
    assert server.closed and not client.closed


def test_tls_handshake_with_a_client_that_does_not_trust_the_server(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)  # another CA's
    for context, hostname in ((stranger, "localhost"), (client_tls, "example.test")):
        client, server = TLS(context, hostname), TLS(server_tls)
        _, hello = client.handshake(None)
        _, flight = server.handshake(hello)
        with pytest.raises(ssl.SSLCertVerificationError):
            client.handshake(flight)


# ---------------------------------------------------------------- a server's pending connection


def pending(db: threaded.FederatedRhizomeDB, context: ssl.SSLContext | None = None) -> Flow[None]:
    _, sock = accepted()
    return Flow(db._pending(PEER, sock, context))


def test_a_request_head_makes_a_link_served_until_the_flow_ends(
    db: threaded.FederatedRhizomeDB,
) -> None:
    with pending(db) as flow:
        assert next(flow) == Receive(T0 + PENDING_TIMEOUT)
        assert (db.admission.pending, db.admission.open) == (1, 0)
        assert db.get_federation_links() == []
        flow.result = REQUEST
        serve = next(flow)
        assert isinstance(serve, Serve)
        assert serve.head == REQUEST and serve.tls is None
        assert serve.conn.role is Role.SERVER
        run = serve.run
        assert isinstance(run, threaded._Run)
        assert not run.node_link.outgoing and run.node_link.remote_url == "127.0.0.1:5000"
        assert [link.id for link in db.get_federation_links()] == [run.id]
        assert (db.admission.pending, db.admission.open) == (0, 1)
    assert db.get_federation_links() == []
    assert (db.admission.pending, db.admission.open) == (0, 0)
    assert run.state == "disconnected" and run.settled.is_set()


def test_a_request_head_in_pieces(db: threaded.FederatedRhizomeDB) -> None:
    with pending(db) as flow:
        steps = []
        for op in flow:
            steps.append(op)
            if isinstance(op, Receive):
                flow.result = REQUEST[:10] if len(steps) == 1 else REQUEST[10:]
            else:
                break
        assert steps[:2] == [Receive(T0 + PENDING_TIMEOUT)] * 2
        assert isinstance(steps[2], Serve) and steps[2].head == REQUEST


@pytest.mark.parametrize("early", [False, True], ids=["at-the-deadline", "timer-fired-early"])
def test_the_deadline_passing_ends_the_flow_as_a_timeout(
    db: threaded.FederatedRhizomeDB, clock: Clock, early: bool
) -> None:
    """The step's ``None`` says the deadline passed, whatever the clock reads: asyncio's
    timers may fire a little before its clock reaches the deadline (``early``: still T0)."""
    with pending(db) as flow:
        deadline = next(flow)
        assert isinstance(deadline, Receive)
        if not early:
            clock.now = deadline.deadline
        flow.result = None
        assert rest(flow) == []
    assert db.admission.timed_out == 1
    assert (db.admission.pending, db.admission.open) == (0, 0)


def test_a_timeout_closes_every_pending_connection_past_its_deadline(
    db: threaded.FederatedRhizomeDB, clock: Clock
) -> None:
    first_sock, second_sock = accepted(), accepted()
    with (
        Flow(db._pending(PEER, first_sock[1], None)) as first,
        Flow(db._pending(PEER, second_sock[1], None)) as second,
    ):
        assert next(first) == next(second) == Receive(T0 + PENDING_TIMEOUT)
        clock.now = T0 + PENDING_TIMEOUT
        first.result = None
        assert rest(first) == []
        assert second_sock[0].shut and first_sock[0].shut  # its own too
        assert db.admission.timed_out == 2 and db.admission.pending == 0
        second.result = b""  # its socket, shut down, reads the end
        assert rest(second) == []
    assert db.admission.timed_out == 2


def test_a_closed_connection_ends_the_flow_without_a_timeout(
    db: threaded.FederatedRhizomeDB,
) -> None:
    with pending(db) as flow:
        assert isinstance(next(flow), Receive)
        flow.result = b""
        assert rest(flow) == []
    assert db.admission.timed_out == 0
    assert (db.admission.pending, db.admission.open) == (0, 0)


def test_a_new_connection_evicts_the_oldest_pending_one(db: threaded.FederatedRhizomeDB) -> None:
    db._serving(ServerOptions(limits=AdmissionLimits(max_pending=1)), 8080)
    old, new = accepted(), accepted()
    with (
        Flow(db._pending(PEER, old[1], None)) as first,
        Flow(db._pending(PEER, new[1], None)) as second,
    ):
        assert isinstance(next(first), Receive)
        assert not old[0].shut
        assert isinstance(next(second), Receive)
        assert old[0].shut and not new[0].shut
        assert db.admission.evicted == 1 and db.admission.pending == 1
        first.result = b""  # what its socket reads once shut down
        assert rest(first) == []
        assert db.admission.pending == 1  # the newer one's
        second.result = REQUEST
        assert isinstance(next(second), Serve)
    assert (db.admission.pending, db.admission.open, db.admission.timed_out) == (0, 0, 0)


def test_a_full_server_refuses_with_503(db: threaded.FederatedRhizomeDB) -> None:
    db._serving(ServerOptions(max_connections=1), 8080)
    with pending(db) as served, pending(db) as refused:
        next(served)
        served.result = REQUEST
        assert isinstance(next(served), Serve)
        next(refused)
        refused.result = REQUEST
        answer = next(refused)
        assert isinstance(answer, Send)
        assert answer.data.startswith(b"HTTP/1.1 503 ") and b"server full" in answer.data
        assert answer.deadline is not None and answer.deadline > T0
        assert rest(refused) == []
        assert db.admission.refused == 1 and db.admission.open == 1
        assert len(db.get_federation_links()) == 1
    assert (db.admission.pending, db.admission.open) == (0, 0)


def test_a_closing_instance_refuses_with_503(db: threaded.FederatedRhizomeDB) -> None:
    with pending(db) as flow:
        next(flow)
        db.close()  # meanwhile
        flow.result = REQUEST
        answer = next(flow)
        assert isinstance(answer, Send)
        assert answer.data.startswith(b"HTTP/1.1 503 ") and b"Shutting down" in answer.data
        assert answer.deadline is not None and answer.deadline > T0
        flow.error = BrokenPipeError("gone")  # a refusal that cannot be written is no matter
        assert rest(flow) == []
    assert (db.admission.pending, db.admission.open) == (0, 0)
    assert db.get_federation_links() == []


def serve_over_tls(flow: Flow[None], client: TLS, request: bytes, together: bool) -> Serve:
    """Play the client of a pending TLS connection: the handshake, then ``request`` (in the
    same buffer as the client's ``Finished`` if ``together``); returns the ``Serve`` step."""
    done, out = client.handshake(None)
    for op in flow:
        if isinstance(op, Send):
            if done:  # the server's last records, TLS 1.3 session tickets: no plaintext
                assert client.decrypt(op.data) == b""
                continue
            done, out = client.handshake(op.data)
            if done and together:
                out, request = out + client.encrypt(request), b""
        elif isinstance(op, Receive):
            if not out:  # the handshake is over: the request, on its own
                assert done and request
                out, request = client.encrypt(request), b""
            flow.result, out = out, b""
        else:
            assert isinstance(op, Serve)
            return op
    raise AssertionError("the flow ended without serving")


@pytest.mark.parametrize("together", [True, False], ids=["behind-finished", "after"])
def test_a_tls_connection_is_served_with_its_tls_and_plaintext_head(
    db: threaded.FederatedRhizomeDB,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
    together: bool,
) -> None:
    with pending(db, server_tls) as flow:
        client = TLS(client_tls, "localhost")
        serve = serve_over_tls(flow, client, REQUEST, together)
        assert serve.head == REQUEST and serve.tls is not None
        assert client.decrypt(serve.tls.encrypt(b"HTTP/1.1 101 ")) == b"HTTP/1.1 101 "
        assert db.admission.open == 1
    assert (db.admission.pending, db.admission.open) == (0, 0)
    assert db.get_federation_links() == []


def test_a_failed_tls_handshake_ends_the_pending_flow_quietly(
    db: threaded.FederatedRhizomeDB, server_tls: ssl.SSLContext
) -> None:
    with pending(db, server_tls) as flow:
        assert next(flow) == Receive(T0 + PENDING_TIMEOUT)
        flow.result = REQUEST  # plain HTTP to a TLS server
        assert rest(flow) == []
    assert (db.admission.pending, db.admission.open, db.admission.timed_out) == (0, 0, 0)
    assert db.get_federation_links() == []


# ---------------------------------------------------------------- the TLS handshake alone


def test_the_handshake_s_deadline_passing_is_a_timeout(
    db: threaded.FederatedRhizomeDB, server_tls: ssl.SSLContext
) -> None:
    with Flow(db._handshake(TLS(server_tls), 42.0)) as flow:
        assert next(flow) == Receive(42.0)  # a server waits for the client's hello
        flow.result = None
        with pytest.raises(TimeoutError):
            next(flow)


def test_a_connection_closed_during_the_handshake(
    db: threaded.FederatedRhizomeDB, client_tls: ssl.SSLContext
) -> None:
    with Flow(db._handshake(TLS(client_tls, "localhost"), 42.0)) as flow:
        hello = next(flow)  # a client speaks first
        assert isinstance(hello, Send) and hello.data and hello.deadline == 42.0
        assert next(flow) == Receive(42.0)
        flow.result = b""
        with pytest.raises(ConnectionError):
            next(flow)


# ---------------------------------------------------------------- the server's accepting


def test_the_server_accepts_and_starts_a_pending_flow_for_each_connection(
    db: threaded.FederatedRhizomeDB, caplog: pytest.LogCaptureFixture
) -> None:
    with Flow(db._listening(None)) as flow:
        assert next(flow) == Accept()
        flow.result = None  # none came within the runtime's poll
        assert next(flow) == Accept()
        _, sock = accepted()
        flow.result = ("handle", sock, PEER)
        start = next(flow)
        assert isinstance(start, Start) and start.conn == "handle"
        with caplog.at_level(logging.ERROR), Flow(start.steps) as started:  # _pending's
            assert next(started) == Receive(T0 + PENDING_TIMEOUT)
            assert db.admission.pending == 1
        assert next(flow) == Accept()
        flow.error = OSError(24, "Too many open files")
        assert next(flow) == Sleep(_base.ACCEPT_RETRY)
        assert "accepting a connection failed" in caplog.text
        assert next(flow) == Accept()
        db.close()
        flow.error = OSError(9, "Bad file descriptor")  # the listener, closed meanwhile
        assert rest(flow) == []
    assert db.admission.pending == 0


# ---------------------------------------------------------------- a live connection's writer


class Session(_base.Session):
    """A live connection whose steps the test does itself (it answers ``Wait``)."""

    def wait(self) -> None:
        raise AssertionError("the test answers Wait steps")


def served(db: threaded.FederatedRhizomeDB, flow: Flow[None]) -> Session:
    """A server connection past its upgrade request: attached, the request fed to the core
    (as the reader would, without its direct answers)."""
    next(flow)
    flow.result = REQUEST
    serve = next(flow)
    assert isinstance(serve, Serve)
    _, sock = accepted()
    woken = threading.Event()
    session = Session(serve, sock, woken)
    db._attach(session)
    db._received(session, serve.head, db._now())
    assert woken.is_set()  # the writer is told
    return session


def test_the_writer_writes_the_core_s_output_and_ends_when_the_core_is_done(
    db: threaded.FederatedRhizomeDB,
) -> None:
    events: list[FederationEvent] = []
    db.on_federation_event(events.append)
    with pending(db) as flow:
        session = served(db, flow)
        with Flow(db._writing(session)) as writer:
            assert next(writer) == Wait(session)
            answer = next(writer)
            assert isinstance(answer, Send) and answer.deadline is None
            assert answer.data.startswith(b"HTTP/1.1 101 ")
            assert next(writer) == Wait(session)  # nothing more to write
            db._received(session, b"", db._now())  # the peer went away
            assert rest(writer) == []
        assert session.conn.closed
        db._detach(session)
    assert [e.type for e in events] == [EventType.LINK_DISCONNECTED]


def test_a_failed_write_fails_the_connection(db: threaded.FederatedRhizomeDB) -> None:
    events: list[FederationEvent] = []
    db.on_federation_event(events.append)
    with pending(db) as flow:
        session = served(db, flow)
        with Flow(db._writing(session)) as writer:
            next(writer)
            assert isinstance(next(writer), Send)
            assert next(writer) == Wait(session)
            db._begin_disconnect(session.run)  # the close handshake: a close frame to write
            close = next(writer)
            assert isinstance(close, Send) and close.data[:1] == b"\x88"
            writer.error = BrokenPipeError("gone")
            assert rest(writer) == []
        assert session.conn.closed
        db._detach(session)
    assert [(e.type, e.reason) for e in events] == [
        (EventType.LINK_ERROR, "BrokenPipeError: gone"),
        (EventType.LINK_DISCONNECTED, "BrokenPipeError: gone"),
    ]


# ---------------------------------------------------------------- an outgoing link

RETRY_ONCE = ReconnectPolicy(max_attempts=1, initial_delay=0.01, max_delay=0.02)


def outgoing(
    db: threaded.FederatedRhizomeDB,
    url: str = "ws://127.0.0.1:5000/federation",
    context: ssl.SSLContext | None = None,
) -> tuple[threaded._Run, Flow[None], list[FederationEvent]]:
    run, target = db._outgoing_link(
        ConnectOptions(url, LinkConfig(reconnect=RETRY_ONCE), ssl=context)
    )
    run.reconnect = ReconnectSupervisor(RETRY_ONCE, random=lambda: 0.5)  # no jitter
    events: list[FederationEvent] = []
    db.on_federation_event(events.append)
    return run, Flow(db._outgoing(run, target)), events


def test_connect_failures_are_retried_as_the_policy_says_then_the_link_fails(
    db: threaded.FederatedRhizomeDB,
) -> None:
    run, flow, events = outgoing(db)
    with flow:
        steps = []
        for op in flow:  # the clock never moves: the flow does not wait on it
            steps.append(op)
            assert len(steps) <= 10, f"the flow does not end: {steps}"
            if isinstance(op, Connect):
                flow.error = ConnectionRefusedError("refused")
    connect = Connect("127.0.0.1", 5000)
    assert steps[0] == steps[2] == connect and len(steps) == 3
    assert isinstance(steps[1], Sleep) and steps[1].seconds == pytest.approx(0.005)
    assert run.settled.is_set() and run.state == "failed"
    assert [(e.type, e.fatal) for e in events] == [
        (EventType.LINK_CONNECTING, False),
        (EventType.LINK_ERROR, False),
        (EventType.LINK_CONNECTING, False),
        (EventType.LINK_ERROR, False),
        (EventType.LINK_ERROR, True),
    ]
    assert events[1].reason == "cannot connect to ws://127.0.0.1:5000/federation: refused"
    assert events[-1].reason == run.failure
    assert run.failure is not None and run.failure.startswith("gave up after 2 failed attempt")


def test_a_connection_is_served_as_a_client_then_a_stopped_link_ends(
    db: threaded.FederatedRhizomeDB,
) -> None:
    run, flow, _ = outgoing(db)
    with flow:
        assert next(flow) == Connect("127.0.0.1", 5000)
        serve = next(flow)  # connected (the result of Connect is the adapter's own)
        assert isinstance(serve, Serve) and serve.run is run and serve.tls is None
        assert serve.conn.role is Role.CLIENT and serve.head == b""
        run.stopping = True  # disconnect() while it was served
        assert rest(flow) == []
    assert run.settled.is_set()


def test_a_session_that_cannot_be_set_up_is_a_failed_attempt(
    db: threaded.FederatedRhizomeDB,
) -> None:
    """A transport error thrown in at the Serve step (the runtime could not set the session
    up: out of file descriptors for the writer's ``dup()``, say) fails that attempt, and the
    link tries again as its policy says, instead of failing for good as after a bug."""
    run, flow, events = outgoing(db)
    with flow:
        assert next(flow) == Connect("127.0.0.1", 5000)
        assert isinstance(next(flow), Serve)
        flow.error = OSError(errno.EMFILE, "Too many open files")
        wait = next(flow)
        assert isinstance(wait, Sleep) and wait.seconds == pytest.approx(0.005)
        assert next(flow) == Connect("127.0.0.1", 5000)  # the next attempt
    assert run.state != "failed"
    assert [e.reason for e in events if e.type == EventType.LINK_ERROR] == [
        "cannot connect to ws://127.0.0.1:5000/federation: [Errno 24] Too many open files"
    ]


def test_a_tls_failure_is_a_connect_failure(
    db: threaded.FederatedRhizomeDB, client_tls: ssl.SSLContext, clock: Clock
) -> None:
    run, flow, events = outgoing(db, "wss://localhost:5000/federation", client_tls)
    with flow:
        assert next(flow) == Connect("localhost", 5000)
        hello = next(flow)
        assert isinstance(hello, Send) and hello.deadline == T0 + 60.0
        assert next(flow) == Receive(T0 + 60.0)
        flow.result = b"HTTP/1.1 400 Bad Request\r\n\r\n"  # a plain server
        wait = next(flow)
        assert isinstance(wait, Sleep) and wait.seconds == pytest.approx(0.005)
    assert run.settled.is_set()  # left early: settled all the same
    reason = events[1].reason
    assert reason is not None and reason.startswith("cannot connect to wss://localhost:5000")


def test_a_read_that_timed_out_before_the_deadline_commits_nothing(
    db: threaded.FederatedRhizomeDB, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that looks at the deadline again (threads do every second) finds nothing came
    and nothing is due: the core is not pumped, nothing is committed, no writer woken."""
    with pending(db) as flow:
        session = served(db, flow)
        commits: list[None] = []
        monkeypatch.setattr(db, "_commit_soon", lambda: commits.append(None))
        session.woken.clear()
        timer = session.conn.get_timer()
        assert timer is not None and timer > clock.now
        db._received(session, None, clock.now)
        assert commits == [] and not session.woken.is_set()
        clock.now = timer  # now it is due (the open timeout: no hello came)
        db._received(session, None, clock.now)
        assert commits == [None] and session.woken.is_set()
        db._detach(session)


@deadline(10)
async def test_rearm_brings_an_anyio_read_s_deadline_forward() -> None:
    """On anyio a read waits until the core's own deadline, with no polling: when the deadline
    moves earlier meanwhile (set by another task), ``rearm`` ends the wait by it."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            db = anyio_adapter.FederatedRhizomeDB(system_id="server")
            run = db._add_link(None, outgoing=False, remote_url=None)
            conn = db._new_connection(Role.SERVER, link_id=run.id, open_timeout=0.05)
            session = anyio_adapter._Session(Serve(run, conn), stream)
            with anyio.CancelScope() as reading:  # a read with no deadline of its own
                session.reading = reading
                conn.start(anyio.current_time())  # the open timeout: a deadline 0.05 s away
                session.rearm()
                assert reading.deadline == conn.get_timer()
                await anyio.sleep_forever()
            assert reading.cancelled_caught
            later = anyio.CancelScope(deadline=reading.deadline - 1)
            session.reading = later
            session.rearm()  # never later than it was
            assert later.deadline == reading.deadline - 1
            db._forget(run)  # never served: nothing for close() to wait for
