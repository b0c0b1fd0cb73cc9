"""The runnable examples in ``examples/`` run as subprocesses (each under a timeout) and print
what they should. Each works in ``tmp_path``; a server started here is killed in ``finally``."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 30.0
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_example(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_hub_and_spoke(tmp_path: Path) -> None:
    proc = run_example(tmp_path, "hub-and-spoke/main.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("hub listening on ws://127.0.0.1:")
    for name in ("spoke-A", "spoke-B", "spoke-C"):
        assert f"[hub] spoke connected: {name}" in lines
    counts = [line.split() for line in lines if " holds " in line]
    assert [c[0] for c in counts] == ["hub-server", "spoke-A", "spoke-B", "spoke-C"]
    assert {c[2] for c in counts} == {"4"}
    assert lines[-1] == "converged"


def test_trust_policies(tmp_path: Path) -> None:
    proc = run_example(tmp_path, "trust-policies/main.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "alice@trusted-client-1: accepted" in out
    assert "mallory@untrusted-client-999: rejected: untrusted system: untrusted-client-999" in out
    assert "rejected_by_peer=1" in out
    assert "rejected  carol@trusted-server: untrusted author: carol" in out
    assert "rejected  bob@trusted-client-2: not verified" in out
    assert "rejected  alice@trusted-server: untrusted system: trusted-server" in out
    stats = [line.strip() for line in out.splitlines() if line.strip().startswith("stats:")]
    assert stats == [
        "stats: received=3 rejected=1",
        "stats: received=1 rejected=3",
        "stats: received=1 rejected=3",
    ]
    assert "UNEXPECTED" not in out
    assert out.splitlines()[-1] == "all policies behaved as expected"


@pytest.mark.slow  # the client retries for a few seconds
def test_simple_client_without_server(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "simple/client.py"), "--url", "ws://127.0.0.1:1/x"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "cannot connect" in proc.stderr and "start the server first" in proc.stderr


class Server:
    """``examples/simple/server.py`` in the background: stdout read line by line, by a thread,
    so that every wait has a timeout."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "simple/server.py"), *args],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str) -> str:
        """The next stdout line starting with ``prefix``."""
        while True:
            try:
                line = self._lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} within {TIMEOUT} s: {self.seen}") from None
            assert line is not None, f"the server ended before {prefix!r}: {self.seen}"
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def stop(self, sig: signal.Signals) -> int:
        self.popen.send_signal(sig)
        return self.popen.wait(timeout=TIMEOUT)

    def kill(self) -> str:
        """Kill it if still running; its stderr."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=TIMEOUT)
        stderr = self.popen.stderr.read() if self.popen.stderr else ""
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        return stderr


@pytest.mark.slow
def test_simple_server_and_client(tmp_path: Path) -> None:
    server = Server(tmp_path, "--port", "0", "--interval", "0.2")
    try:
        url = server.expect("listening on ").removeprefix("listening on ")
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/federation")
        assert not url.startswith("ws://127.0.0.1:0/")  # the real port
        server.expect("stock updated: 98")  # live updates exist before the client comes

        client = run_example(tmp_path, "simple/client.py", "--url", url)
        assert client.returncode == 0, client.stdout + client.stderr
        out = client.stdout
        assert "to server federation-server-001" in out
        assert "initial sync completed:" in out
        assert "link status: connected" in out
        assert "stats: sent=2 " in out  # both reviews acknowledged
        assert "server-admin@federation-server-001: product=@prod_1 name='Widget Pro'" in out
        assert "stock=" in out
        assert out.splitlines()[-1] == "disconnected"

        server.expect("-> client connected: federation-client-001")
        assert server.expect("   received delta").endswith("by alice from federation-client-001")
        assert server.expect("   received delta").endswith("by bob from federation-client-001")
        server.expect("<- client disconnected")
        assert server.stop(signal.SIGINT) == 0
        server.expect("server closed")
    finally:
        stderr = server.kill()
    assert "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_simple_server_stops_after_seconds_and_on_sigterm(tmp_path: Path) -> None:
    proc = run_example(tmp_path, "simple/server.py", "--port", "0", "--seconds", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("listening on ws://127.0.0.1:")
    assert proc.stdout.splitlines()[-1] == "server closed"

    server = Server(tmp_path, "--port", "0")
    try:
        server.expect("listening on ")
        assert server.stop(signal.SIGTERM) == 0
        server.expect("server closed")
    finally:
        stderr = server.kill()
    assert "Traceback" not in stderr, stderr
