"""The baseline processes: raw framing of the same bytes, no WebSocket or JSON library work.

    python -m bench._raw server --mode ack|sync --n N [--timeout S]
    python -m bench._raw client URL --n N [--timeout S]

``server`` prints ``listening on ws://127.0.0.1:PORT/federation``, accepts one connection,
answers the upgrade by hand and splits the client's frames by their headers. Mode ``ack``
answers the first frame (the hello) with a pre-built hello_ack frame and every later one with a
pre-built delta_ack frame; mode ``sync`` answers the text frame holding ``sync_request`` with the
pre-framed stream of sync_start, sync_batch (100 deltas each) and sync_complete. When the client
closes, it prints ``result {"elapsed": s, "wire": bytes}`` (elapsed: from sync_request received
to the client's close) and stays alive until killed, so its peak RSS can be read.

``client`` is the raw sync reader of :func:`bench.gen.sync_read`; it prints ``result {...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description="raw baseline processes")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("server")
    p.add_argument("--mode", choices=["ack", "sync"], required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("client")
    p.add_argument("url")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.role == "server":
        serve(args.mode, args.n, args.timeout)
    else:
        measure = sync_read(args.url, args.n, args.timeout)
        print("result " + json.dumps(dataclasses.asdict(measure)), flush=True)


if __name__ == "__main__":
    main()
