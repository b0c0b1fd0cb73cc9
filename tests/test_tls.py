"""TLS (``wss://``): the async adapter (on asyncio and on trio) and the ``rhizome`` command over
real sockets on 127.0.0.1, with a test CA and certificates made in memory by ``trustme``."""

from __future__ import annotations

import logging
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import trustme

from rhizome_adapters.aio import _parse_url
from rhizome_adapters.anyio_adapter import FederatedRhizomeDB
from rhizome_proto import Delta, FederationEvent, LinkConfig, ReconnectPolicy
from tests.adapter_support import ids
from tests.aio_support import deadline, instance, wait_until

ONE_RETRY = LinkConfig(
    reconnect=ReconnectPolicy(max_attempts=1, initial_delay=0.02, max_delay=0.05)
)

CLI = [sys.executable, "-m", "rhizome_adapters.cli"]
TIMEOUT = 30.0  # seconds, for any single command
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


async def put(db: FederatedRhizomeDB, author: str, n: int) -> list[Delta]:
    deltas = [db.create_delta(author, [{"role": "n", "target": i}]) for i in range(n)]
    for delta in deltas:
        assert await db.persist_delta(delta)
    return deltas


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing at ERROR or above: no traceback from a background task or the event loop."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# ---------------------------------------------------------------- the async adapter


@deadline()
async def test_sync_and_live_deltas_both_ways_over_wss(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        instance(system_id="server") as server,
        instance(system_id="client") as client,
    ):
        url = await server.enable_server(port=0, ssl=server_tls)
        assert url.startswith("wss://127.0.0.1:") and url.endswith("/federation")
        assert server.server_url == url
        old = await put(server, "s", 3)
        link = await client.connect_to_remote(url, LinkConfig(mode="bidirectional"), ssl=client_tls)
        assert link.status == "connected" and link.remote_system_id == "server"
        await wait_until(lambda: ids(client) >= {d.id for d in old})
        from_client = await put(client, "c", 2)
        from_server = await put(server, "s2", 2)
        await wait_until(lambda: ids(server) >= {d.id for d in from_client})
        await wait_until(lambda: ids(client) >= {d.id for d in from_server})
        assert link.stats.bytes_sent > 0 and link.stats.bytes_received > 0
        await link.disconnect()
        assert link.status == "disconnected"
        await wait_until(lambda: not server.get_federation_links())
    no_errors_logged(caplog)


@deadline()
async def test_untrusted_certificate_is_a_connection_error(
    server_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)  # trusts some other CA only
    async with (
        instance(system_id="server") as server,
        instance(system_id="client") as client,
    ):
        url = await server.enable_server(port=0, ssl=server_tls)
        errors: list[FederationEvent] = []
        client.on_federation_event(lambda e: errors.append(e) if e.type == "link:error" else None)
        for context in (None, other):  # the system's trust store; a context without our CA
            errors.clear()
            with pytest.raises(ConnectionError, match="certificate verify failed") as info:
                await client.connect_to_remote(url, ONE_RETRY, ssl=context)
            assert "after 2 failed attempt(s)" in str(info.value)
            assert len(errors) == 3 and all("CERTIFICATE_VERIFY_FAILED" in e.reason for e in errors)
            assert client.get_federation_links() == []
        assert server.get_federation_links() == []
    no_errors_logged(caplog)


@deadline()
async def test_certificate_must_name_the_url_host(
    ca: trustme.CA, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("example.test").configure_cert(elsewhere)
    async with (
        instance(system_id="server") as server,
        instance(system_id="client") as client,
    ):
        url = await server.enable_server(port=0, ssl=elsewhere)
        with pytest.raises(ConnectionError, match=r"certificate verify failed.*mismatch"):
            await client.connect_to_remote(url, ONE_RETRY, ssl=client_tls)
    no_errors_logged(caplog)


@deadline()
async def test_plain_client_to_tls_server_fails_cleanly(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        instance(system_id="server") as server,
        instance(system_id="client") as client,
    ):
        url = await server.enable_server(port=0, ssl=server_tls)
        with pytest.raises(ConnectionError, match="gave up"):
            await client.connect_to_remote(url.replace("wss://", "ws://", 1), ONE_RETRY)
        assert client.get_federation_links() == []
        link = await client.connect_to_remote(url, ssl=client_tls)  # the server still serves
        assert link.status == "connected"
    no_errors_logged(caplog)


@deadline()
async def test_tls_client_to_plain_server_fails_cleanly(
    client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        instance(system_id="server") as server,
        instance(system_id="client") as client,
    ):
        url = await server.enable_server(port=0)
        with pytest.raises(ConnectionError, match="SSL"):
            await client.connect_to_remote(
                url.replace("ws://", "wss://", 1), ONE_RETRY, ssl=client_tls
            )
    no_errors_logged(caplog)


@deadline()
async def test_ssl_context_needs_a_wss_url(client_tls: ssl.SSLContext) -> None:
    async with instance() as db:
        with pytest.raises(ValueError, match="needs a wss:// URL"):
            await db.connect_to_remote("ws://127.0.0.1:1/federation", ssl=client_tls)
        assert db.get_federation_links() == []


def test_default_ports() -> None:
    assert _parse_url("wss://example.org/federation") == ("example.org", 443, "/federation", True)
    assert _parse_url("ws://example.org/federation") == ("example.org", 80, "/federation", False)
    assert _parse_url("wss://[::1]:9000/f?x=1") == ("::1", 9000, "/f?x=1", True)
    with pytest.raises(ValueError, match="wss://"):
        _parse_url("https://example.org/federation")


# ---------------------------------------------------------------- the rhizome command


@pytest.fixture(scope="module")
def pem_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ca``, ``cert`` (chain) and ``key``: PEM files of the test CA and a 127.0.0.1 cert."""
    folder = tmp_path_factory.mktemp("pem")
    leaf = ca.issue_cert("127.0.0.1")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    return files


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def fails(cwd: Path, *args: str) -> str:
    """Run a command that must fail with one line on stderr; that line."""
    proc = run(cwd, *args)
    assert proc.returncode != 0, (args, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rhizome: error: "), lines[0]
    return lines[0]


class Server:
    """``rhizome serve ...`` in the background: its stdout line by line, stderr in a file."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.stderr_path = cwd / "server.stderr"
        with open(self.stderr_path, "w") as err:
            self.popen = subprocess.Popen(
                [*CLI, "serve", *args],
                cwd=cwd,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.popen.stdout is not None
        threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str) -> str:
        while True:
            line = self._lines.get(timeout=TIMEOUT)
            assert line is not None, f"server ended: {self.stderr}"
            if line.startswith(prefix):
                return line

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        self.popen.send_signal(signal.SIGINT)
        code = self.popen.wait(timeout=TIMEOUT)
        assert "Traceback" not in self.stderr, self.stderr
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=TIMEOUT)
        assert self.popen.stdout is not None
        self.popen.stdout.close()


@pytest.fixture
def tls_server(tmp_path: Path, pem_files: dict[str, Path]) -> Iterator[tuple[Server, str]]:
    """``rhizome serve --tls-cert --tls-key --port 0``: the process and its ``wss://`` URL."""
    tls = ("--tls-cert", str(pem_files["cert"]), "--tls-key", str(pem_files["key"]))
    server = Server(tmp_path, "--port", "0", "--memory", "--system-id", "tls-server", *tls)
    try:
        url = server.expect("listening on ").removeprefix("listening on ")
        assert url.startswith("wss://127.0.0.1:") and url.endswith("/federation"), url
        yield server, url
    finally:
        server.kill()


def test_cli_serve_put_and_connect_over_wss(
    tmp_path: Path, pem_files: dict[str, Path], tls_server: tuple[Server, str]
) -> None:
    server, url = tls_server
    ca = str(pem_files["ca"])
    put = run(tmp_path, "put", "n:=1", "--author", "alice", "--to", url, "--tls-ca", ca)
    assert put.returncode == 0, put.stderr
    delta_id = put.stdout.strip()
    proc = run(tmp_path, "connect", url, "--tls-ca", ca, "--once", "--db", "client.db")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "synced 1 deltas from tls-server"
    shown = run(tmp_path, "ls", "--db", "client.db", "--show", delta_id)
    assert shown.returncode == 0 and '"alice"' in shown.stdout
    assert server.stop() == 0


def test_cli_untrusted_certificate(tmp_path: Path, tls_server: tuple[Server, str]) -> None:
    server, url = tls_server
    line = fails(tmp_path, "connect", url, "--once", "--memory", "--max-attempts", "1")
    assert f"cannot connect to {url}" in line and "certificate verify failed" in line
    line = fails(tmp_path, "put", "n:=1", "--author", "alice", "--to", url)
    assert "certificate verify failed" in line
    assert server.stop() == 0


def test_cli_tls_argument_errors(tmp_path: Path, pem_files: dict[str, Path]) -> None:
    cert, key, ca = (str(pem_files[name]) for name in ("cert", "key", "ca"))
    missing = str(tmp_path / "missing.pem")
    serve = ("serve", "--port", "0")  # no --memory: the files are checked before the database
    line = fails(tmp_path, *serve, "--tls-cert", missing, "--tls-key", key)
    assert "cannot load the TLS certificate" in line and "No such file" in line
    line = fails(tmp_path, *serve, "--tls-cert", ca, "--tls-key", ca)  # no key in it
    assert "cannot load the TLS certificate" in line
    assert "give both or neither" in fails(tmp_path, *serve, "--tls-cert", cert)
    assert "give both or neither" in fails(tmp_path, *serve, "--tls-key", key)
    wss = "wss://127.0.0.1:1/federation"
    line = fails(tmp_path, "connect", wss, "--once", "--memory", "--tls-ca", missing)
    assert "cannot load the TLS CA file" in line
    line = fails(tmp_path, "connect", wss, "--once", "--memory", "--tls-ca", key)  # not a cert
    assert "cannot load the TLS CA file" in line
    ws = "ws://127.0.0.1:1/federation"
    assert "needs a wss:// URL" in fails(tmp_path, "connect", ws, "--memory", "--tls-ca", ca)
    assert "needs a wss:// URL" in fails(
        tmp_path, "put", "n=1", "--author", "a", "--to", ws, "--tls-ca", ca
    )
    assert "--to" in fails(tmp_path, "put", "n=1", "--author", "a", "--memory", "--tls-ca", ca)
    assert not (tmp_path / "rhizome.sqlite").exists()
