"""Node behaviour across reconnects: parked deltas of incoming links, pause that persists."""

from __future__ import annotations

import itertools

from rhizome_adapters.storage import MemoryStore
from rhizome_proto import (
    Delta,
    FederationNode,
    FederationProtocol,
    LinkConfig,
    Pointer,
    Role,
)


def delta(i: int) -> Delta:
    return Delta(
        id=f"d{i}",
        timestamp=1000 + i,
        author="a",
        system="s",
        pointers=(Pointer(role="n", target=i),),
    )


class Net:
    """One hub (server) and one spoke (client) wired at the message level, with reconnects."""

    def __init__(self, initial_sync: str = "none", max_parked: int = 10_000) -> None:
        self.clock = itertools.count(1_700_000_000_000).__next__
        self.hub = FederationNode("hub", MemoryStore(), clock=self.clock, max_parked=max_parked)
        self.spoke = FederationNode("spoke", MemoryStore(), clock=self.clock)
        self.spoke.add_link("up", LinkConfig(initial_sync=initial_sync), outgoing=True)  # type: ignore[arg-type]
        self.generation = 0
        self.connect()

    def connect(self) -> None:
        self.generation += 1
        self.in_id = f"in{self.generation}"
        cfg = self.spoke.link("up").config.to_wire()  # type: ignore[union-attr]
        self.c = FederationProtocol(Role.CLIENT, system_id="spoke", clock=self.clock, config=cfg)
        self.s = FederationProtocol(
            Role.SERVER, system_id="hub", clock=self.clock, link_id=self.in_id
        )
        self.spoke.attach("up", self.c)
        self.hub.add_link(self.in_id, outgoing=False)
        self.hub.attach(self.in_id, self.s)
        self.c.start(0)
        self.s.start(0)

    def run(self, deliver_to_client: bool = True) -> None:
        for _ in range(100):
            moved = False
            for m in self.c.messages_to_send():
                self.s.receive_message(m, 1)
                moved = True
            self.hub.handle_events(self.in_id)
            while self.hub.link(self.in_id).sync_ready:  # type: ignore[union-attr]
                self.hub.sync_step(self.in_id)
            while self.spoke.link("up").sync_ready:  # type: ignore[union-attr]
                self.spoke.sync_step("up")
            out = self.s.messages_to_send()
            if deliver_to_client:
                for m in out:
                    self.c.receive_message(m, 1)
                    moved = True
            self.spoke.handle_events("up")
            if not moved:
                return

    def drop(self) -> None:
        """The connection dies; the hub forgets the incoming link as the adapters do."""
        self.c.connection_closed(1006, "lost")
        self.s.connection_closed(1006, "lost")
        self.spoke.handle_events("up")
        self.hub.handle_events(self.in_id)
        self.hub.remove_link(self.in_id)


def test_deltas_in_flight_to_a_client_that_drops_reach_it_on_its_next_connection() -> None:
    net = Net(initial_sync="none")  # no sync on reconnect: only parking can deliver them
    net.run()
    net.hub.persist_delta(delta(1))
    net.hub.persist_delta(delta(2))
    net.run(deliver_to_client=False)  # sent, never acknowledged: the link dies in between
    net.drop()
    assert delta(1).id not in net.spoke.store
    net.connect()
    net.run()
    assert {"d1", "d2"} <= {d.id for _, d in net.spoke.store.scan(limit=10)}
    assert net.hub.parked_dropped == 0


def test_parking_is_bounded_per_remote_and_counts_what_it_drops() -> None:
    net = Net(initial_sync="none", max_parked=2)
    net.run()
    for i in range(5):
        net.hub.persist_delta(delta(i))
    net.run(deliver_to_client=False)
    net.drop()
    assert net.hub.parked_dropped == 3
    net.connect()
    net.run()
    assert sorted(d.id for _, d in net.spoke.store.scan(limit=10)) == ["d3", "d4"]


def test_our_pause_is_asked_again_after_a_reconnect() -> None:
    net = Net()
    net.run()
    net.spoke.pause("up")
    net.run()
    assert net.s.peer_paused
    net.drop()
    net.connect()
    net.run()
    assert net.s.peer_paused  # the hub's new connection was told to pause again
    net.hub.persist_delta(delta(9))
    net.run()
    assert "d9" not in net.spoke.store  # held by the hub, not dropped
    net.spoke.resume("up")
    net.run()
    assert "d9" in net.spoke.store
