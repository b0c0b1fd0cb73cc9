"""Per-link rate limits (issue #8, item 5, ``RATE_LIMITED``): a peer over its rate is told once
per excursion with a non-fatal error and not read for a while; other links are not slowed."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any

import anyio
import pytest

from bench.wire import client_frame, client_upgrade
from rhizome_adapters import threaded
from rhizome_proto import FederationProtocol, Role
from tests.aio_support import deadline, instance, wait_until
from tests.hostile_peers import T0, HostileServer, delta_dict


def errors(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "error"]


def test_told_once_per_excursion_and_slowed() -> None:
    conn = FederationProtocol(Role.SERVER, system_id="s", clock=lambda: T0, link_id="l")
    assert conn.read_delay(0) == 0  # no limit: never slowed
    conn.limit_rate(10, 20)
    server = HostileServer()
    server.node.rate_limit = (10, 20)
    peer = server.connect("p", "peer")
    server.read("p")
    ping = {"type": "ping", "timestamp": T0}
    server.send("p", *[ping] * 20)  # the hello and 20 pings: one over the burst
    assert peer.read_delay(0.0) == pytest.approx(0.1)
    [told] = errors(server.read("p"))
    assert told["code"] == "RATE_LIMITED" and not told.get("fatal")
    server.send("p", *[ping] * 10)
    assert peer.read_delay(0.05) == pytest.approx(1.05)
    assert errors(server.read("p")) == []  # the same excursion: told once
    assert peer.read_delay(1.1) == 0  # paid back
    server.send("p", *[ping] * 3)
    assert peer.read_delay(1.1) > 0
    assert [e["code"] for e in errors(server.read("p"))] == ["RATE_LIMITED"]  # a new excursion
    assert peer.is_open


def test_a_delta_batch_counts_each_delta() -> None:
    server = HostileServer(rate_limit=(100, 100))
    peer = server.connect("p", "peer", extensions=("batch",))
    server.read("p")
    deltas = [delta_dict(f"d{i}") for i in range(150)]
    server.send("p", {"type": "deltas", "timestamp": T0, "deltas": deltas})
    assert peer.read_delay(0) == pytest.approx(0.51)  # the hello and 150 deltas, 100 a second
    assert server.store.count() == 150  # what arrived is handled: only reading waits


def test_only_incoming_links_are_limited() -> None:
    server = HostileServer(rate_limit=(1, 1))
    client = FederationProtocol(Role.CLIENT, system_id="c", clock=lambda: T0)
    server.node.add_link("out", outgoing=True, remote_url="ws://x")
    server.node.attach("out", client)
    client.start(0)
    for _ in range(5):
        client.receive_message(json.dumps({"type": "ping", "timestamp": T0}))
    assert client.read_delay(0) == 0


# ---------------------------------------------------------------------- over real sockets

HELLO = {
    "type": "hello",
    "timestamp": T0,
    "systemId": "flooder",
    "protocol": "rhizomedb-federation-v1",
    "config": {"mode": "bidirectional", "initialSync": "none"},
}
FLOOD = 3000


class Flooder:
    """A raw client on threads: sends ``FLOOD`` deltas as fast as the server reads them and
    keeps what it receives."""

    def __init__(self, url: str) -> None:
        self.sock, self.received, _ = client_upgrade(url, 30)
        frames = [client_frame(json.dumps(HELLO).encode())]
        for i in range(FLOOD):
            message = {"type": "delta", "timestamp": T0, "delta": delta_dict(f"f{i}")}
            frames.append(client_frame(json.dumps(message).encode()))
        self._data = b"".join(frames)
        for target in (self._send, self._read):
            threading.Thread(target=target, daemon=True).start()

    def _send(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(self._data)

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
        except OSError:
            pass

    def told(self) -> bool:
        return b"RATE_LIMITED" in self.received

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@deadline(30)
async def test_a_flooding_link_does_not_starve_another() -> None:
    async with instance(system_id="server") as server, instance(system_id="good") as good:
        server.node.rate_limit = (100.0, 100.0)
        url = await server.enable_server(port=0)
        flooder = await anyio.to_thread.run_sync(Flooder, url)  # it blocks
        try:
            await wait_until(lambda: any(d.id.startswith("f") for d in server.scan_deltas()))
            await good.connect_to_remote(url)
            mine = [good.create_delta("me", [{"role": "n", "target": i}]) for i in range(5)]
            await good.persist_deltas(mine)
            ids = {d.id for d in mine}
            await wait_until(lambda: ids <= {d.id for d in server.scan_deltas()}, 10)
            flood = sum(1 for d in server.scan_deltas() if d.id.startswith("f"))
            assert flood < FLOOD  # the flood is still being held back
            await wait_until(flooder.told, 5)
        finally:
            flooder.close()
            await anyio.sleep(0)


def test_a_flooding_link_does_not_starve_another_threaded() -> None:
    with (
        threaded.FederatedRhizomeDB(system_id="server") as server,
        threaded.FederatedRhizomeDB(system_id="good") as good,
    ):
        server.node.rate_limit = (100.0, 100.0)
        url = server.enable_server(port=0)
        flooder = Flooder(url)
        try:
            end = time.monotonic() + 10
            while not any(d.id.startswith("f") for d in server.scan_deltas()):
                assert time.monotonic() < end
                time.sleep(0.01)
            good.connect_to_remote(url)
            mine = [good.create_delta("me", [{"role": "n", "target": i}]) for i in range(5)]
            good.persist_deltas(mine)
            ids = {d.id for d in mine}
            while not ids <= {d.id for d in server.scan_deltas()}:
                assert time.monotonic() < end
                time.sleep(0.01)
            assert sum(1 for d in server.scan_deltas() if d.id.startswith("f")) < FLOOD
            while not flooder.told():
                assert time.monotonic() < end
                time.sleep(0.01)
        finally:
            flooder.close()
