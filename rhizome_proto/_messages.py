"""The 14 messages of ``rhizomedb-federation-v1`` (PROTOCOL.md "Messages") as typed values,
plus the two of the ``batch`` extension (``deltas``, ``deltas_ack``; docs/extensions.md).

Python names are snake_case; on the wire they are camelCase (``system_id`` is ``systemId``).
Optional fields are omitted from the JSON when absent. Unknown fields are ignored on decoding,
as v1 requires. Every message carries ``timestamp``: the sender's wall clock in milliseconds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

import msgspec

from ._delta import Delta, Timestamp
from ._filter import DeltaFilter

__all__ = [
    "PROTOCOL_VERSION",
    "Delta",
    "DeltaAck",
    "DeltaMessage",
    "DeltaNack",
    "DeltasAck",
    "DeltasMessage",
    "ErrorMessage",
    "FederationConfig",
    "Hello",
    "HelloAck",
    "InitialSync",
    "Message",
    "Mode",
    "Pause",
    "Ping",
    "Pong",
    "ReconnectConfig",
    "Resume",
    "SyncBatch",
    "SyncComplete",
    "SyncRequest",
    "SyncStart",
]

#: The protocol string of ``hello`` and ``hello_ack``.
PROTOCOL_VERSION = "rhizomedb-federation-v1"

Mode: TypeAlias = Literal["push", "pull", "bidirectional"]
InitialSync: TypeAlias = Literal["full", "from_timestamp", "none"]
Count = Annotated[int, msgspec.Meta(ge=0)]
NonNegative: TypeAlias = Annotated[int, msgspec.Meta(ge=0)] | Annotated[float, msgspec.Meta(ge=0)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
#: extension ``credit``: how many unacknowledged live deltas an end accepts from its peer
Window = Annotated[int, msgspec.Meta(ge=1)]


class ReconnectConfig(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """The ``reconnect`` part of a ``hello`` config (times in milliseconds)."""

    enabled: bool | None = None
    max_attempts: Count | None = None
    initial_delay: NonNegative | None = None
    max_delay: NonNegative | None = None
    backoff_multiplier: NonNegative | None = None


class FederationConfig(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """The link configuration a client announces in ``hello``; every field is optional.

    It is informational for the server, except ``pull_filter`` and ``mode`` which narrow what the
    server sends. ``trust_policy`` is kept as the JSON the peer sent and never applied.
    """

    mode: Mode | None = None
    initial_sync: InitialSync | None = None
    sync_from_timestamp: NonNegative | None = None
    push_filter: DeltaFilter | None = None
    pull_filter: DeltaFilter | None = None
    reconnect: ReconnectConfig | None = None
    trust_policy: dict[str, Any] | None = None


class _Message(msgspec.Struct, frozen=True, tag_field="type", rename="camel", omit_defaults=True):
    timestamp: Timestamp


class Hello(_Message, frozen=True, tag="hello", kw_only=True, omit_defaults=False):
    """Client to server, first message: who the client is and how it wants the link.

    ``config`` and ``protocol`` are always sent, even when default: a v1 peer compares
    ``protocol`` with its own string and reads ``config``.
    """

    system_id: NonEmptyStr
    config: FederationConfig = FederationConfig()
    protocol: str = PROTOCOL_VERSION
    #: extensions the client asks for (ours; absent for a v1 client)
    extensions: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET
    #: extension ``credit``: the client's receive window (sent when it offers ``credit``)
    window: Window | msgspec.UnsetType = msgspec.UNSET


class HelloAck(_Message, frozen=True, tag="hello_ack", kw_only=True, omit_defaults=False):
    """Server to client: the handshake succeeded (``protocol`` is always sent)."""

    system_id: NonEmptyStr
    link_id: str
    protocol: str = PROTOCOL_VERSION
    #: the subset of the client's extensions the server accepts (absent from a v1 server)
    extensions: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET
    #: extension ``credit``: the server's receive window (sent when it accepts ``credit``)
    window: Window | msgspec.UnsetType = msgspec.UNSET


class DeltaMessage(_Message, frozen=True, tag="delta", kw_only=True):
    """Either way: one live delta, answered with ``delta_ack`` or ``delta_nack``."""

    delta: Delta


class DeltaAck(_Message, frozen=True, tag="delta_ack", kw_only=True):
    """Either way: the delta was accepted."""

    delta_id: str


class DeltaNack(_Message, frozen=True, tag="delta_nack", kw_only=True):
    """Either way: the delta was rejected, and why."""

    delta_id: str
    reason: str


class DeltasMessage(_Message, frozen=True, tag="deltas", kw_only=True):
    """Either way, extension ``batch``: several live deltas in one message. The receiver
    numbers the deltas of all ``deltas`` messages of the link 1, 2, 3 ... in arrival order and
    answers them with one cumulative ``deltas_ack`` (rejections: ``delta_nack`` by id, first)."""

    deltas: Annotated[tuple[Delta, ...], msgspec.Meta(min_length=1)]


class DeltasAck(_Message, frozen=True, tag="deltas_ack", kw_only=True):
    """Either way, extension ``batch``: every delta received in ``deltas`` messages on this
    link, numbered 1 .. ``up_to``, is settled: accepted, except those already rejected with a
    ``delta_nack`` sent before this message."""

    up_to: Count


class SyncRequest(_Message, frozen=True, tag="sync_request", kw_only=True):
    """Client to server: start the initial sync."""

    filter: DeltaFilter | None = None
    from_timestamp: NonNegative | None = None
    #: extension ``cursor``: resume after this position of the server's store
    from_cursor: str | None = None


class SyncStart(_Message, frozen=True, tag="sync_start", kw_only=True):
    """Server to client: a sync of ``total_deltas`` deltas in batches of ``batch_size``."""

    total_deltas: Count
    batch_size: Annotated[int, msgspec.Meta(ge=1)]


class SyncBatch(_Message, frozen=True, tag="sync_batch", kw_only=True):
    """Server to client: one batch of the sync, numbered from 0."""

    deltas: tuple[Delta, ...]
    batch_number: Count
    is_last_batch: bool
    #: extension ``cursor``: the position after this batch
    cursor: str | None = None


class SyncComplete(_Message, frozen=True, tag="sync_complete", kw_only=True):
    """Server to client: the sync is over; ``deltas_processed`` deltas were sent in its batches."""

    deltas_processed: Count
    #: extension ``cursor``: the position to resume from next time
    cursor: str | None = None


class Pause(_Message, frozen=True, tag="pause"):
    """Either way: send me no live deltas until ``resume``."""


class Resume(_Message, frozen=True, tag="resume"):
    """Either way: you may send again."""


class Ping(_Message, frozen=True, tag="ping"):
    """Either way: are you there? Answered with ``pong``."""


class Pong(_Message, frozen=True, tag="pong"):
    """Either way: the answer to ``ping``."""


class ErrorMessage(_Message, frozen=True, tag="error", kw_only=True):
    """Either way: something went wrong; when ``fatal`` the sender closes after it."""

    code: str
    message: str
    fatal: bool | None = None


Message: TypeAlias = (
    Hello
    | HelloAck
    | DeltaMessage
    | DeltaAck
    | DeltaNack
    | DeltasMessage
    | DeltasAck
    | SyncRequest
    | SyncStart
    | SyncBatch
    | SyncComplete
    | Pause
    | Resume
    | Ping
    | Pong
    | ErrorMessage
)
