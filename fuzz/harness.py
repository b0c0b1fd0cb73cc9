"""The driving harness of the connection fuzz targets: a ``FederationConnection`` (server or
client role) set up by the input's first byte and fed the rest in chunks, with an application
that answers what it is asked; after every call it asserts the invariants of
fuzz/invariants.py.

The first two bytes of the fuzzer's input choose the setup (see ``_Options``) and where the
rest is split into chunks; the rest is what the peer sends.
"""

from __future__ import annotations

from typing import Any

import rhizome_proto
from fuzz.invariants import (
    check_ended,
    check_event,
    check_output,
    check_remote_error,
    check_timer,
)
from fuzz.seeds import (
    HELLO,
    HELLO_ACK,
    HELLO_ACK_EXT,
    HELLO_EXT,
    UPGRADE_REQUEST,
    accept_response,
    masked_frame,
    unmasked_frame,
)
from rhizome_proto import (
    Closed,
    DeltaReceived,
    Event,
    FederationConnection,
    RemoteProtocolError,
    Role,
    State,
    SyncRequested,
)

__all__ = [
    "check_client_connection",
    "check_server_connection",
    "run_client_connection",
    "run_server_connection",
]

_EXTENSIONS = ("batch", "credit")
_RECEIVE_WINDOW = 3
_NOW = 1.0
_MAX_CHUNKS = 4


class _Options:
    """Setup flags from the first byte; the second byte places the chunk boundaries."""

    def __init__(self, data: bytes) -> None:
        flags = data[0] if data else 0
        self.prelude = bool(flags & 0x01)  # server: valid upgrade fed; client: hello_ack fed
        self.hello = bool(flags & 0x02)  # server: a valid hello fed as well
        self.compression = bool(flags & 0x04)
        self.small_limit = bool(flags & 0x08)  # max_message_size 256 bytes, else 64 KiB
        self.sync = bool(flags & 0x10)  # client: request_sync once open
        self.pause = bool(flags & 0x20)  # pause the peer once open
        self.pending = bool(flags & 0x40)  # a delta of ours is pending
        self.extensions = bool(flags & 0x80)  # we speak batch and credit (window 3)
        self.split = data[1] if len(data) > 1 else 0
        self.body = data[2:]

    def max_message_size(self) -> int:
        return 256 if self.small_limit else 64 * 1024

    def extension_options(self) -> dict[str, Any]:
        if not self.extensions:
            return {}
        return {"extensions": _EXTENSIONS, "receive_window": _RECEIVE_WINDOW}

    def chunks(self) -> list[bytes]:
        body = self.body
        if not body:
            return []
        if self.split == 0:
            return [body]
        step = max(1, len(body) * self.split // 255 // _MAX_CHUNKS + 1)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        if len(pieces) > _MAX_CHUNKS:  # keep the work per input bounded
            pieces[_MAX_CHUNKS - 1 :] = [b"".join(pieces[_MAX_CHUNKS - 1 :])]
        return pieces


class _Checker:
    """Drives one connection and checks the invariant after every call."""

    def __init__(self, conn: FederationConnection) -> None:
        self.conn = conn
        self.closed = 0
        self.now = _NOW
        self.events: list[Event] = []

    def take(self) -> None:
        for event in self.conn.events():
            check_event(event, self.closed)
            self.events.append(event)
            if isinstance(event, Closed):
                self.closed += 1
            self.react(event)
        check_output(self.conn, self.conn.data_to_send())

    def react(self, event: Event) -> None:
        """An application that answers what it is asked, as an adapter's user would."""
        conn = self.conn
        if isinstance(event, DeltaReceived):
            conn.ack(event.delta.id)
        elif isinstance(event, SyncRequested) and conn.is_open:
            conn.start_sync(1, batch_size=1)
            conn.send_sync_batch(
                [rhizome_proto.Delta(id="s1", timestamp=1, author="a", system="s")], last=True
            )
            conn.complete_sync()

    def feed(self, chunk: bytes) -> None:
        try:
            self.conn.receive_data(chunk, self.now)
        except RemoteProtocolError as exc:
            check_remote_error(self.conn, exc)
        self.take()

    def tick(self) -> None:
        timer = self.conn.get_timer()
        if timer is not None:
            self.now = max(self.now, timer)
            self.conn.handle_timer(self.now)
            check_timer(self.now, self.conn.get_timer())
        self.take()

    def finish(self) -> None:
        self.tick()
        self.conn.receive_eof(self.now + 1.0)
        self.take()
        check_ended(self.conn, self.closed)


def _run(checker: _Checker, options: _Options) -> None:
    conn = checker.conn
    if options.pending and conn.state is not State.CLOSED:
        for name in ("mine", "mine-2", "mine-3") if options.extensions else ("mine",):
            conn.send_delta(rhizome_proto.Delta(id=name, timestamp=1, author="a", system="s"))
    if options.pause and conn.is_open:
        conn.pause()
    if options.sync and conn.is_open and conn.role is Role.CLIENT:
        conn.request_sync()
    checker.take()
    for chunk in options.chunks():
        checker.feed(chunk)
        if checker.closed:
            break
    checker.finish()


def check_server_connection(data: bytes) -> None:
    """Our server, started (optionally upgraded, optionally past ``hello``), fed ``data``."""
    run_server_connection(data)


def check_client_connection(data: bytes) -> None:
    """Our client, started, its upgrade accepted (optionally past ``hello_ack``), fed ``data``."""
    run_client_connection(data)


def run_server_connection(data: bytes) -> list[Event]:
    """:func:`check_server_connection`, returning the server's events."""
    options = _Options(data)
    conn = FederationConnection(
        Role.SERVER,
        system_id="fuzz-server",
        link_id="fuzz-link",
        clock=lambda: 1795624086459,
        max_message_size=options.max_message_size(),
        compression=options.compression,
        **options.extension_options(),
    )
    conn.start(0.0)
    checker = _Checker(conn)
    if options.prelude or options.hello:
        checker.feed(UPGRADE_REQUEST)
        assert conn.request is not None
        if options.hello:
            checker.feed(masked_frame(HELLO_EXT if options.extensions else HELLO))
            assert conn.is_open
    _run(checker, options)
    return checker.events


def run_client_connection(data: bytes) -> list[Event]:
    """:func:`check_client_connection`, returning the client's events."""
    options = _Options(data)
    conn = FederationConnection(
        Role.CLIENT,
        system_id="fuzz-client",
        clock=lambda: 1795624086459,
        max_message_size=options.max_message_size(),
        compression=options.compression,
        **options.extension_options(),
    )
    conn.start(0.0)
    checker = _Checker(conn)
    request = conn.data_to_send()
    checker.feed(accept_response(request, deflate=options.compression))
    assert conn.state is State.HELLO_SENT, conn.state
    if options.prelude:
        checker.feed(unmasked_frame(HELLO_ACK_EXT if options.extensions else HELLO_ACK))
        assert conn.is_open
    _run(checker, options)
    return checker.events
