"""The baseline processes: raw framing of the same bytes, no WebSocket or JSON library work.

    python -m bench._raw server --mode ack|sync|relay --n N [--timeout S]
    python -m bench._raw client URL --n N [--timeout S]

``server`` prints ``listening on ws://127.0.0.1:PORT/federation``, accepts one connection,
answers the upgrade by hand and splits the client's frames by their headers. Mode ``ack``
answers the first frame (the hello) with a pre-built hello_ack frame and every later one with a
pre-built delta_ack frame; mode ``sync`` answers the text frame holding ``sync_request`` with the
pre-framed stream of sync_start, sync_batch (100 deltas each) and sync_complete. When the client
closes, it prints ``result {"elapsed": s, "wire": bytes}`` (elapsed: from sync_request received
to the client's close) and stays alive until killed, so its peak RSS can be read.

Mode ``relay`` (:func:`relay`) accepts any number of connections instead and relays, as a hub
does: it forwards every text frame after the hello, unmasked and re-framed, to every other
upgraded connection and answers it with a pre-built delta_ack, except on connections whose
hello asks for mode ``pull`` (the receivers), whose frames (their acks) are read and dropped.
It prints nothing but its ``listening on`` line and serves until killed (or ``--timeout``
seconds without any input).

``client`` is the raw sync reader of :func:`bench.gen.sync_read`; it prints ``result {...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import selectors
import socket
import time
from dataclasses import dataclass, field

from bench.gen import sync_read
from bench.wire import (
    CLOSE_SERVER,
    FrameSplitter,
    ack_message,
    frame,
    hello_ack,
    server_upgrade,
    sync_stream,
    unmask,
)


def serve(mode: str, n: int, timeout: float) -> None:
    acks = [frame(ack_message(i)) for i in range(n)] if mode == "ack" else []
    stream = sync_stream(n) if mode == "sync" else b""
    greeting = frame(hello_ack())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(timeout)
    print(f"listening on ws://127.0.0.1:{listener.getsockname()[1]}/federation", flush=True)
    conn, _ = listener.accept()
    conn.settimeout(timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data, wire = server_upgrade(conn)
    splitter = FrameSplitter()
    seen = acked = 0
    start: float | None = None
    closed = False
    while not closed:
        out: list[bytes] = []
        for opcode, key, a, b in splitter.feed(data):
            if opcode == 8:
                closed = True
                out.append(CLOSE_SERVER)
                break
            if opcode != 1:  # pings and pongs
                continue
            seen += 1
            if seen == 1:
                out.append(greeting)
            elif mode == "ack":
                out.append(acks[acked % n])
                acked += 1
            elif start is None and b"sync_request" in unmask(splitter.last[a:b], key):
                start = time.perf_counter()
                out.append(stream)
        if out:
            reply = b"".join(out)
            conn.sendall(reply)
            wire += len(reply)
        if not closed:
            data = conn.recv(1 << 18)
            wire += len(data)
            closed = not data
    elapsed = time.perf_counter() - (start or 0.0)
    conn.close()
    print("result " + json.dumps({"elapsed": elapsed, "wire": wire}), flush=True)
    time.sleep(timeout)


@dataclass
class Peer:
    """One upgraded connection of the relay: its frames, what waits to be written to it."""

    sock: socket.socket
    splitter: FrameSplitter = field(default_factory=FrameSplitter)
    out: bytearray = field(default_factory=bytearray)
    hello: bool = False  # its hello was answered
    receiver: bool = False  # its hello asked for mode pull: what it sends is dropped
    acked: int = 0
    writing: bool = False  # registered for EVENT_WRITE too


def relay(n: int, timeout: float) -> None:
    """The raw relay hub (see the module's docstring): non-blocking sockets and a selector, a
    buffer of output per connection, so no slow reader blocks the others."""
    acks = [frame(ack_message(i)) for i in range(n)]
    greeting = frame(hello_ack())
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    peers: dict[socket.socket, Peer] = {}
    print(f"listening on ws://127.0.0.1:{listener.getsockname()[1]}/federation", flush=True)

    def want(peer: Peer) -> None:
        if peer.writing != bool(peer.out):
            peer.writing = bool(peer.out)
            write = selectors.EVENT_WRITE if peer.writing else 0
            selector.modify(peer.sock, selectors.EVENT_READ | write, peer)

    def drop(peer: Peer) -> None:
        selector.unregister(peer.sock)
        peer.sock.close()
        del peers[peer.sock]

    def received(peer: Peer, data: bytes) -> bool:
        """Relay and answer what ``peer`` sent; False when it closed."""
        for opcode, key, a, b in peer.splitter.feed(data):
            if opcode == 8:
                with contextlib.suppress(OSError):
                    peer.sock.send(CLOSE_SERVER)  # best effort, then closed
                return False
            if opcode != 1 or peer.receiver:  # pings, pongs; a receiver's acks
                continue
            payload = unmask(peer.splitter.last[a:b], key)
            if not peer.hello:
                peer.hello, peer.receiver = True, b'"mode":"pull"' in payload
                peer.out += greeting
                continue
            relayed = frame(payload)
            for other in peers.values():
                if other is not peer and other.hello:
                    other.out += relayed
            peer.out += acks[peer.acked % n]
            peer.acked += 1
        return True

    while True:
        events = selector.select(timeout)
        if not events:
            raise TimeoutError(f"no input for {timeout} s")
        for key, mask in events:
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conn.settimeout(timeout)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                data, _ = server_upgrade(conn)  # blocking: the client sends its GET at once
                conn.setblocking(False)
                peers[conn] = peer = Peer(conn)
                selector.register(conn, selectors.EVENT_READ, peer)
                if data and not received(peer, data):
                    drop(peer)
                continue
            peer = key.data
            if peer.sock not in peers:  # dropped earlier in this round
                continue
            if mask & selectors.EVENT_READ:
                try:
                    data = peer.sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data or not received(peer, data):
                    drop(peer)
        for peer in list(peers.values()):
            if peer.out:
                try:
                    sent = peer.sock.send(peer.out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    drop(peer)
                    continue
                del peer.out[:sent]
            want(peer)


def main() -> None:
    parser = argparse.ArgumentParser(description="raw baseline processes")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("server")
    p.add_argument("--mode", choices=["ack", "sync", "relay"], required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("client")
    p.add_argument("url")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.role == "server" and args.mode == "relay":
        relay(args.n, args.timeout)
    elif args.role == "server":
        serve(args.mode, args.n, args.timeout)
    else:
        measure = sync_read(args.url, args.n, args.timeout)
        print("result " + json.dumps(dataclasses.asdict(measure)), flush=True)


if __name__ == "__main__":
    main()
