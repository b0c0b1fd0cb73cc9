"""The ``rhizome`` command end to end: every command runs as a subprocess in ``tmp_path``.

Each subprocess has an absolute timeout, every server and client started here is killed in the
``spawn`` fixture's ``finally``, and no test may leave a traceback on stderr.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from rhizome_adapters import cli
from tests.adapter_support import reserved_port

CLI = [sys.executable, "-m", "rhizome_adapters.cli"]
TIMEOUT = 30.0  # seconds, for any single command
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
MOVIE = 'movie:={"id":"m1","context":"reviews"}'


def run(cwd: Path, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run one ``rhizome`` command to its end; no traceback allowed."""
    proc = subprocess.run(
        [*CLI, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ok(cwd: Path, *args: str) -> str:
    """Run a command that must succeed; its stdout."""
    proc = run(cwd, *args)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def fails(cwd: Path, *args: str, code: int | None = None) -> str:
    """Run a command that must fail with one line on stderr; that line."""
    proc = run(cwd, *args)
    assert proc.returncode != 0, (args, proc.stdout, proc.stderr)
    if code is not None:
        assert proc.returncode == code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rhizome: error: "), lines[0]
    return lines[0]


class Proc:
    """A long-running ``rhizome`` command: stdout read line by line, stderr kept in a file."""

    def __init__(self, cwd: Path, args: tuple[str, ...], name: str) -> None:
        self.args = args
        self.stderr_path = cwd / f"{name}.stderr"
        with open(self.stderr_path, "w") as err:
            self.popen = subprocess.Popen(
                [*CLI, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.popen.stdout is not None
        threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        """The next stdout line starting with ``prefix`` (earlier lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} from {self.args}: {self.stderr}") from None
            if line is None:
                raise AssertionError(f"{self.args} ended before {prefix!r}: {self.stderr}")
            if line.startswith(prefix):
                return line

    def wait_stderr(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert self.popen.poll() is None, f"{self.args} ended: {self.stderr}"
            assert time.monotonic() < deadline, f"no {text!r} from {self.args}: {self.stderr}"
            time.sleep(0.02)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = TIMEOUT) -> int:
        """Send ``sig``; the exit code (no traceback allowed)."""
        self.popen.send_signal(sig)
        code = self.popen.wait(timeout=timeout)
        assert "Traceback" not in self.stderr, self.stderr
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=TIMEOUT)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


Spawn = Callable[..., Proc]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start long-running commands in ``tmp_path``; all are killed at the end, whatever happens."""
    procs: list[Proc] = []

    def start(*args: str, name: str | None = None) -> Proc:
        proc = Proc(tmp_path, args, name or f"proc{len(procs)}")
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()


def serve(spawn: Spawn, *args: str) -> tuple[Proc, str]:
    """``rhizome serve --port 0 ...``: the process and its URL (with the real port)."""
    server = spawn("serve", "--port", "0", *args, name="server")
    line = server.expect("listening on ")
    url = line.removeprefix("listening on ")
    assert url.startswith("ws://127.0.0.1:") and url.endswith("/federation"), line
    assert int(url.split(":")[2].split("/")[0]) > 0
    return server, url


def synced(cwd: Path, url: str, *args: str) -> tuple[int, str]:
    """``connect URL --once``: how many deltas it synced and from which system id."""
    out = ok(cwd, "connect", url, "--once", *args).strip().splitlines()[-1]
    words = out.split()
    assert words[0] == "synced" and words[2:4] == ["deltas", "from"], out
    return int(words[1]), words[4]


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return result
    finally:
        conn.close()


# ------------------------------------------------------------------------- the entry point


def test_console_script_entry_point() -> None:
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="rhizome")
    assert entry.value == "rhizome_adapters.cli:main"
    assert entry.load() is cli.main


def test_help(tmp_path: Path) -> None:
    out = ok(tmp_path, "--help")
    for command in ("serve", "connect", "put", "ls", "demo"):
        assert command in out


# ------------------------------------------------------------------------- put and ls


def test_put_then_ls_show(tmp_path: Path) -> None:
    out = ok(tmp_path, "put", "role=text", "rating:=5", MOVIE, "--author", "alice", "--db", "a.db")
    delta_id = out.strip()
    assert delta_id and "\n" not in delta_id
    shown = json.loads(ok(tmp_path, "ls", "--db", "a.db", "--show", delta_id))
    assert shown["id"] == delta_id
    assert shown["author"] == "alice"
    assert shown["pointers"] == [
        {"role": "role", "target": "text"},
        {"role": "rating", "target": 5},
        {"role": "movie", "target": {"id": "m1", "context": "reviews"}},
    ]
    listed = ok(tmp_path, "ls", "--db", "a.db")
    assert delta_id in listed and "alice@" in listed and "movie=@m1#reviews" in listed
    assert ok(tmp_path, "ls", "--db", "a.db", "--count").strip() == "1"
    line = fails(tmp_path, "ls", "--db", "a.db", "--show", "nope")
    assert "nope" in line


def test_put_defaults_to_rhizome_sqlite_and_keeps_system_id(tmp_path: Path) -> None:
    ok(tmp_path, "put", "a=1", "--author", "alice")
    ok(tmp_path, "put", "a=2", "--author", "alice")
    assert (tmp_path / "rhizome.sqlite").exists()
    rows = [json.loads(x) for x in ok(tmp_path, "ls", "--json").splitlines()]
    assert len(rows) == 2 and rows[0]["system"] == rows[1]["system"]


@pytest.mark.slow
def test_ls_filters_and_json(tmp_path: Path) -> None:
    for author, system, ts in [
        ("alice", "s1", 1000),
        ("alice", "s2", 2000),
        ("bob", "s1", 3000),
        ("carol", "s2", 4000),
    ]:
        args = ["--author", author, "--system-id", system, "--timestamp", str(ts)]
        ok(tmp_path, "put", f"who={author}", *args, "--db", "f.db")

    def count(*args: str) -> int:
        return int(ok(tmp_path, "ls", "--db", "f.db", "--count", *args))

    assert count() == 4
    assert count("--author", "alice") == 2
    assert count("--author", "alice", "--author", "bob") == 3
    assert count("--system", "s2") == 2
    assert count("--since", "2500") == 2
    assert count("--author", "alice", "--system", "s2") == 1
    rows = [json.loads(line) for line in ok(tmp_path, "ls", "--db", "f.db", "--json").splitlines()]
    assert [r["author"] for r in rows] == ["alice", "alice", "bob", "carol"]
    assert all(set(r) == {"id", "timestamp", "author", "system", "pointers"} for r in rows)
    since = ok(tmp_path, "ls", "--db", "f.db", "--json", "--since", "3000", "--system", "s1")
    assert [json.loads(x)["timestamp"] for x in since.splitlines()] == [3000]
    assert len(ok(tmp_path, "ls", "--db", "f.db", "--author", "bob").splitlines()) == 1


def test_ls_missing_or_broken_db(tmp_path: Path) -> None:
    assert "missing.db" in fails(tmp_path, "ls", "--db", "missing.db")
    assert "rhizome.sqlite" in fails(tmp_path, "ls")
    (tmp_path / "junk.db").write_text("not a database\n")
    assert "junk.db" in fails(tmp_path, "ls", "--db", "junk.db")


@pytest.mark.parametrize(
    "pointer",
    ["noequals", "=x", ":=5", "a:=nope", "a:=null", "a:=[1]", 'a:={"context":"c"}', "a:=1e999"],
)
def test_put_bad_pointer(tmp_path: Path, pointer: str) -> None:
    line = fails(tmp_path, "put", pointer, "--author", "alice", "--db", "p.db")
    assert "pointer" in line
    assert (
        not (tmp_path / "p.db").exists() or ok(tmp_path, "ls", "--db", "p.db", "--count") == "0\n"
    )


def test_put_argument_errors(tmp_path: Path) -> None:
    assert run(tmp_path, "put", "a=1").returncode == 2  # --author missing
    assert run(tmp_path, "put", "--author", "x").returncode == 2  # no pointer
    assert "author" in fails(tmp_path, "put", "a=1", "--author", "", "--db", "p.db")
    assert "invalid URL" in fails(tmp_path, "put", "a=1", "--author", "x", "--to", "http://x/")


def test_demo(tmp_path: Path) -> None:
    out = ok(tmp_path, "demo")
    assert "converged" in out.splitlines()[-1]
    assert "NOT" not in out


# ------------------------------------------------------------------------- serve and connect


@pytest.mark.slow
def test_serve_port_0_default_db_system_id_kept(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(spawn)
    assert (tmp_path / "rhizome.sqlite").exists()
    delta_id = ok(tmp_path, "put", "role=text", MOVIE, "--author", "alice", "--to", url).strip()
    count, system_id = synced(tmp_path, url, "--memory")
    assert count == 1 and system_id.startswith("rhizome-")
    assert server.stop(signal.SIGINT) == 0
    assert integrity(tmp_path / "rhizome.sqlite") == "ok"
    assert delta_id in ok(tmp_path, "ls")

    server, url = serve(spawn)  # restarted: same file, same id, same deltas
    assert synced(tmp_path, url, "--memory") == (1, system_id)
    assert server.stop(signal.SIGTERM) == 0


def test_serve_path_without_its_slash_is_normalised(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(spawn, "--path", "federation", "--memory")
    assert url.split(":")[2].split("/", 1)[1] == "federation"  # ws://127.0.0.1:PORT/federation
    ok(tmp_path, "put", "a=1", "--author", "alice", "--to", url)
    assert synced(tmp_path, url, "--memory")[0] == 1
    assert server.stop() == 0
    for bad in ("/a b", "/x?y=1", "/é"):
        proc = run(tmp_path, "serve", "--path", bad)
        assert proc.returncode == 2 and "--path: not a URL path" in proc.stderr


@pytest.mark.slow
def test_serve_memory_and_system_id(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(spawn, "--memory", "--system-id", "hub-1")
    ok(tmp_path, "put", "a=1", "--author", "alice", "--to", url)
    assert synced(tmp_path, url, "--memory") == (1, "hub-1")
    assert server.stop() == 0
    assert not (tmp_path / "rhizome.sqlite").exists()


@pytest.mark.slow
def test_serve_trust_author(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(spawn, "--trust-author", "alice", "--db", "hub.db")
    line = fails(tmp_path, "put", "x=1", "--author", "mallory", "--to", url)
    assert "rejected" in line and "untrusted author: mallory" in line
    good = ok(tmp_path, "put", "x=2", "--author", "alice", "--to", url).strip()
    assert ok(tmp_path, "ls", "--db", "hub.db", "--count", "--author", "mallory") == "0\n"
    assert ok(tmp_path, "ls", "--db", "hub.db", "--json").splitlines() == [
        ok(tmp_path, "ls", "--db", "hub.db", "--json", "--id", good).strip()
    ]
    assert server.stop() == 0
    assert "untrusted author: mallory" in server.stderr  # logged as delta:rejected


@pytest.mark.slow
def test_serve_limits_for_untrusted_peers(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(
        spawn, "--memory", "--max-id-length", "40", "--rate-limit", "1000,5000",
        "--memory-budget", "64", "--max-connection-memory", "8",
    )  # fmt: skip
    ok(tmp_path, "put", "n:=1", "--author", "alice", "--to", url)
    line = fails(tmp_path, "put", "n:=1", "--author", "a" * 60, "--to", url)
    assert "rejected" in line and "author of 60 characters: longer than 40" in line, line
    assert server.stop() == 0
    for bad in ("0", "x", "5,0", "inf"):
        proc = run(tmp_path, "serve", "--rate-limit", bad)
        assert proc.returncode == 2 and "--rate-limit" in proc.stderr


@pytest.mark.slow
def test_keygen_and_signed_deltas_with_trust_key(tmp_path: Path, spawn: Spawn) -> None:
    public = ok(tmp_path, "keygen", "spoke1.pem").strip()
    assert len(public) == 43 and (tmp_path / "spoke1.pem").stat().st_mode & 0o777 == 0o600
    other = ok(tmp_path, "keygen", "other.pem").strip()
    assert other != public
    assert "exists" in fails(tmp_path, "keygen", "spoke1.pem")
    (tmp_path / "spoke1.pub").write_text(public + "\n")
    assert "no --trust-key for it" in fails(
        tmp_path, "serve", "--trust-key", f"spoke1={public}", "--trust-system", "spoke2"
    )
    assert "--trust-key spoke1: not an Ed25519 public key" in fails(
        tmp_path, "serve", "--trust-key", "spoke1=nonsense"
    )
    server, url = serve(spawn, "--db", "hub.db", "--trust-key", "spoke1=@spoke1.pub")
    put = ("put", "n:=1", "--author", "alice", "--to", url, "--system-id")
    good = ok(tmp_path, *put, "spoke1", "--signing-key", "spoke1.pem").strip()
    for args, reason in [
        (("spoke1",), "unsigned delta: system spoke1 requires a signature"),
        (("spoke1", "--signing-key", "other.pem"), "invalid signature"),
        (("mallory", "--signing-key", "spoke1.pem"), "untrusted system: mallory"),
    ]:
        line = fails(tmp_path, *put, *args)
        assert "rejected" in line and reason in line, line
    shown = json.loads(ok(tmp_path, "ls", "--db", "hub.db", "--json"))
    assert shown["id"] == good and shown["system"] == "spoke1" and len(shown["signature"]) == 86
    assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_clean_shutdown_with_a_client(
    tmp_path: Path, spawn: Spawn, sig: signal.Signals
) -> None:
    server, url = serve(spawn, "--db", "hub.db")
    for i in range(3):
        ok(tmp_path, "put", f"n:={i}", "--author", "alice", "--to", url)
    client = spawn("connect", url, "--memory", "--max-attempts", "1", name="client")
    client.wait_stderr("sync:completed")
    assert server.stop(sig) == 0
    assert server.stderr.count("\n") >= 1 and "shutting down" in server.stderr
    assert integrity(tmp_path / "hub.db") == "ok"
    assert ok(tmp_path, "ls", "--db", "hub.db", "--count") == "3\n"
    # the client sees the link end and, with one attempt allowed, says so in one line
    assert client.popen.wait(timeout=TIMEOUT) == 1
    assert "Traceback" not in client.stderr
    assert client.stderr.strip().splitlines()[-1].startswith("rhizome: error: ")


def test_serve_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        line = fails(tmp_path, "serve", "--port", str(port), "--memory")
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_serve_bad_port_and_db(tmp_path: Path) -> None:
    assert run(tmp_path, "serve", "--port", "70000").returncode == 2
    assert "nowhere" in fails(tmp_path, "serve", "--port", "0", "--db", "nowhere/x.db")


@pytest.mark.slow
def test_connect_once_progress_since_and_db(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(spawn, "--memory", "--system-id", "hub")
    for ts in (1000, 2000, 3000):
        ok(tmp_path, "put", f"t:={ts}", "--author", "a", "--timestamp", str(ts), "--to", url)
    proc = run(tmp_path, "connect", url, "--once", "--db", "c.db")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "synced 3 deltas from hub"
    bars = [line for line in proc.stderr.splitlines() if line.startswith("syncing [")]
    assert bars and bars[-1].endswith("3/3")
    assert ok(tmp_path, "ls", "--db", "c.db", "--count") == "3\n"
    from_2500 = ["--initial-sync", "from_timestamp", "--since", "2500"]
    assert synced(tmp_path, url, "--memory", *from_2500) == (1, "hub")
    assert synced(tmp_path, url, "--memory", "--since", "1500") == (2, "hub")
    line = fails(tmp_path, "connect", url, "--once", "--memory", "--initial-sync", "from_timestamp")
    assert "--since" in line
    assert server.stop() == 0


def test_connect_unreachable(tmp_path: Path) -> None:
    with reserved_port() as port:
        url = f"ws://127.0.0.1:{port}/federation"
        line = fails(tmp_path, "connect", url, "--once", "--memory", "--max-attempts", "1")
    assert f"cannot connect to {url}" in line


def test_connect_in_the_servers_own_folder_is_refused(tmp_path: Path, spawn: Spawn) -> None:
    """The same folder is the same ``rhizome.sqlite``, so the same system id: a link to itself,
    refused at once in one line, not retried (the default allows 5 attempts)."""
    server, url = serve(spawn)
    line = fails(tmp_path, "connect", url, "--once")
    assert f"cannot connect to {url}: the remote system id" in line, line
    assert "is our own" in line and "not retried" in line and "attempts" not in line, line
    assert server.popen.poll() is None
    assert server.stop() == 0
    assert server.stderr.count("link:disconnected") == 1  # one connection, refused
    assert f"{url} (" not in line and "synced" not in line


def test_connect_to_a_wrong_path_is_not_retried(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(spawn, "--memory")
    wrong = url.replace("/federation", "/elsewhere")
    line = fails(tmp_path, "connect", wrong, "--once", "--memory")
    assert f"cannot connect to {wrong}: " in line and "HTTP 404" in line, line
    assert "not retried" in line and "attempts" not in line, line
    assert server.stop() == 0


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/federation", "ws://127.0.0.1:notaport/x", "ws://[::1", "nothing"]
)
def test_connect_malformed_url(tmp_path: Path, url: str) -> None:
    assert "invalid URL" in fails(tmp_path, "connect", url, "--once", "--memory")


@pytest.mark.slow
def test_connect_stays_and_receives_live_deltas(tmp_path: Path, spawn: Spawn) -> None:
    server, url = serve(spawn, "--memory")
    client = spawn("connect", url, "--db", "client.db", name="client")
    client.wait_stderr("sync:completed")
    delta_id = ok(tmp_path, "put", "live=yes", "--author", "alice", "--to", url).strip()
    deadline = time.monotonic() + 10
    while run(tmp_path, "ls", "--db", "client.db", "--show", delta_id).returncode != 0:
        assert time.monotonic() < deadline, client.stderr
        time.sleep(0.05)
    assert client.popen.poll() is None
    assert client.stop(signal.SIGINT) == 0
    assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("extensions", [[], ["batch", "credit"]], ids=["v1", "batch"])
def test_every_acknowledged_delta_survives_sigkill_of_the_server(
    spawn: Spawn, tmp_path: Path, extensions: list[str]
) -> None:
    """Group commit keeps its promise: a client streams deltas into ``rhizome serve`` and the
    server is killed with SIGKILL mid-stream; every delta it acknowledged is in the file."""
    from websockets.sync.client import connect

    db = tmp_path / "server.sqlite"
    server, url = serve(spawn, "--db", str(db))
    acked: set[str] = set()
    sent: list[str] = []
    with connect(url, open_timeout=10, close_timeout=1) as ws:
        hello = {"type": "hello", "timestamp": 1, "systemId": "killer", "config": {}}
        hello |= {"protocol": "rhizomedb-federation-v1", "extensions": extensions}
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "hello_ack"
        batch = bool(extensions)

        def writer() -> None:
            with contextlib.suppress(Exception):
                for chunk in range(400):
                    ids = [f"k{chunk:03}-{i:02}" for i in range(50)]
                    deltas = [
                        {
                            "id": i,
                            "timestamp": 1 + chunk,
                            "author": "a",
                            "system": "killer",
                            "pointers": [{"role": "n", "target": chunk}],
                        }
                        for i in ids
                    ]
                    sent.extend(ids)
                    if batch:
                        ws.send(json.dumps({"type": "deltas", "timestamp": 1, "deltas": deltas}))
                    else:
                        for d in deltas:
                            ws.send(json.dumps({"type": "delta", "timestamp": 1, "delta": d}))

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        with contextlib.suppress(Exception):
            while len(acked) < 3_000:
                message = json.loads(ws.recv(timeout=10))
                if message["type"] == "delta_ack":
                    acked.add(message["deltaId"])
                elif message["type"] == "deltas_ack":
                    acked.update(sent[: message["upTo"]])
        server.popen.send_signal(signal.SIGKILL)
        server.popen.wait(timeout=TIMEOUT)
        with contextlib.suppress(Exception):  # acks already on the way count too
            while True:
                message = json.loads(ws.recv(timeout=1))
                if message["type"] == "delta_ack":
                    acked.add(message["deltaId"])
                elif message["type"] == "deltas_ack":
                    acked.update(sent[: message["upTo"]])
        thread.join(timeout=10)
    assert len(acked) >= 3_000
    conn = sqlite3.connect(db)
    stored = {row[0] for row in conn.execute("SELECT id FROM deltas")}
    conn.close()
    assert acked <= stored, sorted(acked - stored)[:5]
    assert len(stored) < len(sent)  # it was killed mid-stream
