"""A server :class:`FederationNode` whose incoming links are driven by hand, message by message:
the peers are played by the test (hostile ones included), the node's answers are read back or
left unread (a peer that never reads). Pure: no sockets, no clock."""

from __future__ import annotations

import json
from typing import Any

from fuzz.node_harness import open_incoming
from rhizome_adapters.storage import MemoryStore
from rhizome_proto import FederationNode, FederationProtocol
from tests.harness import FakeClock

T0 = 1_795_624_086_443


def delta_dict(delta_id: str, *, system: str = "peer", text: str = "x", **fields: Any) -> dict:
    out = {
        "id": delta_id,
        "timestamp": T0,
        "author": "someone",
        "system": system,
        "pointers": [{"role": "text", "target": text}],
    }
    out.update(fields)
    return out


class HostileServer:
    """A node with a memory store; each peer is an incoming link with a server
    :class:`FederationProtocol` fed the texts the test writes."""

    def __init__(self, **node_options: Any) -> None:
        self.clock = FakeClock(start=T0)
        self.store = MemoryStore()
        self.node = FederationNode("server", self.store, clock=self.clock, **node_options)
        self.conns: dict[str, FederationProtocol] = {}
        self.events: list[Any] = []

    def connect(
        self,
        link_id: str,
        system_id: str,
        *,
        extensions: tuple[str, ...] | None = None,
        max_id_length: int | None = None,
    ) -> FederationProtocol:
        """A peer connects and says ``hello`` as ``system_id``."""
        options: dict[str, Any] = {}
        if max_id_length is not None:
            options["max_id_length"] = max_id_length
        conn, hello = open_incoming(
            self.node, link_id, system_id, self.clock, extensions=extensions, **options
        )
        self.conns[link_id] = conn
        self.send(link_id, hello)
        return conn

    def send(self, link_id: str, *messages: dict[str, Any] | str) -> None:
        """The peer's messages arrive (one read), then the node stages and commits."""
        conn = self.conns[link_id]
        for message in messages:
            text = message if isinstance(message, str) else json.dumps(message)
            conn.receive_message(text)
        self.node.stage(link_id)
        self.events += self.node.commit()

    def read(self, link_id: str) -> list[dict[str, Any]]:
        """The peer reads what the node sent it."""
        return [json.loads(text) for text in self.conns[link_id].messages_to_send()]

    def leave(self, link_id: str) -> None:
        """The peer's transport ends; the node acts on it and forgets the link."""
        conn = self.conns[link_id]
        conn.connection_closed()
        self.node.stage(link_id)
        self.events += self.node.commit()
        self.node.remove_link(link_id)

    def of_type(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]
