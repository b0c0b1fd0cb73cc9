"""Test helpers that do not depend on the runtime: they serve the asyncio, trio and threaded
adapter tests alike (any instance with ``on_federation_event`` and ``scan_deltas``)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from rhizome_proto import Delta, FederationEvent


class Instance(Protocol):
    def on_federation_event(self, handler: Any) -> Callable[[], None]: ...

    def scan_deltas(self, filter: Any = None, *, limit: int | None = None) -> list[Delta]: ...


class Recorder:
    """Every federation event of one instance, in order."""

    def __init__(self, db: Instance) -> None:
        self.events: list[FederationEvent] = []
        db.on_federation_event(self.events.append)

    def of(self, type_: str) -> list[FederationEvent]:
        return [e for e in list(self.events) if e.type == type_]


def ids(db: Instance) -> set[str]:
    """The ids of everything the instance stores."""
    return {d.id for d in db.scan_deltas()}


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port of 127.0.0.1 held for the block, bound but not listening: a connection to it is
    refused and no other program can take it, while a server of ours (``SO_REUSEADDR``, as
    asyncio, anyio and :func:`socket.create_server` set it) may still listen on it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port
