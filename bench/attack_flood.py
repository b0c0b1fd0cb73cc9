"""An idle-connection flood against ``rhizome serve``, probed by real clients (finding 1 of #8).

Runs ``rhizome serve --memory --port 0`` in a subprocess, then from this process opens idle TCP
connections to it at ``--rate`` per second for ``--seconds`` (kept open, never sending a byte)
while ``--probes`` real clients (the threaded adapter, one attempt each, spread over the flood
after a one-second head start) each connect, say ``hello`` and wait for their initial sync to
complete within ``--probe-timeout`` seconds. Prints how many probes got through and the
server's resident memory (``/proc/PID/status``) before, at its peak and after the flood.

    python -m bench.attack_flood                       # 100/s for 10 s, 30 probes
    python -m bench.attack_flood --server-src /tmp/old  # the server from another source tree
    python -m bench.attack_flood -- --max-pending 16    # after --: more `rhizome serve` flags
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

from rhizome_adapters.threaded import FederatedRhizomeDB
from rhizome_proto import LinkConfig, ReconnectPolicy


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid``, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def flood(port: int, rate: float, seconds: float, socks: list[socket.socket]) -> None:
    """Open idle connections at ``rate`` per second for ``seconds``; keep them in ``socks``."""
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate) + 1
        while n < due:
            n += 1
            with contextlib.suppress(OSError):  # counted as not opened
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        time.sleep(max(0.0, start + n / rate - time.monotonic()))


def probe(url: str, timeout: float, results: list[bool]) -> None:
    """A real client: connect, ``hello``, initial sync completed within ``timeout``."""
    synced = threading.Event()
    once = LinkConfig(reconnect=ReconnectPolicy(enabled=False))
    with FederatedRhizomeDB(system_id=f"probe-{len(results)}-{os.getpid()}") as db:
        db.on_federation_event(lambda e: synced.set(), ("sync:completed",))
        try:
            db.connect_to_remote(url, once, timeout=timeout)
            results.append(synced.wait(timeout))
        except (ConnectionError, TimeoutError):
            results.append(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="idle connections per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the flood goes on")
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--probe-timeout", type=float, default=5.0)
    parser.add_argument("--server-src", help="run the server from this source tree instead")
    parser.add_argument("serve_args", nargs="*", help="more `rhizome serve` arguments (after --)")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.server_src:
        env["PYTHONPATH"] = args.server_src
    command = [sys.executable, "-m", "rhizome_adapters.cli", "serve", "--memory", "--port", "0"]
    server = subprocess.Popen(
        [*command, *args.serve_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=args.server_src or None,
    )
    socks: list[socket.socket] = []
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]
        port = urlsplit(url).port
        assert port is not None, url
        before = peak = rss_mb(server.pid)
        flooding = threading.Thread(target=flood, args=(port, args.rate, args.seconds, socks))
        flooding.start()
        results: list[bool] = []
        probes = []
        time.sleep(1.0)  # the flood is under way
        spacing = max(args.seconds - 1.0, 0.0) / max(args.probes, 1)
        for _ in range(args.probes):
            thread = threading.Thread(target=probe, args=(url, args.probe_timeout, results))
            thread.start()
            probes.append(thread)
            time.sleep(spacing)
            peak = max(peak, rss_mb(server.pid))
        for thread in probes:
            thread.join()
        flooding.join()
        peak = max(peak, rss_mb(server.pid))
        opened = len(socks)
        for sock in socks:
            sock.close()
        time.sleep(1.0)
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"flood: {opened} idle connections opened in {args.seconds:g} s "
        f"({args.rate:g}/s asked)\n"
        f"probes through: {sum(results)} / {args.probes}\n"
        f"server RSS: {before:.1f} MB before, {peak:.1f} MB peak, {after:.1f} MB after"
    )


if __name__ == "__main__":
    main()
