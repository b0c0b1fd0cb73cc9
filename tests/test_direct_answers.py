"""A connection's reader writes the answers its own input made (the acks) while the writer is
idle, only what the kernel takes at once; the rest is the writer's, written first. Over real
sockets, with a peer that reads nothing until it has sent everything (more acks than the
kernel buffers hold, so the server's writes are cut short or wait): every delta is
acknowledged once, in order, on threads, asyncio and trio."""

from __future__ import annotations

import re

import anyio

from bench.wire import client_frame, client_upgrade, delta_message, hello
from rhizome_adapters.threaded import FederatedRhizomeDB
from tests.aio_support import deadline, instance

#: deltas sent before reading: their acks (~5 MB) exceed the socket buffers of loopback
N = 60_000
ACKED = re.compile(rb'"delta_ack","timestamp":\d+,"deltaId":"bench-(\d+)"')


def _send_all_then_read(url: str) -> list[int]:
    """hello, N deltas written without reading, then every answer read: the numbers of the
    acknowledged deltas, in the order they came."""
    sock, head, _ = client_upgrade(url, 20)
    with sock:
        sock.sendall(client_frame(hello("none")))
        sock.sendall(b"".join(client_frame(delta_message(i)) for i in range(N)))
        received, done, acked = bytearray(head), 0, []
        while len(acked) < N:
            data = sock.recv(1 << 16)
            assert data, "closed before every delta was acknowledged"
            received += data
            for match in ACKED.finditer(received, done):
                acked.append(int(match[1]))
                done = match.end()
        assert b"hello_ack" in received
        return acked


def test_threads_ack_every_delta_once_in_order_when_the_peer_reads_late() -> None:
    with FederatedRhizomeDB(system_id="server") as db:
        url = db.enable_server(host="127.0.0.1", port=0)
        assert _send_all_then_read(url) == list(range(N))
        assert len(db.store) == N


@deadline(60)
async def test_async_acks_every_delta_once_in_order_when_the_peer_reads_late() -> None:
    async with instance(system_id="server") as db:
        url = await db.enable_server(host="127.0.0.1", port=0)
        acked = await anyio.to_thread.run_sync(_send_all_then_read, url)
        assert acked == list(range(N))
        assert len(db.store) == N
