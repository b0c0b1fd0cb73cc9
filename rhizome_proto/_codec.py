"""Encoding and decoding of v1 messages.

``decode`` takes untrusted text and either returns a valid :data:`Message` or raises
:class:`CodecError` carrying the :class:`ErrorCode` to answer with; no other exception escapes,
whatever the input.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ._errors import CodecError, ErrorCode
from ._messages import Message

__all__ = ["MESSAGE_TYPES", "decode", "encode", "encode_value"]

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)
_any_decoder = msgspec.json.Decoder()

#: The ``type`` strings of v1, mapped to their classes.
MESSAGE_TYPES: dict[str, type[Any]] = {cls.__struct_config__.tag: cls for cls in Message.__args__}

_DECODE_ERRORS = (msgspec.MsgspecError, UnicodeError, RecursionError, ValueError, OverflowError)


def encode(message: Message) -> str:
    """The JSON text of ``message``."""
    return _encoder.encode(message).decode()


def encode_value(value: object) -> str:
    """The JSON text of any wire value (a delta, a filter ...), as ``encode`` writes it."""
    return _encoder.encode(value).decode()


def decode(text: str | bytes) -> Message:
    """Parse one v1 message; raise :class:`CodecError` if ``text`` is not one."""
    try:
        return _decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise _classify(text, str(exc)) from None
    except _DECODE_ERRORS as exc:
        raise CodecError(f"not valid JSON: {exc}") from None


def _classify(text: str | bytes, detail: str) -> CodecError:
    """Work out why well-formed JSON was not a valid message (the slow path, errors only)."""
    try:
        obj = _any_decoder.decode(text)
    except _DECODE_ERRORS as exc:
        return CodecError(f"not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return CodecError(f"expected a JSON object, got {type(obj).__name__}")
    mtype = obj.get("type")
    if not isinstance(mtype, str):
        return CodecError("missing or non-string `type`")
    if mtype not in MESSAGE_TYPES:
        return CodecError(
            f"unknown message type: {mtype[:64]!r}",
            code=ErrorCode.UNKNOWN_MESSAGE_TYPE,
            message_type=mtype,
        )
    if mtype == "delta" and "`$.delta" in detail:
        delta = obj.get("delta")
        delta_id = delta.get("id") if isinstance(delta, dict) else None
        return CodecError(
            f"invalid delta: {detail}",
            code=ErrorCode.INVALID_DELTA,
            message_type=mtype,
            delta_id=delta_id if isinstance(delta_id, str) and delta_id else None,
        )
    return CodecError(f"invalid {mtype} message: {detail}", message_type=mtype)
