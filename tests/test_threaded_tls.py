"""TLS (``wss://``) on the threaded adapter over real sockets on 127.0.0.1, with a test CA made
in memory by ``trustme``: threads to threads (an initial sync large enough to stream while
the other side writes too), certificate checks, plain and TLS mixed up, and threads with the
anyio adapter (asyncio and trio) both ways, and admission still in force over TLS."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator

import anyio
import anyio.to_thread
import pytest
import trustme

from rhizome_adapters import threaded
from rhizome_proto import LinkConfig, ReconnectPolicy
from rhizome_proto._admission import AdmissionLimits
from tests.adapter_support import ids
from tests.aio_support import deadline, instance, wait_until

ONE_RETRY = LinkConfig(
    reconnect=ReconnectPolicy(max_attempts=1, initial_delay=0.02, max_delay=0.05)
)


@pytest.fixture
def pair() -> Iterator[tuple[threaded.FederatedRhizomeDB, threaded.FederatedRhizomeDB]]:
    with (
        threaded.FederatedRhizomeDB(system_id="server") as server,
        threaded.FederatedRhizomeDB(system_id="client") as client,
    ):
        yield server, client


def put(db: threaded.FederatedRhizomeDB, author: str, n: int) -> set[str]:
    deltas = [db.create_delta(author, [{"role": "n", "target": i}]) for i in range(n)]
    db.persist_deltas(deltas)
    return {d.id for d in deltas}


def wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_sync_and_live_deltas_both_ways_over_wss(
    pair: tuple[threaded.FederatedRhizomeDB, threaded.FederatedRhizomeDB],
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, client = pair
    url = server.enable_server(port=0, ssl=server_tls)
    assert url.startswith("wss://127.0.0.1:") and server.server_url == url
    old_server, old_client = put(server, "s", 2000), put(client, "c", 2000)  # both stream
    link = client.connect_to_remote(url, ssl=client_tls, timeout=10)
    assert link.status == "connected" and link.remote_system_id == "server"
    wait(lambda: ids(client) >= old_server and ids(server) >= old_client)
    live_server, live_client = put(server, "s2", 3), put(client, "c2", 3)
    wait(lambda: ids(client) >= live_server and ids(server) >= live_client)
    link.disconnect()
    assert link.status == "disconnected"
    wait(lambda: not server.get_federation_links())
    no_errors_logged(caplog)


def test_certificate_checks(
    pair: tuple[threaded.FederatedRhizomeDB, threaded.FederatedRhizomeDB],
    ca: trustme.CA,
    server_tls: ssl.SSLContext,
    client_tls: ssl.SSLContext,
) -> None:
    server, client = pair
    url = server.enable_server(port=0, ssl=server_tls)
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    for context in (None, other):  # the system's trust store; a context without our CA
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            client.connect_to_remote(url, ONE_RETRY, ssl=context, timeout=10)
    elsewhere = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("example.test").configure_cert(elsewhere)
    with threaded.FederatedRhizomeDB(system_id="elsewhere") as misnamed:
        wrong = misnamed.enable_server(port=0, ssl=elsewhere)
        with pytest.raises(ConnectionError, match=r"certificate verify failed.*mismatch"):
            client.connect_to_remote(wrong, ONE_RETRY, ssl=client_tls, timeout=10)
    with pytest.raises(ValueError, match="needs a wss:// URL"):
        client.connect_to_remote(url.replace("wss:", "ws:"), ssl=client_tls)
    with pytest.raises(ConnectionError, match="gave up"):  # plain to a TLS server
        client.connect_to_remote(url.replace("wss:", "ws:"), ONE_RETRY, timeout=10)
    assert client.get_federation_links() == []
    assert client.connect_to_remote(url, ssl=client_tls, timeout=10).status == "connected"


def test_a_pending_tls_handshake_has_the_pending_deadline(server_tls: ssl.SSLContext) -> None:
    with threaded.FederatedRhizomeDB(system_id="server") as server:
        limits = AdmissionLimits(pending_timeout=0.3)
        url = server.enable_server(port=0, ssl=server_tls, limits=limits)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port)) as idle:  # no ClientHello
            idle.settimeout(5)
            assert idle.recv(100) == b""
        wait(lambda: server.admission.timed_out == 1 and server.admission.pending == 0)


def test_a_request_in_the_same_read_as_the_handshake_s_last_record(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    """TLS 1.3 lets a client send its request right behind its ``Finished``: the server reads
    both at once, and must find the request already decrypted-ready in its BIO."""
    with threaded.FederatedRhizomeDB(system_id="server") as server:
        url = server.enable_server(
            port=0, ssl=server_tls, limits=AdmissionLimits(pending_timeout=1)
        )
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    incoming.write(sock.recv(65536))
            tls.write(
                b"GET /federation HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.sendall(outgoing.read())  # the client's Finished and the request, at once
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                assert data, f"closed by the server after {answer!r}"
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):
                    answer += tls.read(65536)
        assert answer.startswith(b"HTTP/1.1 101 ")


@deadline(30)
async def test_threads_and_anyio_over_wss_both_ways(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    with (
        threaded.FederatedRhizomeDB(system_id="threads") as threads,
        threaded.FederatedRhizomeDB(system_id="threads-client") as threads_client,
    ):
        async with instance(system_id="async") as aio:
            here = put(threads, "t", 300)
            for i in range(300):
                await aio.persist_delta(aio.create_delta("a", [{"role": "n", "target": i}]))
            there = ids(aio)
            threads_url = await anyio.to_thread.run_sync(
                lambda: threads.enable_server(port=0, ssl=server_tls)
            )
            await aio.connect_to_remote(threads_url, ssl=client_tls)
            await wait_until(lambda: ids(aio) >= here and ids(threads) >= there, 20)

            aio_url = await aio.enable_server(port=0, ssl=server_tls)
            await anyio.to_thread.run_sync(
                lambda: threads_client.connect_to_remote(aio_url, ssl=client_tls, timeout=10)
            )
            await wait_until(lambda: ids(threads_client) >= here | there, 20)
            await anyio.to_thread.run_sync(threads_client.close)
            await anyio.to_thread.run_sync(threads.close)
