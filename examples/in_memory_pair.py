"""Two federation connections talking in memory: the sans-IO core with no network at all."""

import itertools

from rhizome_proto import (
    Delta,
    DeltaReceived,
    FederationConnection,
    Pointer,
    Reference,
    Role,
    SyncBatchReceived,
)

wall_clock = itertools.count(1_795_624_086_000).__next__  # milliseconds, injected
client = FederationConnection(Role.CLIENT, system_id="laptop", clock=wall_clock)
server = FederationConnection(Role.SERVER, system_id="hub", clock=wall_clock, link_id="link-1")


def pump(now: float) -> None:
    """Move bytes both ways until both sides are quiet (an adapter does this with sockets)."""
    while True:
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            return
        if to_server:
            server.receive_data(to_server, now)
        if to_client:
            client.receive_data(to_client, now)


client.start(now=0.0)  # queues the HTTP upgrade request
server.start(now=0.0)
pump(0.1)  # upgrade, then hello / hello_ack
print([type(e).__name__ for e in client.events()], [type(e).__name__ for e in server.events()])

review = Delta(
    id="delta-1",
    timestamp=1_795_624_086_443,
    author="alice",
    system="laptop",
    pointers=(
        Pointer(role="movie", target=Reference(id="movie-1", context="reviews")),
        Pointer(role="rating", target=5),
    ),
)
client.send_delta(review)
pump(0.2)
for event in server.events():
    if isinstance(event, DeltaReceived):  # the application stores it, then acknowledges
        print("server got", event.delta.id)
        server.ack(event.delta.id)
pump(0.3)
print("client:", client.events(), "unacknowledged:", client.unacknowledged)

client.request_sync()  # initial sync: the server answers in batches
pump(0.4)
server.events()  # [SyncRequested(...)]
server.start_sync(total_deltas=1, batch_size=100)
server.send_sync_batch([review], last=True)
server.complete_sync()
pump(0.5)
batches = [e for e in client.events() if isinstance(e, SyncBatchReceived)]
print("synced", sum(len(b.deltas) for b in batches), "delta(s)")

client.close(now=0.6)
pump(0.6)
print(client.events(), server.events())
