"""The load generator: raw, pre-framed, pre-masked client frames over a socket, answers counted
by pattern in the received bytes (never parsed message by message). Cheaper than any server it
drives, so the figures measure the server. Imports no WebSocket or federation library."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.wire import (
    CLOSE_CLIENT,
    Counter,
    ack_message,
    client_frame,
    client_upgrade,
    delta_message,
    hello,
    sync_request,
)

READ = 1 << 18
PROCESSED = re.compile(rb'"deltasProcessed":(\d+)[,}]')
RELAYED = b'"type":"delta",'  # a relayed delta message (not delta_ack, delta_nack, deltas)


@dataclass
class Measure:
    """One measurement: deltas/s, round trips (ms), peak RSS per process (MB), wire bytes."""

    rate: float | None = None
    p50: float | None = None
    p99: float | None = None
    rss: dict[str, float] = field(default_factory=dict)
    wire: int | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the timed span


class Link:
    """A raw client link: upgraded, ``hello`` sent and ``hello_ack`` received."""

    def __init__(
        self, url: str, initial_sync: str, timeout: float, mode: str = "bidirectional"
    ) -> None:
        self.sock, extra, self.wire = client_upgrade(url, timeout)
        self.last = b""
        answered = Counter(b'"hello_ack"')
        try:
            self.send(client_frame(hello(initial_sync, mode)))
            answered.feed(extra)
            while not answered.count:
                answered.feed(self.recv())
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)
        self.wire += len(data)

    def recv(self) -> bytes:
        try:
            data = self.sock.recv(READ)
        except TimeoutError:
            raise TimeoutError(f"no answer; last bytes received: {self.last[-300:]!r}") from None
        if not data:
            raise ConnectionError(f"closed by the server; last bytes: {self.last[-300:]!r}")
        self.wire += len(data)
        self.last = data
        return data

    def close(self) -> None:
        try:
            self.sock.sendall(CLOSE_CLIENT)
            self.wire += len(CLOSE_CLIENT)
        except OSError:
            pass
        self.sock.close()


def pipeline(link: Link, frames: memoryview, failed: list[BaseException]) -> threading.Thread:
    """Write ``frames`` on the link from a thread of its own, started here (an error goes to
    ``failed``), while the caller reads the answers."""

    def send() -> None:
        try:
            for i in range(0, len(frames), 1 << 16):
                link.sock.sendall(frames[i : i + (1 << 16)])
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def live(url: str, n: int, timeout: float) -> Measure:
    """N delta messages pipelined (a sender thread) while acks are counted: acked deltas/s
    from the first byte sent to the last ack received."""
    frames = memoryview(b"".join(client_frame(delta_message(i)) for i in range(n)))
    link = Link(url, "none", timeout)
    failed: list[BaseException] = []
    acks, nacks = Counter(b'"delta_ack"'), Counter(b'"delta_nack"')
    try:
        start = time.perf_counter()
        sender = pipeline(link, frames, failed)
        while acks.count < n:
            data = link.recv()
            acks.feed(data)
            if nacks.feed(data):
                raise RuntimeError(f"the server refused a delta: {data[-300:]!r}")
        elapsed = time.perf_counter() - start
        sender.join(timeout)
        if failed:
            raise failed[0]
        link.wire += len(frames)
        return Measure(rate=n / elapsed, wire=link.wire)
    finally:
        link.close()


def rtt(url: str, n: int, timeout: float, warmup: int = 20) -> Measure:
    """Sequential delta -> delta_ack round trips: p50 and p99 in ms (after ``warmup``)."""
    frames = [client_frame(delta_message(i)) for i in range(n + warmup)]
    link = Link(url, "none", timeout)
    acks = Counter(b'"delta_ack"')
    times: list[int] = []
    try:
        for i, data in enumerate(frames):
            start = time.perf_counter_ns()
            link.send(data)
            while acks.count <= i:
                acks.feed(link.recv())
            if i >= warmup:
                times.append(time.perf_counter_ns() - start)
        times.sort()
        p50, p99 = times[len(times) // 2], times[min(len(times) - 1, len(times) * 99 // 100)]
        return Measure(p50=p50 / 1e6, p99=p99 / 1e6, wire=link.wire)
    finally:
        link.close()


def sync_read(url: str, n: int, timeout: float) -> Measure:
    """hello (initialSync full), sync_request, read until sync_complete; deltas/s from the
    request sent to sync_complete received (its deltasProcessed must be ``n``)."""
    link = Link(url, "full", timeout)
    complete = Counter(b'"sync_complete"')
    window = b""
    try:
        start = time.perf_counter()
        link.send(client_frame(sync_request()))
        found = None
        while found is None:
            data = link.recv()
            window = (window + data[-4096:])[-4096:]
            if complete.feed(data):
                found = PROCESSED.search(window)
        elapsed = time.perf_counter() - start
        if int(found[1]) != n:
            raise RuntimeError(f"synced {int(found[1])} deltas, expected {n}")
        return Measure(rate=n / elapsed, wire=link.wire)
    finally:
        link.close()


def relay(
    url: str, n: int, receivers: int, timeout: float, server_cpu: Callable[[], float]
) -> Measure:
    """K ``receivers`` (mode pull: the server relays to them) connect, then a sender (mode
    push: nothing is relayed to it) pipelines N deltas; each receiver counts the relayed ones
    and acknowledges them in order. Deliveries/s (N * K) from the first byte sent until every
    receiver has N deltas and the sender N acks; ``cpu``: seconds of CPU in that span, of this
    process (``bench``) and of the server (``server_cpu()``, read at both ends)."""
    frames = memoryview(b"".join(client_frame(delta_message(i)) for i in range(n)))
    acks = memoryview(b"".join(client_frame(ack_message(i)) for i in range(n)))
    size = len(acks) // n  # every ack frame has the same length (ids of 8 digits)
    links: list[Link] = []
    failed: list[BaseException] = []
    ends: list[float] = []
    try:
        for _ in range(receivers):
            links.append(Link(url, "none", timeout, mode="pull"))
        sender = Link(url, "none", timeout, mode="push")
        links.append(sender)

        def receive(link: Link) -> None:
            relayed, acked = Counter(RELAYED), 0
            try:
                while acked < n:
                    count = min(relayed.feed(link.recv()), n)
                    if count > acked:
                        link.send(acks[acked * size : count * size])
                        acked = count
                ends.append(time.perf_counter())
            except BaseException as exc:
                failed.append(exc)

        threads = [threading.Thread(target=receive, args=(r,), daemon=True) for r in links[:-1]]
        for thread in threads:
            thread.start()
        acked, nacks = Counter(b'"delta_ack"'), Counter(b'"delta_nack"')
        cpu, server = time.process_time(), server_cpu()
        start = time.perf_counter()
        pipeline(sender, frames, failed)
        while acked.count < n and not failed:
            data = sender.recv()
            acked.feed(data)
            if nacks.feed(data):
                raise RuntimeError(f"the server refused a delta: {data[-300:]!r}")
        ends.append(time.perf_counter())
        for thread in threads:
            if not failed:
                thread.join(timeout)  # a receiver's every read has the timeout too
        if failed or len(ends) <= receivers:
            raise failed[0] if failed else TimeoutError("a receiver did not finish")
        cpu, server = time.process_time() - cpu, server_cpu() - server
        sender.wire += len(frames)
        rate = n * receivers / (max(ends) - start)
        wire = sum(link.wire for link in links)
        return Measure(rate=rate, wire=wire, cpu={"bench": cpu, "server": server})
    finally:
        for link in links:
            with contextlib.suppress(OSError):
                link.sock.shutdown(socket.SHUT_RD)  # wakes a receiver still reading
            link.close()
