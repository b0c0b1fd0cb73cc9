"""Encoding and decoding of v1 messages (and of our extensions' messages).

``decode`` takes untrusted text and either returns a valid :data:`Message` or raises
:class:`CodecError` carrying the :class:`ErrorCode` to answer with; no other exception escapes,
whatever the input.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from ._delta import Delta, Timestamp
from ._errors import CodecError, ErrorCode
from ._messages import Message

__all__ = ["MESSAGE_TYPES", "decode", "encode", "encode_value"]

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)
_any_decoder = msgspec.json.Decoder()

_delta_decoder = msgspec.json.Decoder(Delta)


class _LooseDeltas(msgspec.Struct, frozen=True, tag="deltas", tag_field="type", rename="camel"):
    """A ``deltas`` message whose deltas are left undecoded (to judge them one by one)."""

    timestamp: Timestamp
    deltas: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)]


_loose_deltas_decoder = msgspec.json.Decoder(_LooseDeltas)

#: The ``type`` strings of v1 and of our extensions, mapped to their classes.
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
    if mtype == "deltas" and "`$.deltas[" in detail:
        return _classify_deltas(text, detail)
    return CodecError(f"invalid {mtype} message: {detail}", message_type=mtype)


def _classify_deltas(text: str | bytes, detail: str) -> CodecError:
    """A ``deltas`` message with an invalid delta: judge each element, so that the receiver
    can deliver the valid ones and answer the others (``CodecError.items``)."""
    try:
        loose = _loose_deltas_decoder.decode(text)
    except _DECODE_ERRORS:  # the envelope is bad too: refuse the message whole
        return CodecError(f"invalid deltas message: {detail}", message_type="deltas")
    items = tuple(_batch_item(raw, index) for index, raw in enumerate(loose.deltas))
    return CodecError(
        f"invalid delta in deltas: {detail}",
        code=ErrorCode.INVALID_DELTA,
        message_type="deltas",
        items=items,
    )


def _batch_item(raw: msgspec.Raw, index: int) -> Delta | CodecError:
    try:
        return _delta_decoder.decode(raw)
    except _DECODE_ERRORS as exc:
        detail = str(exc)
    where = f"`$.deltas[{index}]"
    detail = detail.replace("`$", where, 1) if "- at `$" in detail else f"{detail} - at {where}`"
    try:
        obj = _any_decoder.decode(raw)
    except _DECODE_ERRORS:  # pragma: no cover - the whole message parsed as JSON already
        obj = None
    delta_id = obj.get("id") if isinstance(obj, dict) else None
    return CodecError(
        f"invalid delta: {detail}",
        code=ErrorCode.INVALID_DELTA,
        message_type="deltas",
        delta_id=delta_id if isinstance(delta_id, str) and delta_id else None,
    )
