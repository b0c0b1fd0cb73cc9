"""Initial sync over loopback, against a baseline measured in the same run.

    python bench/bench_sync.py [--deltas 10000] [--repeat 3]

* ours: a client ``FederatedRhizomeDB`` connects to a server ``FederatedRhizomeDB`` holding N
  deltas and runs a full initial sync (HTTP upgrade, hello, streamed batches, typed decoding,
  filter/trust checks, storing every delta), timed from connect to ``sync:completed``; with
  memory stores on both ends and with SQLite files on both ends.
* baseline: the ``websockets`` package sends the same ``sync_batch`` JSON frames from a server
  to a client that ``json.loads`` each one: transport and JSON only, nothing validated or stored.

The ratio ours/baseline is the figure to compare between runs (the machines are shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Literal

from bench_core import make_deltas
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from rhizome_adapters import FederatedRhizomeDB
from rhizome_proto import FederationEvent, LinkConfig, SyncBatch, encode


async def ours(
    n: int, batch_size: int, storage: Literal["memory", "sqlite"], folder: Path
) -> float:
    def path(name: str) -> str | None:
        return str(folder / name) if storage == "sqlite" else None

    async with FederatedRhizomeDB(
        system_id="bench-server", batch_size=batch_size, storage=storage, path=path("server.sqlite")
    ) as server:
        server.store.put_many(make_deltas(n))
        url = await server.enable_server(port=0)
        async with FederatedRhizomeDB(
            system_id="bench-client", storage=storage, path=path("client.sqlite")
        ) as client:
            done = asyncio.Event()

            def on_event(event: FederationEvent) -> None:
                if event.type == "sync:completed":
                    done.set()

            client.on_federation_event(on_event)
            start = time.perf_counter()
            await client.connect_to_remote(url, LinkConfig(initial_sync="full"))
            await asyncio.wait_for(done.wait(), 300)
            elapsed = time.perf_counter() - start
            assert len(client.store) == n, (len(client.store), n)
    for name in ("server.sqlite", "client.sqlite"):
        for suffix in ("", "-wal", "-shm"):
            (folder / (name + suffix)).unlink(missing_ok=True)
    return n / elapsed


async def baseline(n: int, batch_size: int) -> float:
    deltas = make_deltas(n)
    frames = [
        encode(
            SyncBatch(
                timestamp=1,
                deltas=tuple(deltas[i : i + batch_size]),
                batch_number=i // batch_size,
                is_last_batch=i + batch_size >= n,
            )
        )
        for i in range(0, n, batch_size)
    ]

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        for frame in frames:
            await ws.send(frame)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        start = time.perf_counter()
        async with connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=None) as ws:
            await ws.send("go")
            got = 0
            while got < n:
                got += len(json.loads(await ws.recv())["deltas"])
        elapsed = time.perf_counter() - start
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deltas", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, b = args.deltas, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = max([await baseline(n, b) for _ in range(args.repeat)])
        mem = max([await ours(n, b, "memory", folder) for _ in range(args.repeat)])
        lite = max([await ours(n, b, "sqlite", folder) for _ in range(args.repeat)])
    print(f"initial sync of {n} deltas, batches of {b}, best of {args.repeat}:")
    print(f"  baseline websockets + json.loads: {base:,.0f} deltas/s")
    print(f"  ours, memory stores:             {mem:,.0f} deltas/s  ratio {mem / base:.2f}")
    print(f"  ours, SQLite files:              {lite:,.0f} deltas/s  ratio {lite / base:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
