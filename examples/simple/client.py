"""A federation client, as in the seed's ``examples/simple/client.ts``.

It connects to a server with a bidirectional link and a full initial sync, authors two movie
reviews (stored, then broadcast to the server), waits until the server acknowledged them, prints
the link's status and counters and what it received, and exits.

    python examples/simple/client.py --url ws://127.0.0.1:8080/federation
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from rhizome_adapters import FederatedRhizomeDB
from rhizome_proto import Delta, FederationEvent, LinkConfig, Pointer, ReconnectPolicy, Reference

REVIEWS = [  # (author, movie, rating, comment)
    ("alice", "movie-1", 5, "A masterpiece."),
    ("bob", "movie-2", 3, "Fine, a bit long."),
]


def describe(delta: Delta) -> str:
    parts = []
    for p in delta.pointers:
        target = f"@{p.target.id}" if isinstance(p.target, Reference) else repr(p.target)
        parts.append(f"{p.role}={target}")
    return f"{delta.author}@{delta.system}: {' '.join(parts)}"


async def main(url: str) -> int:
    async with FederatedRhizomeDB(system_id="federation-client-001") as client:
        received: list[Delta] = []
        synced = asyncio.Event()
        acked: set[str] = set()
        all_acked = asyncio.Event()

        def on_event(event: FederationEvent) -> None:
            if event.type == "link:connected":
                print(f"connected to {url}")
            elif event.type == "sync:started":
                print(f"initial sync started: {event.total} deltas")
            elif event.type == "sync:completed":
                print(f"initial sync completed: {event.count} deltas")
                synced.set()
            elif event.type == "delta:received" and event.delta:
                received.append(event.delta)
            elif event.type == "delta:sent" and event.delta_id:
                acked.add(event.delta_id)
                if len(acked) == len(REVIEWS):
                    all_acked.set()
            elif event.type in ("delta:rejected", "link:error"):
                print(f"{event.type}: {event.reason}")

        client.on_federation_event(on_event)

        config = LinkConfig(
            mode="bidirectional",
            initial_sync="full",
            reconnect=ReconnectPolicy(max_attempts=3, initial_delay=0.5, max_delay=2.0),
        )
        try:
            link = await client.connect_to_remote(url, config)
        except ConnectionError as exc:
            print(f"cannot connect: {exc}", file=sys.stderr)
            print("start the server first: python examples/simple/server.py", file=sys.stderr)
            return 1
        print(f"link {link.id} to server {link.remote_system_id}")
        await asyncio.wait_for(synced.wait(), 10)

        for author, movie, rating, comment in REVIEWS:
            review = client.create_delta(
                author,
                [
                    Pointer(role="review", target=Reference(id=movie, context="reviews")),
                    Pointer(role="rating", target=rating),
                    Pointer(role="comment", target=comment),
                ],
            )
            await client.persist_delta(review)  # stored, then sent on every link that wants it
            print(f"sent review {review.id} by {author}")
        await asyncio.wait_for(all_acked.wait(), 10)

        stats = link.stats
        print(f"link status: {link.status}")
        print(
            f"stats: sent={stats.deltas_sent} received={stats.deltas_received} "
            f"rejected={stats.deltas_rejected} bytes_sent={stats.bytes_sent} "
            f"bytes_received={stats.bytes_received}"
        )
        print(f"received {len(received)} deltas from the server:")
        for delta in received:
            print(f"  {describe(delta)}")
    print("disconnected")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080/federation")
    sys.exit(asyncio.run(main(parser.parse_args().url)))
