"""A federation server, as in the seed's ``examples/simple/server.ts``.

It accepts links from clients, stores what they send, broadcasts its own deltas (a product and
its stock, updated every few seconds) and logs every federation event. It runs until Ctrl+C or
SIGTERM, or for ``--seconds N``.

    python examples/simple/server.py --port 8080
    python examples/simple/client.py --url ws://127.0.0.1:8080/federation   # in another shell
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from rhizome_adapters import FederatedRhizomeDB
from rhizome_proto import FederationEvent, Pointer, Reference

PRODUCT = Reference(id="prod_1", context="products")


async def main(port: int, seconds: float | None, interval: float) -> None:
    async with FederatedRhizomeDB(system_id="federation-server-001") as server:

        def log_event(event: FederationEvent) -> None:
            link = server.get_federation_link(event.link_id)
            peer = link.remote_system_id if link else None
            if event.type == "link:connected":
                print(f"-> client connected: {peer} (link {event.link_id})")
            elif event.type == "link:disconnected":
                why = f" ({event.reason})" if event.reason else ""
                print(f"<- client disconnected: link {event.link_id}{why}")
            elif event.type == "delta:received" and event.delta:
                print(f"   received delta {event.delta.id} by {event.delta.author} from {peer}")
            elif event.type == "delta:sent":
                print(f"   delta {event.delta_id} acknowledged by {peer}")
            elif event.type in ("delta:rejected", "link:error"):
                print(f"   {event.type} on link {event.link_id}: {event.reason}")

        server.on_federation_event(log_event)

        # Ctrl+C or SIGTERM (or the time limit) ends the loop below and closes every link
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if seconds is not None:
            loop.call_later(seconds, stop.set)

        url = await server.enable_server(host="127.0.0.1", port=port, path="/federation")
        print(f"listening on {url}", flush=True)
        print(f"server id {server.system_id}; Ctrl+C to stop")

        # some initial data, synced to every client that connects
        await server.persist_delta(
            server.create_delta(
                "server-admin",
                [
                    Pointer(role="product", target=PRODUCT),
                    Pointer(role="name", target="Widget Pro"),
                    Pointer(role="price", target=99.99),
                ],
            )
        )
        print("created product Widget Pro")

        # live updates, broadcast to every connected client as they are stored
        stock = 100
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
                break
            stock -= 1
            await server.persist_delta(
                server.create_delta(
                    "server-admin",
                    [Pointer(role="product", target=PRODUCT), Pointer(role="stock", target=stock)],
                )
            )
            print(f"stock updated: {stock}")

        print("shutting down")
    print("server closed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between updates")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.seconds, args.interval))
