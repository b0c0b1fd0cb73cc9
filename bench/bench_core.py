"""Benchmarks of the sans-IO core, each reported as a ratio against a baseline run alongside.

    python bench/bench_core.py [--quick]

* codec: decoding ``sync_batch`` messages of 100 deltas with ``rhizome_proto.decode`` (typed,
  validated) against the stdlib's ``json.loads`` of the same text (untyped, unvalidated).
* link: live deltas through a client/server ``FederationConnection`` pair in memory (framing,
  masking, JSON, acks) against a bare wsproto pair sending the same JSON text (no federation
  logic, no acks): the federation layer's overhead.
* sender: what a sender of live deltas spends per delta before any I/O, in microseconds:
  ``validate_delta``, ``MemoryStore.put_many`` (batches of 1,000) and
  ``FederationNode.persist_deltas`` onto one open link with ``batch`` (validation, the store,
  the relay decision, the queueing), against one msgspec encode of the delta. The live-batching
  target (300,000 acked deltas/s) leaves 3.3 us per delta for everything.
* fan-out: what a server spends per delta and link when it relays one client's v1 deltas to
  19 others (reading the deltas and every acknowledgement, storing, relaying, writing), in
  microseconds, against the same encode.

Shared, noisy machines: compare the ratios, not the absolute numbers. Each figure is the best
of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from rhizome_proto import (
    Delta,
    DeltaReceived,
    FederationConnection,
    Pointer,
    Reference,
    Role,
    SyncBatch,
    decode,
    encode,
)


def make_deltas(n: int, offset: int = 0) -> list[Delta]:
    return [
        Delta(
            id=f"delta-{offset + i:08d}",
            timestamp=1_795_624_086_443 + i,
            author="server-author",
            system="ref-server-001",
            pointers=(
                Pointer(role="movie", target=Reference(id=f"movie-{i % 97}", context="reviews")),
                Pointer(role="text", target=f"great great great review #{i}"),
                Pointer(role="rating", target=i % 5 + 1),
            ),
        )
        for i in range(n)
    ]


def best(fn: Callable[[], int], repeat: int) -> float:
    """Items per second, best of ``repeat`` runs of ``fn`` (which returns its item count)."""
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        items = fn()
        rates.append(items / (time.perf_counter() - start))
    return max(rates)


def bench_codec(batches: int, repeat: int) -> tuple[float, float]:
    texts = [
        encode(
            SyncBatch(
                timestamp=1,
                deltas=tuple(make_deltas(100, b * 100)),
                batch_number=b,
                is_last_batch=False,
            )
        )
        for b in range(batches)
    ]

    def ours() -> int:
        return sum(len(decode(t).deltas) for t in texts)  # type: ignore[union-attr]

    def baseline() -> int:
        return sum(len(json.loads(t)["deltas"]) for t in texts)

    return best(ours, repeat), best(baseline, repeat)


def bench_link(n: int, repeat: int) -> tuple[float, float]:
    deltas = make_deltas(n)

    def ours() -> int:
        clock = itertools.count(1_795_624_086_000).__next__
        client = FederationConnection(Role.CLIENT, system_id="c", clock=clock)
        server = FederationConnection(Role.SERVER, system_id="s", clock=clock, link_id="l")
        client.start(0.0)
        server.start(0.0)

        def pump() -> None:
            while True:
                a, b = client.data_to_send(), server.data_to_send()
                if not a and not b:
                    return
                if a:
                    server.receive_data(a, 0.0)
                if b:
                    client.receive_data(b, 0.0)
                for event in server.events():
                    if isinstance(event, DeltaReceived):
                        server.ack(event.delta.id)
                client.events()

        pump()
        for i in range(0, n, 100):
            for delta in deltas[i : i + 100]:
                client.send_delta(delta)
            pump()
        assert not client.unacknowledged
        return n

    texts = [encode_delta_message(d) for d in deltas]

    def baseline() -> int:
        client = WSConnection(ConnectionType.CLIENT)
        server = WSConnection(ConnectionType.SERVER)
        server.receive_data(client.send(Request(host="h", target="/federation")))
        for _ in server.events():
            client.receive_data(server.send(AcceptConnection()))
        list(client.events())
        got = 0
        for i in range(0, n, 100):
            data = b"".join(client.send(TextMessage(data=t)) for t in texts[i : i + 100])
            server.receive_data(data)
            for event in server.events():
                if isinstance(event, TextMessage):
                    json.loads(event.data)
                    got += 1
        assert got == n
        return n

    return best(ours, repeat), best(baseline, repeat)


def bench_sender(n: int, repeat: int) -> dict[str, float]:
    """Microseconds per delta of each step of persisting live deltas (best of ``repeat``)."""
    import msgspec

    from rhizome_adapters.storage import MemoryStore
    from rhizome_proto import FederationNode, FederationProtocol, LinkConfig, validate_delta

    deltas = make_deltas(n)
    encoder = msgspec.json.Encoder()

    def store() -> int:
        target = MemoryStore()
        for i in range(0, n, 1000):
            target.put_many(deltas[i : i + 1000], validate=False)
        return n

    def persist() -> int:
        clock = itertools.count(1_795_624_086_000).__next__
        node = FederationNode("bench", MemoryStore(), clock=clock, max_queued=n + 1)
        node.add_link("out", LinkConfig(mode="push", initial_sync="none"), outgoing=True)
        client = FederationProtocol(
            Role.CLIENT, system_id="bench", clock=clock, extensions=("batch",)
        )
        server = FederationProtocol(
            Role.SERVER, system_id="peer", clock=clock, link_id="in", extensions=("batch",)
        )
        node.attach("out", client)
        client.start(0.0)
        server.start(0.0)
        for text in client.messages_to_send():
            server.receive_message(text)
        for text in server.messages_to_send():
            client.receive_message(text)
        node.handle_events("out")
        for i in range(0, n, 1000):
            node.persist_deltas(deltas[i : i + 1000])
        assert client.pending_count == n  # every delta went onto the link, none to the store
        return n

    steps = {
        "msgspec encode (baseline)": lambda: len([encoder.encode(d) for d in deltas]),
        "validate_delta": lambda: len([validate_delta(d) for d in deltas]),
        "MemoryStore.put_many": store,
        "persist_deltas onto one link": persist,
    }
    return {name: 1e6 / best(step, repeat) for name, step in steps.items()}


def bench_fanout(links: int, n: int, repeat: int) -> float:
    """Microseconds the server side spends per delta and link it relays to (best of
    ``repeat``): a ``FederationNode`` serves ``links`` v1 clients (``FederationConnection``
    pairs in memory); one sends ``n`` deltas, 100 per read, and the node stores each and
    relays it to the others, which acknowledge it. Timed: the server's connections reading
    (the deltas, the acknowledgements), the node staging and committing, and the server's
    connections writing; not the clients."""
    deltas = make_deltas(n)
    return min(_fanout(links, deltas) for _ in range(repeat)) * 1e6 / (n * (links - 1))


def _fanout(links: int, deltas: list[Delta]) -> float:
    from rhizome_adapters.storage import MemoryStore
    from rhizome_proto import FederationNode, LinkConfig

    clock = itertools.count(1_795_624_086_000).__next__
    node = FederationNode("hub", MemoryStore(), clock=clock, max_queued=len(deltas) + 1)
    pairs = []
    for i in range(links):
        node.add_link(f"l{i}", outgoing=False)
        server = FederationConnection(Role.SERVER, system_id="hub", clock=clock, link_id=f"l{i}")
        client = FederationConnection(
            Role.CLIENT,
            system_id=f"peer-{i}",
            clock=clock,
            config=LinkConfig(initial_sync="none"),
        )
        node.attach(f"l{i}", server)
        server.start(0.0)
        client.start(0.0)
        pairs.append((f"l{i}", server, client))

    def pump() -> float:
        server_time, busy = 0.0, True
        while busy:
            busy = False
            sent = [client.data_to_send() for _, _, client in pairs]
            start = time.perf_counter()
            for (link_id, server, _), data in zip(pairs, sent, strict=True):
                if data:
                    server.receive_data(data, 0.0)
                    node.stage(link_id)
            node.commit()
            out = [server.data_to_send() for _, server, _ in pairs]
            server_time += time.perf_counter() - start
            for (_, _, client), data in zip(pairs, out, strict=True):
                if data:
                    busy = True
                    client.receive_data(data, 0.0)
                    for event in client.events():
                        if isinstance(event, DeltaReceived):
                            client.ack(event.delta.id)
        return server_time

    pump()  # the handshakes
    sender, timed = pairs[0][2], 0.0
    for i in range(0, len(deltas), 100):
        for delta in deltas[i : i + 100]:
            sender.send_delta(delta, validate=False)
        timed += pump()
    assert all(not client.unacknowledged for _, _, client in pairs)
    return timed


def encode_delta_message(delta: Delta) -> str:
    from rhizome_proto import DeltaMessage

    return encode(DeltaMessage(timestamp=1, delta=delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    batches, n = (5, 500) if args.quick else (100, 20_000)
    ours, base = bench_codec(batches, args.repeat)
    print(
        f"codec decode: {ours:,.0f} deltas/s typed+validated; json.loads {base:,.0f} deltas/s; "
        f"ratio {ours / base:.2f}"
    )
    ours, base = bench_link(n, args.repeat)
    print(
        f"live link: {ours:,.0f} deltas/s acked through a FederationConnection pair; "
        f"bare wsproto+json {base:,.0f} messages/s; ratio {ours / base:.2f}"
    )
    costs = bench_sender(n * 2, args.repeat)
    baseline = costs["msgspec encode (baseline)"]
    for name, us in costs.items():
        print(f"sender: {name}: {us:.2f} us/delta ({us / baseline:.1f}x the encode)")
    links = 5 if args.quick else 20
    us = bench_fanout(links, n // 10, args.repeat)
    print(
        f"fan-out: {us:.2f} us on the server per delta and link relayed to, {links} links "
        f"({us / baseline:.1f}x the encode)"
    )


if __name__ == "__main__":
    main()
