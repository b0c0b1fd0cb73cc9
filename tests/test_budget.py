"""The memory budget (issue #8, item 2; findings 2 and 3): a bound per connection on what is
queued for a peer, one bound over everything held for peers, and memory released when a
connection ends, without the cyclic garbage collector."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import time
import tracemalloc
from collections.abc import Iterator

import anyio
import pytest

from bench.wire import client_frame, client_upgrade
from rhizome_adapters.threaded import FederatedRhizomeDB
from rhizome_proto import CloseCode, ErrorCode, FederationNode
from tests.aio_support import deadline, instance, wait_until
from tests.hostile_peers import T0, HostileServer, delta_dict

MIB = 1024 * 1024


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off for the test: memory must be freed by refcounts."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_defaults() -> None:
    node = FederationNode("n", HostileServer().store, clock=lambda: 1)
    assert node.memory_budget == 256 * MIB
    assert node.max_connection_memory == 32 * MIB  # twice the largest message
    assert node.rate_limit is None
    with pytest.raises(ValueError):
        FederationNode("n", node.store, clock=lambda: 1, memory_budget=0)
    with pytest.raises(ValueError):
        FederationNode("n", node.store, clock=lambda: 1, rate_limit=(0, 1))


def test_finding_2_a_huge_id_is_never_echoed() -> None:
    """The same delta with a 1 MiB id, 600 times, never read: it is refused each time with a
    short error (its id is over the length cap, so it is not echoed), and nothing grows."""
    server = HostileServer()
    server.connect("evil", "attacker")
    message = {"type": "delta", "timestamp": T0, "delta": delta_dict("i" * MIB)}
    for _ in range(600):
        server.send("evil", message)
    assert server.conns["evil"].outbound_size < 600 * 400
    assert server.store.count() == 0
    errors = [m for m in server.read("evil") if m["type"] == "error"]
    assert len(errors) == 600
    assert errors[0]["code"] == "INVALID_DELTA" and "longer than 4096" in errors[0]["message"]


def test_finding_2_a_peer_that_does_not_read_is_disconnected() -> None:
    """Duplicates of a stored delta (an id within the cap) are acked again and again; a peer
    that never reads them is disconnected once more than its cap waits for it, and what was
    queued is let go. The delta stays stored."""
    server = HostileServer(max_connection_memory=MIB)
    conn = server.connect("evil", "attacker")
    message = {"type": "delta", "timestamp": T0, "delta": delta_dict("i" * 4000)}
    sent = 0
    while not conn.closed and sent < 1000:
        server.send("evil", message)
        sent += 1
    assert conn.closed and sent < 300  # about 1 MiB of 4 KB acks
    assert conn.close_code == CloseCode.POLICY_VIOLATION
    assert conn.outbound_size == 0 and conn.messages_to_send() == []
    assert server.node.connections_shed == 1
    [error] = server.of_type("link:error")
    assert error.code == ErrorCode.FLOW_CONTROL and error.fatal and "does not read" in error.reason
    assert server.of_type("link:disconnected")
    assert server.store.count() == 1


def test_past_the_total_budget_the_connection_holding_the_most_goes() -> None:
    """Each peer within its own cap, together over the budget (nothing parked to drop): the
    one holding the most is disconnected, the other goes on."""
    server = HostileServer(memory_budget=100 * 1024, max_connection_memory=MIB)
    big, small = server.connect("big", "big"), server.connect("small", "small")
    message = {"type": "delta", "timestamp": T0, "delta": delta_dict("i" * 4000)}
    for _ in range(20):
        server.send("big", message)
    for _ in range(10):
        server.send("small", message)
    assert big.closed and big.close_code == CloseCode.POLICY_VIOLATION
    assert small.is_open
    assert server.node.memory_held <= 100 * 1024
    [error] = server.of_type("link:error")
    assert error.link_id == "big" and "memory budget" in error.reason


def test_relay_to_a_peer_that_does_not_read_falls_back_to_the_store() -> None:
    """Stored deltas relayed to a v1 peer that does not read stop being queued past its cap:
    the link catches up from the store instead (nothing lost, memory bounded)."""
    server = HostileServer(max_connection_memory=64 * 1024)
    server.connect("slow", "slow-reader")
    server.connect("pusher", "pusher")
    for i in range(300):
        message = {"type": "delta", "timestamp": T0, "delta": delta_dict(f"d{i}", text="t" * 900)}
        server.send("pusher", message)
    slow = server.node.link("slow")
    assert slow is not None and slow.catching_up and slow.stats.overflows > 0
    assert server.conns["slow"].is_open and server.conns["slow"].outbound_size < 32 * 1024 + 2048
    assert server.store.count() == 300


def paused_peers(server: HostileServer, count: int) -> list[str]:
    """``count`` peers with made-up system ids connect and pause; then a pusher connects."""
    made_up = [f"made-up-{i}" for i in range(count)]
    for i, system_id in enumerate(made_up):
        server.connect(f"l{i}", system_id)
        server.send(f"l{i}", {"type": "pause", "timestamp": T0})
    server.connect("pusher", "pusher")
    return made_up


def push(server: HostileServer, i: int) -> None:
    """The pusher sends delta ``p{i}`` of about 1 KB."""
    message = {"type": "delta", "timestamp": T0, "delta": delta_dict(f"p{i}", text="y" * 900)}
    server.send("pusher", message)


def test_finding_3_what_is_held_for_peers_is_bounded_in_all() -> None:
    """Peers with made-up system ids connect, pause and leave while deltas are pushed: what
    is held for them (pending while they are paused, then parked) stays within the budget at
    every step, because past its share of the budget a link catches up from the store
    instead of holding more; the store keeps everything, and a remote that returns gets
    what was parked for it."""
    budget = 2 * MIB
    server = HostileServer(memory_budget=budget)
    node = server.node
    made_up = paused_peers(server, 10)
    n = 1000
    for i in range(n):
        push(server, i)
        assert node.memory_held <= budget
    share = budget // 11 // 2  # 11 connections, half the budget for pending deltas
    held = [server.conns[f"l{i}"].pending_bytes for i in range(len(made_up))]
    assert all(abs(size - share) < 1100 for size in held)  # within one delta of the share
    counts = [server.conns[f"l{i}"].pending_count for i in range(len(made_up))]
    for i in range(len(made_up)):
        link = node.link(f"l{i}")
        assert link is not None and link.catching_up and link.stats.overflows == 1
    for i in range(len(made_up)):
        server.leave(f"l{i}")
    assert server.store.count() == n
    assert node.parked_bytes == sum(held) and node.memory_held <= budget
    assert node.connections_shed == 0 and node.parked_dropped == 0
    server.connect("back", made_up[-1])
    server.send("back")
    returned = [m for m in server.read("back") if m["type"] == "delta"]
    assert [m["delta"]["id"] for m in returned] == [f"p{i}" for i in range(counts[-1])]


def test_parked_deltas_beyond_the_budget_go_the_least_recently_parked_first() -> None:
    """The budget lowered below what is parked: the remotes parked least recently lose
    theirs first (the store keeps them), and a remote that returns gets what is left."""
    server = HostileServer(memory_budget=2 * MIB)
    node = server.node
    made_up = paused_peers(server, 4)
    for i in range(100):
        push(server, i)
    for i in range(len(made_up)):
        server.leave(f"l{i}")
    parked = node.parked_bytes
    assert parked > 0 and node.parked_dropped == 0
    node.memory_budget = parked // 2
    server.send("pusher")  # the next commit keeps to the new budget
    assert 0 < node.parked_bytes <= parked // 2 and node.parked_dropped > 0
    assert server.store.count() == 100
    node.memory_budget = 2 * MIB  # room again for what is left to be delivered
    last = server.connect("back-last", made_up[-1])
    first = server.connect("back-first", made_up[0])
    server.send("back-last")
    server.send("back-first")
    assert len([m for m in server.read("back-last") if m["type"] == "delta"]) == 100
    assert [m for m in server.read("back-first") if m["type"] == "delta"] == []
    assert last.is_open and first.is_open


def test_a_closed_connection_lets_go_of_its_buffers_without_the_gc(no_gc: None) -> None:
    """A reference cycle (as adapters' tasks and links make) keeps a closed connection object
    alive until the cyclic GC runs: what it held for the peer is freed at the close anyway."""
    server = HostileServer()
    conn = server.connect("evil", "attacker")
    message = {"type": "delta", "timestamp": T0, "delta": delta_dict("i" * 4000)}
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            server.send("evil", message)
        held = tracemalloc.get_traced_memory()[0] - base
        assert held > 3 * MIB
        cycle: list[object] = [conn]
        cycle.append(cycle)  # the connection is now held by a cycle
        server.leave("evil")
        del conn
        server.conns.clear()
        after = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert after < held / 10


# ---------------------------------------------------------------------- over real sockets


def test_finding_2_over_sockets_memory_is_released_without_the_gc(no_gc: None) -> None:
    """A real server (threaded adapter): a client with a tiny receive buffer sends the same
    delta thousands of times and never reads. The server disconnects it past its cap, and once
    the client is gone the memory is back, with the cyclic GC off."""
    db = FederatedRhizomeDB(system_id="victim")
    db.node.max_connection_memory = 4 * MIB
    errors: list[str] = []
    db.on_federation_event(
        lambda e: errors.append(e.code or "") if e.type == "link:error" else None
    )
    tracemalloc.start()
    try:
        url = db.enable_server(port=0)
        base = tracemalloc.get_traced_memory()[0]
        sock = _attack(url)  # returns once disconnected, as it should be
        deadline = time.monotonic() + 20
        while ErrorCode.FLOW_CONTROL not in errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ErrorCode.FLOW_CONTROL in errors
        sock.close()
        while db.get_federation_links() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.get_federation_links() == []
        time.sleep(0.2)
        after = tracemalloc.get_traced_memory()[0] - base
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        db.close()
    assert peak > 4 * MIB  # it did hold what the peer did not read, for a while
    assert after < 2 * MIB
    assert db.get_delta_by_id("i" * 4000) is not None


def _attack(url: str) -> socket.socket:
    """Finding 2's client: hello, then the same delta 6,000 times without reading (blocking;
    returns once the server stopped reading it or closed it)."""
    sock, _, _ = client_upgrade(url, 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hello = {
        "type": "hello",
        "timestamp": T0,
        "systemId": "attacker",
        "protocol": "rhizomedb-federation-v1",
        "config": {"mode": "bidirectional", "initialSync": "none"},
    }
    sock.sendall(client_frame(json.dumps(hello).encode()))
    frame = client_frame(
        json.dumps({"type": "delta", "timestamp": T0, "delta": delta_dict("i" * 4000)}).encode()
    )
    sock.settimeout(10)
    with contextlib.suppress(OSError):
        for _ in range(6000):
            sock.sendall(frame)
    return sock


@deadline(40)
async def test_finding_2_over_sockets_async_memory_is_released_without_the_gc() -> None:
    """The same on the async adapter (asyncio and trio), whose cancelled tasks leave reference
    cycles behind: the buffers are not in them."""
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        async with instance(system_id="victim") as db:
            db.node.max_connection_memory = 4 * MIB
            errors: list[str] = []
            db.on_federation_event(
                lambda e: errors.append(e.code or "") if e.type == "link:error" else None
            )
            url = await db.enable_server(port=0)
            base = tracemalloc.get_traced_memory()[0]
            sock = await anyio.to_thread.run_sync(_attack, url)
            await wait_until(lambda: ErrorCode.FLOW_CONTROL in errors, 20)
            sock.close()
            await wait_until(lambda: db.get_federation_links() == [], 20)
            await anyio.sleep(0.2)
            after = tracemalloc.get_traced_memory()[0] - base
            peak = tracemalloc.get_traced_memory()[1] - base
            assert db.get_delta_by_id("i" * 4000) is not None
    finally:
        tracemalloc.stop()
        gc.enable()
    assert peak > 4 * MIB
    assert after < 2 * MIB
