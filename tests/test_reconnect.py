"""Reconnection decided by the core's ``ReconnectSupervisor``, as the adapters drive it, over real
sockets on 127.0.0.1: asyncio and trio (``aio_support``) and threads.

What is permanent is not retried (an upgrade refused with 404, a handshake refused with
``PROTOCOL_MISMATCH`` by the peer or by us, a link to ourselves); what is not is retried with
backoff until ``max_attempts``; a link that connects then drops at once keeps its count.
The misbehaving servers are plain sockets and wsproto on a thread, so one server serves every
runtime.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from rhizome_adapters import threaded
from rhizome_proto import (
    PROTOCOL_VERSION,
    ErrorCode,
    EventType,
    FederationEvent,
    LinkConfig,
    ReconnectPolicy,
    ReconnectSupervisor,
)
from tests.adapter_support import Recorder
from tests.aio_support import deadline, instance, wait_until

#: Fast retries, forever unless a test says otherwise: only what is permanent stops them.
FOREVER = ReconnectPolicy(initial_delay=0.01, max_delay=0.05)
#: Two retries after the first attempt, with ceilings 0.01, 0.02 (doubling).
TWO_RETRIES = ReconnectPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.05)


def now_ms() -> int:
    return int(time.time() * 1000)


class FakeServer:
    """A misbehaving federation server on a thread; ``answer`` is what each connection gets:

    * ``"close"``: accepted, then closed before a byte is read;
    * ``"mismatch"``: the upgrade accepted, the ``hello`` answered with a fatal
      ``PROTOCOL_MISMATCH`` error, then a close;
    * ``"other_protocol"``: a ``hello_ack`` naming another protocol (our client refuses it);
    * ``"ack_then_close"``: a valid ``hello_ack``, then a close at once.
    """

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.connections = 0
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.url = f"ws://127.0.0.1:{self._sock.getsockname()[1]}/federation"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                if self.answer != "close":
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        hello: dict[str, Any] | None = None
        while hello is None:
            data = conn.recv(65536)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    conn.sendall(ws.send(AcceptConnection()))
                elif isinstance(event, TextMessage):
                    hello = json.loads(event.data)
        assert hello["type"] == "hello"
        reply: dict[str, Any] = {"timestamp": now_ms()}
        if self.answer == "mismatch":
            reply |= {
                "type": "error",
                "code": "PROTOCOL_MISMATCH",
                "message": f"Unsupported protocol: {hello['protocol']}",
                "fatal": True,
            }
        else:
            protocol = "other-protocol-v9" if self.answer == "other_protocol" else PROTOCOL_VERSION
            reply |= {"type": "hello_ack", "systemId": "fake", "linkId": "l1", "protocol": protocol}
        conn.sendall(ws.send(TextMessage(data=json.dumps(reply))))
        conn.sendall(ws.send(CloseConnection(code=1001)))
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):  # until the client closes: nothing of ours is lost to a reset
            pass


@contextlib.contextmanager
def fake_server(answer: str) -> Iterator[FakeServer]:
    server = FakeServer(answer)
    try:
        yield server
    finally:
        server.close()


def supervisor_of(link: Any) -> ReconnectSupervisor:
    supervisor = link.reconnect
    assert isinstance(supervisor, ReconnectSupervisor)
    return supervisor


def check_not_retried(link: Any, events: Recorder, *, code: ErrorCode | None = None) -> str:
    """The link failed after one attempt, not retried; its ``link:error`` has ``code``."""
    supervisor = supervisor_of(link)
    assert link.status == "failed" and supervisor.gave_up and supervisor.permanent
    assert supervisor.attempts == 1 and len(events.of(EventType.LINK_CONNECTING)) == 1
    (last, *_) = reversed(events.of(EventType.LINK_ERROR))
    assert last.fatal and last.code == code and last.reason == supervisor.final_reason
    assert link.failure == supervisor.final_reason
    assert supervisor.final_reason is not None and supervisor.final_reason.startswith("not retried")
    return supervisor.final_reason


def check_retried(link: Any, events: Recorder, policy: ReconnectPolicy) -> str:
    """The link was retried ``max_attempts`` times with a growing ceiling, then gave up."""
    supervisor = supervisor_of(link)
    attempts = policy.max_attempts + 1
    assert link.status == "failed" and supervisor.gave_up and not supervisor.permanent
    assert supervisor.attempts == attempts == len(events.of(EventType.LINK_CONNECTING))
    assert supervisor.final_reason is not None
    assert supervisor.final_reason.startswith(f"gave up after {attempts} failed attempt(s)")
    return supervisor.final_reason


class Schedule:
    """At each ``link:connecting``: the failures so far and the delay waited before it."""

    def __init__(self, db: Any) -> None:
        self.seen: list[tuple[int, float | None]] = []
        self.db = db
        db.on_federation_event(self, (EventType.LINK_CONNECTING,))

    def __call__(self, event: FederationEvent) -> None:
        supervisor = supervisor_of(self.db.get_federation_link(event.link_id))
        self.seen.append((supervisor.failures, supervisor.delay))

    def check(self, policy: ReconnectPolicy) -> None:
        """Failures 0, 1, 2 ...; each delay at most the ceiling of its failure count, which
        grows (``initial_delay * backoff_multiplier ** (n - 1)``)."""
        failures = [n for n, _ in self.seen]
        assert failures == list(range(len(self.seen)))
        ceilings = [policy.delay(n, 1.0) or 0.0 for n in failures[1:]]
        assert ceilings == sorted(ceilings) and ceilings[0] < ceilings[-1]
        for (n, delay), ceiling in zip(self.seen[1:], ceilings, strict=True):
            assert delay is not None and 0 <= delay <= ceiling, n


# ---------------------------------------------------------------- asyncio and trio


@deadline()
async def test_a_404_is_not_retried() -> None:
    async with instance(system_id="server") as server, instance(system_id="client") as client:
        url = (await server.enable_server(port=0)).replace("/federation", "/elsewhere")
        events = Recorder(client)
        with pytest.raises(ConnectionError, match="HTTP 404") as info:
            await client.connect_to_remote(url, LinkConfig(reconnect=FOREVER))
        assert "not retried" in str(info.value) and client.get_federation_links() == []
        events.events.clear()
        link = await client.connect_to_remote(url, LinkConfig(reconnect=FOREVER), wait=False)
        await wait_until(lambda: link.status == "failed")
        reason = check_not_retried(link, events)
        last = supervisor_of(link).last_failure
        assert "HTTP 404" in reason and last is not None and last.status == 404


@deadline()
async def test_a_server_that_closes_at_once_is_retried_then_given_up() -> None:
    with fake_server("close") as fake:
        async with instance(system_id="client") as client:
            events, schedule = Recorder(client), Schedule(client)
            link = await client.connect_to_remote(
                fake.url, LinkConfig(reconnect=TWO_RETRIES), wait=False
            )
            await wait_until(lambda: link.status == "failed")
            check_retried(link, events, TWO_RETRIES)
            assert fake.connections == 3
            schedule.check(TWO_RETRIES)
            with pytest.raises(ConnectionError, match=r"gave up after 3 failed attempt"):
                await client.connect_to_remote(fake.url, LinkConfig(reconnect=TWO_RETRIES))


@deadline()
@pytest.mark.parametrize("answer", ["mismatch", "other_protocol"])
async def test_a_protocol_mismatch_is_not_retried(answer: str) -> None:
    """Refused by the peer (its fatal error) or by us (its ``hello_ack``): once only."""
    with fake_server(answer) as fake:
        async with instance(system_id="client") as client:
            events = Recorder(client)
            link = await client.connect_to_remote(
                fake.url, LinkConfig(reconnect=FOREVER), wait=False
            )
            await wait_until(lambda: link.status == "failed")
            reason = check_not_retried(link, events, code=ErrorCode.PROTOCOL_MISMATCH)
            assert "PROTOCOL_MISMATCH" in reason and fake.connections == 1


@deadline()
async def test_a_link_that_drops_at_once_keeps_its_count() -> None:
    """Each attempt completes the handshake, then the server closes: not a stable connection,
    so the count of failures is not cleared and the policy gives up all the same."""
    with fake_server("ack_then_close") as fake:
        async with instance(system_id="client") as client:
            events = Recorder(client)
            link = await client.connect_to_remote(fake.url, LinkConfig(reconnect=TWO_RETRIES))
            await wait_until(lambda: link.status == "failed")
            check_retried(link, events, TWO_RETRIES)
            assert len(events.of(EventType.LINK_CONNECTED)) == 3 == fake.connections


@deadline()
async def test_a_link_to_ourselves_fails_at_once() -> None:
    async with instance(system_id="me") as db:
        url = await db.enable_server(port=0)
        events = Recorder(db)
        with pytest.raises(ConnectionError, match="system id is our own") as info:
            await db.connect_to_remote(url, LinkConfig(reconnect=FOREVER))
        assert "SELF_LINK" in str(info.value)
        assert len(events.of(EventType.LINK_CONNECTING)) == 1
        await wait_until(lambda: db.get_federation_links() == [])  # the server's side too
        assert not events.of(EventType.LINK_CONNECTED)


# ---------------------------------------------------------------- threads


def thread_wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_threads_a_404_is_not_retried() -> None:
    with (
        threaded.FederatedRhizomeDB(system_id="server") as server,
        threaded.FederatedRhizomeDB(system_id="client") as client,
    ):
        url = server.enable_server(port=0).replace("/federation", "/elsewhere")
        events = Recorder(client)
        with pytest.raises(ConnectionError, match="HTTP 404"):
            client.connect_to_remote(url, LinkConfig(reconnect=FOREVER), timeout=5)
        events.events.clear()
        link = client.connect_to_remote(url, LinkConfig(reconnect=FOREVER), wait=False)
        thread_wait(lambda: link.status == "failed")
        assert "HTTP 404" in check_not_retried(link, events)


def test_threads_a_server_that_closes_at_once_is_retried_then_given_up() -> None:
    with fake_server("close") as fake, threaded.FederatedRhizomeDB(system_id="client") as client:
        events, schedule = Recorder(client), Schedule(client)
        link = client.connect_to_remote(fake.url, LinkConfig(reconnect=TWO_RETRIES), wait=False)
        thread_wait(lambda: link.status == "failed")
        check_retried(link, events, TWO_RETRIES)
        assert fake.connections == 3
        schedule.check(TWO_RETRIES)


@pytest.mark.parametrize("answer", ["mismatch", "other_protocol"])
def test_threads_a_protocol_mismatch_is_not_retried(answer: str) -> None:
    with fake_server(answer) as fake, threaded.FederatedRhizomeDB(system_id="client") as client:
        events = Recorder(client)
        with pytest.raises(ConnectionError, match="PROTOCOL_MISMATCH"):
            client.connect_to_remote(fake.url, LinkConfig(reconnect=FOREVER), timeout=5)
        assert fake.connections == 1 and len(events.of(EventType.LINK_CONNECTING)) == 1
        events.events.clear()
        link = client.connect_to_remote(fake.url, LinkConfig(reconnect=FOREVER), wait=False)
        thread_wait(lambda: link.status == "failed")
        check_not_retried(link, events, code=ErrorCode.PROTOCOL_MISMATCH)
        assert fake.connections == 2


def test_threads_a_link_that_drops_at_once_keeps_its_count() -> None:
    with (
        fake_server("ack_then_close") as fake,
        threaded.FederatedRhizomeDB(system_id="client") as client,
    ):
        events = Recorder(client)
        link = client.connect_to_remote(fake.url, LinkConfig(reconnect=TWO_RETRIES), timeout=5)
        thread_wait(lambda: link.status == "failed")
        check_retried(link, events, TWO_RETRIES)
        assert len(events.of(EventType.LINK_CONNECTED)) == 3 == fake.connections


def test_threads_a_link_to_ourselves_fails_at_once() -> None:
    with threaded.FederatedRhizomeDB(system_id="me") as db:
        url = db.enable_server(port=0)
        events = Recorder(db)
        with pytest.raises(ConnectionError, match="system id is our own"):
            db.connect_to_remote(url, LinkConfig(reconnect=FOREVER), timeout=5)
        assert len(events.of(EventType.LINK_CONNECTING)) == 1
        thread_wait(lambda: db.get_federation_links() == [])
        assert not events.of(EventType.LINK_CONNECTED)
