"""Error codes and the exceptions of the core.

Following h11: a :class:`LocalProtocolError` means the local caller misused an object (and it
changed nothing), a :class:`RemoteProtocolError` means the peer misbehaved fatally (the ``error``
message and the close have already been queued when it is raised: flush and close). Both carry
the protocol ``code`` and the WebSocket ``close_code`` that goes with them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._delta import Delta

__all__ = [
    "CloseCode",
    "CodecError",
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(StrEnum):
    """The ``code`` of ``error`` messages. The first four are the reference's."""

    #: fatal: the ``hello`` named another protocol.
    PROTOCOL_MISMATCH = "PROTOCOL_MISMATCH"
    #: a message could not be decoded or handled (not JSON, not an object, missing fields...).
    MESSAGE_ERROR = "MESSAGE_ERROR"
    #: the server cannot serve the ``sync_request`` at all.
    SYNC_NOT_SUPPORTED = "SYNC_NOT_SUPPORTED"
    #: the sync failed on the server, or a second ``sync_request`` came during a sync.
    SYNC_ERROR = "SYNC_ERROR"
    #: the ``type`` is not one of the v1 messages.
    UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
    #: the message is not allowed for the receiver's role or state (fatal before the handshake).
    UNEXPECTED_MESSAGE = "UNEXPECTED_MESSAGE"
    #: a ``delta`` whose id could not be read was invalid (readable ids get ``delta_nack``).
    INVALID_DELTA = "INVALID_DELTA"
    #: a message was over the size limit (the connection closes with 1009).
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    #: the peer sent nothing at all within the heartbeat timeout (reported locally, never sent).
    PING_TIMEOUT = "PING_TIMEOUT"
    #: the peer is not allowed to federate with us (or not under the system id it claims).
    UNAUTHORIZED = "UNAUTHORIZED"
    #: fatal: the peer's system id is ours (an instance connected to itself).
    SELF_LINK = "SELF_LINK"
    #: a delta whose id is stored with other content (reported locally: the peer gets a
    #: ``delta_nack`` saying so).
    CONFLICT = "CONFLICT"
    #: the peer sends faster than we accept.
    RATE_LIMITED = "RATE_LIMITED"
    #: extension ``credit``: the peer has more unacknowledged live deltas in flight than the
    #: window we granted (answered, reported, the deltas still processed; not fatal).
    FLOW_CONTROL = "FLOW_CONTROL"


class CloseCode:
    """WebSocket close codes used by the core (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


class ProtocolError(Exception):
    """Base class: ``code`` is an :class:`ErrorCode`, ``close_code`` a WebSocket close code."""

    def __init__(
        self, message: str, *, code: ErrorCode, close_code: int = CloseCode.PROTOCOL_ERROR
    ) -> None:
        super().__init__(message)
        self.code = code
        self.close_code = close_code


class LocalProtocolError(ProtocolError):
    """The local caller did something the protocol or the object's state does not allow.

    Raised before any state changes: the object is still usable.
    """


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol fatally.

    The ``error`` message (and, on a :class:`FederationConnection`, the close frame) are already
    queued; the caller flushes what is to send and closes the transport.
    """


class CodecError(ValueError):
    """Text that is not a valid v1 message.

    ``code`` is the :class:`ErrorCode` to answer with; ``message_type`` is the ``type`` field
    when one could be read; ``delta_id`` is the id of an invalid delta when it could be read
    (such a delta is answered with ``delta_nack`` rather than an error).

    ``items`` (a ``deltas`` message of extension ``batch`` whose array could be read but held
    invalid deltas; ``code`` is then ``INVALID_DELTA``): one entry per element of the array, in
    order: the valid :class:`Delta`, or the :class:`CodecError` of that element (with its
    ``delta_id`` when readable). The receiver delivers the valid ones and answers the others,
    so that its numbering of the peer's deltas stays that of the sender.
    """

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode = ErrorCode.MESSAGE_ERROR,
        message_type: str | None = None,
        delta_id: str | None = None,
        items: tuple[Delta | CodecError, ...] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message_type = message_type
        self.delta_id = delta_id
        self.items = items
