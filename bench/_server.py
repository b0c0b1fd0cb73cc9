"""Our side as a process: ``FederatedRhizomeDB`` on asyncio, trio or threads.

    python -m bench._server serve --runtime R --store memory|sqlite [--db FILE] [--preload N]
    python -m bench._server push URL --runtime R --n N [--timeout S]

``serve`` (preloading N deltas into the store first, if asked) listens on a free port of
127.0.0.1, prints ``listening on ws://...`` and serves until killed. ``push`` connects a memory
instance to URL (mode push, no initial sync), persists N deltas that stream to the server over
the link (``persist_deltas`` in chunks of 1,000), waits for a ``delta:sent`` event (the
server's ack) for each and prints
``result {"rate": deltas/s, "wire": bytes of the link}``, timed from the first persist to the
last ack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.wire import delta_objects
from rhizome_proto import FederationEvent, LinkConfig

CHUNK = 5_000
PUSH = LinkConfig(mode="push", initial_sync="none")


def open_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.store == "sqlite":
        return {"system_id": "bench-server", "storage": "sqlite", "path": args.db}
    return {"system_id": "bench-server", "storage": "memory"}


def preload(db: Any, n: int) -> None:
    for i in range(0, n, CHUNK):
        db.store.put_many(delta_objects(i, min(i + CHUNK, n)))


#: Deltas the pushing instance persists per call (one transaction each).
CHUNK = 1000


class Acks:
    """Counts ``delta:sent`` events; calls ``done`` at the N-th."""

    def __init__(self, n: int, done: Callable[[], None]) -> None:
        self.n, self.count, self.done = n, 0, done

    def __call__(self, event: FederationEvent) -> None:
        if event.type == "delta:sent":
            self.count += 1
            if self.count == self.n:
                self.done()
        elif event.type == "delta:rejected":
            print(f"rejected: {event.reason}", flush=True)


def report(start: float, n: int, link: Any) -> None:
    stats = link.stats
    wire = stats.bytes_sent + stats.bytes_received
    rate = n / (time.perf_counter() - start)
    print("result " + json.dumps({"rate": rate, "wire": wire}), flush=True)


async def serve_async(db_class: Any, args: argparse.Namespace, forever: Awaitable[Any]) -> None:
    async with db_class(**open_kwargs(args)) as db:
        preload(db, args.preload)
        url = await db.enable_server(host="127.0.0.1", port=0)
        print(f"listening on {url}", flush=True)
        await forever


async def push_async(
    db_class: Any,
    args: argparse.Namespace,
    event: Any,
    wait: Callable[[], Awaitable[Any]],
    tick: Callable[[], Awaitable[Any]],
) -> None:
    """Persist the deltas, a chunk per transaction, letting the link's writer run after each
    (``tick``)."""
    async with db_class(system_id="bench-client") as db:
        link = await db.connect_to_remote(args.url, PUSH)
        db.on_federation_event(Acks(args.n, event.set), ["delta:sent", "delta:rejected"])
        deltas = delta_objects(0, args.n)
        start = time.perf_counter()
        for i in range(0, len(deltas), CHUNK):
            await db.persist_deltas(deltas[i : i + CHUNK])
            await tick()
        await wait()
        report(start, args.n, link)


def run_asyncio(args: argparse.Namespace) -> None:
    from rhizome_adapters import FederatedRhizomeDB

    async def main() -> None:
        if args.role == "serve":
            await serve_async(FederatedRhizomeDB, args, asyncio.Event().wait())
        else:
            done = asyncio.Event()

            async def wait() -> None:
                await asyncio.wait_for(done.wait(), args.timeout)

            await push_async(FederatedRhizomeDB, args, done, wait, lambda: asyncio.sleep(0))

    asyncio.run(main())


def run_trio(args: argparse.Namespace) -> None:
    import trio

    from rhizome_adapters.trio_adapter import FederatedRhizomeDB

    async def main() -> None:
        if args.role == "serve":
            await serve_async(FederatedRhizomeDB, args, trio.sleep_forever())
        else:
            done = trio.Event()

            async def wait() -> None:
                with trio.fail_after(args.timeout):
                    await done.wait()

            await push_async(FederatedRhizomeDB, args, done, wait, trio.lowlevel.checkpoint)

    trio.run(main)


def run_threaded(args: argparse.Namespace) -> None:
    from rhizome_adapters.threaded import FederatedRhizomeDB

    if args.role == "serve":
        with FederatedRhizomeDB(**open_kwargs(args)) as db:
            preload(db, args.preload)
            url = db.enable_server(host="127.0.0.1", port=0)
            print(f"listening on {url}", flush=True)
            threading.Event().wait()
        return
    with FederatedRhizomeDB(system_id="bench-client") as client:
        link = client.connect_to_remote(args.url, PUSH, timeout=args.timeout)
        done = threading.Event()
        client.on_federation_event(Acks(args.n, done.set), ["delta:sent", "delta:rejected"])
        deltas = delta_objects(0, args.n)
        start = time.perf_counter()
        for i in range(0, len(deltas), CHUNK):
            client.persist_deltas(deltas[i : i + CHUNK])
        if not done.wait(args.timeout):
            raise TimeoutError(f"not every delta acknowledged within {args.timeout} s")
        report(start, args.n, link)


def main() -> None:
    parser = argparse.ArgumentParser(description="our side of a benchmark, as a process")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    p.add_argument("--db", help="the SQLite file (--store sqlite)")
    p.add_argument("--preload", type=int, default=0)
    p = sub.add_parser("push")
    p.add_argument("url")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    for p in sub.choices.values():
        p.add_argument("--runtime", choices=["asyncio", "trio", "threaded"], required=True)
    args = parser.parse_args()
    {"asyncio": run_asyncio, "trio": run_trio, "threaded": run_threaded}[args.runtime](args)


if __name__ == "__main__":
    main()
