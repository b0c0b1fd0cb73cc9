"""Drives a whole :class:`FederationNode` (three incoming links, a memory store) with a hostile
sequence of peer messages read from fuzzer bytes, and checks the node's invariants.

Each step takes a few bytes: which link, what happens (a peer connects with a ``hello``, sends
one of a vocabulary of messages, many of them hostile, reads what it was sent, leaves; the node
streams a sync step; the application persists a delta). The messages: valid, duplicate and
conflicting deltas, ids, authors and system ids at and past the length cap, ``deltas`` batches
with bad elements, bad cursors, stray acks, pause / resume, unknown types, broken JSON.

Invariants (:func:`check_node`), after every step:

* no exception escapes the node or a link, but :class:`RemoteProtocolError` from a peer's
  message (fatal: the error and the close are queued, the link is closing);
* the store stays consistent (``count()`` is the number of deltas ``scan`` returns, every one
  valid and once);
* every delta the node acknowledged (``delta_ack``) is stored;
* what the node holds for peers stays within its memory budget (connections' queued output
  within their cap, parked deltas within the budget).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from rhizome_adapters.storage import MemoryStore
from rhizome_proto import (
    FederationNode,
    FederationProtocol,
    RemoteProtocolError,
    Role,
    State,
    validate_delta,
)

T0 = 1_795_624_086_443
LINKS = ("a", "b", "c")
SYSTEMS = ("peer-1", "peer-2", "peer-1", "x" * 40, "server")
CAP = 64  # max_id_length of the links: small, so the fuzzer reaches past it cheaply
IDS = ("d1", "d2", "d3", "i" * CAP, "i" * (CAP + 1))


def _delta(index: int, variant: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": IDS[index % len(IDS)],
        "timestamp": T0 + variant % 3,  # another timestamp: a conflicting duplicate
        "author": "author",
        "system": "sys",
        "pointers": [{"role": "r", "target": variant}],
    }
    if variant % 7 == 5:
        out["author"] = "a" * (CAP + 1)
    if variant % 11 == 7:
        out["system"] = ""  # invalid
    return out


def _message(kind: int, arg: int) -> str:
    """One message of the vocabulary (``kind``), varied by ``arg``."""
    ts = {"timestamp": T0}
    messages: list[dict[str, Any] | str] = [
        {"type": "delta", **ts, "delta": _delta(arg, arg >> 3)},
        {"type": "deltas", **ts, "deltas": [_delta(arg + i, arg + i) for i in range(arg % 4 + 1)]},
        {"type": "sync_request", **ts},
        {
            "type": "sync_request",
            **ts,
            "fromCursor": ("x:" + "9" * (arg % 40), "q:\u0661", "")[arg % 3],
        },
        {"type": "delta_ack", **ts, "deltaId": IDS[arg % len(IDS)]},
        {"type": "deltas_ack", **ts, "upTo": arg},
        {"type": "delta_nack", **ts, "deltaId": IDS[arg % len(IDS)], "reason": "no"},
        {"type": "pause", **ts},
        {"type": "resume", **ts},
        {"type": "ping", **ts},
        {"type": "error", **ts, "code": "SYNC_ERROR", "message": "x"},
        {"type": "hello", **ts, "systemId": SYSTEMS[arg % len(SYSTEMS)], "config": {}},
        {"type": "nope", **ts},
        '{"type": "delta", "timestamp": 1, "delta": {"id": "d1"',
        "[]",
    ]
    message = messages[kind % len(messages)]
    return message if isinstance(message, str) else json.dumps(message)


def open_incoming(
    node: FederationNode,
    link_id: str,
    system_id: str,
    clock: Callable[[], int | float],
    *,
    extensions: Sequence[str] | None = None,
    window: int = 100_000,
    **options: Any,
) -> tuple[FederationProtocol, str]:
    """An incoming link of ``node`` with a started server endpoint, as an adapter makes one,
    and the ``hello`` its peer opens with as ``system_id`` (offering ``extensions``, if any)."""
    node.add_link(link_id, outgoing=False)
    conn = FederationProtocol(
        Role.SERVER,
        system_id=node.system_id,
        clock=clock,
        link_id=link_id,
        extensions=node.extensions,
        **options,
    )
    node.attach(link_id, conn)
    conn.start(0.0)
    hello: dict[str, Any] = {
        "type": "hello",
        "timestamp": T0,
        "systemId": system_id,
        "protocol": "rhizomedb-federation-v1",
        "config": {"mode": "bidirectional", "initialSync": "none"},
    }
    if extensions is not None:
        hello.update(extensions=list(extensions), window=window)
    return conn, json.dumps(hello)


class NodeChecker:
    """The node under test, its links' endpoints, and what the node acknowledged."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.node = FederationNode(
            "server",
            self.store,
            clock=lambda: T0,
            memory_budget=64 * 1024,
            max_connection_memory=16 * 1024,
            max_parked=50,
            rate_limit=(1000.0, 1000.0),
        )
        self.conns: dict[str, FederationProtocol] = {}
        self.acked: set[str] = set()
        self.generation = 0

    def connect(self, name: str, system_id: str, extensions: bool) -> None:
        old = self.conns.get(name)
        if old is not None and not old.closed:
            return
        if old is not None:
            self.node.remove_link(name)
        conn, hello = open_incoming(
            self.node,
            name,
            system_id,
            lambda: T0,
            extensions=("batch", "cursor", "credit") if extensions else None,
            window=5,
            max_id_length=CAP,
        )
        self.conns[name] = conn
        self.receive(name, hello)

    def receive(self, name: str, text: str) -> None:
        conn = self.conns[name]
        try:
            conn.receive_message(text)
        except RemoteProtocolError:
            assert conn.state in (State.CLOSING, State.CLOSED)
        self.pump(name)

    def pump(self, name: str) -> None:
        self.node.stage(name)
        self.node.commit()

    def read(self, name: str) -> None:
        for text in self.conns[name].messages_to_send():
            message = json.loads(text)
            if message["type"] == "delta_ack":
                self.acked.add(message["deltaId"])

    def leave(self, name: str) -> None:
        conn = self.conns.get(name)
        if conn is None or conn.closed:
            return
        self.read(name)
        conn.connection_closed()
        self.pump(name)

    def check(self) -> None:
        rows = self.store.scan(after=0, limit=10_000)
        ids = [delta.id for _, delta in rows]
        assert len(ids) == len(set(ids)) == self.store.count()
        for _, delta in rows:
            validate_delta(delta)
        assert self.acked <= set(ids), self.acked - set(ids)
        node = self.node
        assert node.parked_bytes <= node.memory_budget
        for conn in self.conns.values():
            if not conn.closed:
                assert conn.outbound_size <= node.max_connection_memory + 4096


def check_node(data: bytes) -> None:
    """The node fed the step sequence ``data`` encodes; every invariant holds after each."""
    checker = NodeChecker()
    now = 0.0
    for i in range(0, len(data) - 2, 3):
        op, a, b = data[i], data[i + 1], data[i + 2]
        name = LINKS[op % len(LINKS)]
        action = (op >> 2) % 8
        conn = checker.conns.get(name)
        if conn is None or action == 0:
            checker.connect(name, SYSTEMS[a % len(SYSTEMS)], extensions=bool(b & 1))
        elif action in (1, 2, 3):
            checker.receive(name, _message(a, b))
        elif action == 4:
            checker.read(name)
        elif action == 5:
            checker.leave(name)
        elif action == 6:
            if checker.node.link(name) is not None:
                checker.node.sync_step(name)
                checker.node.commit()
        else:
            now += b / 16
            conn.read_delay(now)
            delta = checker.node.create_delta("me", [{"role": "n", "target": a}], id=f"mine-{a}")
            checker.node.persist_delta(delta)
            checker.node.commit()
        checker.check()
    for name in list(checker.conns):
        checker.leave(name)
    checker.check()


def node_seed_inputs() -> list[bytes]:
    """Step sequences reaching the interesting parts: every message kind on a v1 link and on
    a link with the extensions, duplicates, leaving and coming back, persisting."""
    seeds = []
    for ext in (0, 1):
        steps = [0, 0, ext]  # link a connects
        for kind in range(15):
            steps += [1 << 2, kind, kind * 7]  # a sends message `kind`
            steps += [4 << 2, 0, 0]  # a reads
        seeds.append(bytes(steps))
    seeds.append(bytes([0, 0, 0, 1, 1, 1, 4, 0, 8, 5, 0, 9, 20, 0, 0, 1, 0, 0, 5, 0, 0, 28, 3, 16]))
    return seeds
