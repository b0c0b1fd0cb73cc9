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


class _LooseDelta(msgspec.Struct, frozen=True, tag="delta", tag_field="type", rename="camel"):
    """A ``delta`` message whose delta is left undecoded (to tell which part is invalid)."""

    timestamp: Timestamp
    delta: msgspec.Raw


_loose_deltas_decoder = msgspec.json.Decoder(_LooseDeltas)
_loose_delta_decoder = msgspec.json.Decoder(_LooseDelta)

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
    """Work out why well-formed JSON was not a valid message (the slow path, errors only).

    Decided by decoding the parts again (the envelope with its deltas left raw, then each
    delta), never by reading msgspec's message text; ``detail`` is only quoted."""
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
    if mtype == "delta":
        return _classify_delta(text, detail)
    if mtype == "deltas":
        return _classify_deltas(text, detail)
    return CodecError(f"invalid {mtype} message: {detail}", message_type=mtype)


def _classify_delta(text: str | bytes, detail: str) -> CodecError:
    """A ``delta`` message: an invalid delta in a valid envelope is ``INVALID_DELTA`` (with
    its id when readable, to be answered with ``delta_nack``); else the message is invalid."""
    try:
        loose = _loose_delta_decoder.decode(text)
    except _DECODE_ERRORS:
        return CodecError(f"invalid delta message: {detail}", message_type="delta")
    item = _judge(loose.delta, "`$.delta", "delta")
    if isinstance(item, CodecError):
        return item
    return CodecError(f"invalid delta message: {detail}", message_type="delta")  # pragma: no cover


def _classify_deltas(text: str | bytes, detail: str) -> CodecError:
    """A ``deltas`` message with an invalid delta: judge each element, so that the receiver
    can deliver the valid ones and answer the others (``CodecError.items``)."""
    try:
        loose = _loose_deltas_decoder.decode(text)
    except _DECODE_ERRORS:  # the envelope is bad: refuse the message whole
        return CodecError(f"invalid deltas message: {detail}", message_type="deltas")
    items = tuple(
        _judge(raw, f"`$.deltas[{index}]", "deltas") for index, raw in enumerate(loose.deltas)
    )
    if not any(isinstance(item, CodecError) for item in items):  # pragma: no cover
        return CodecError(f"invalid deltas message: {detail}", message_type="deltas")
    return CodecError(
        f"invalid delta in deltas: {detail}",
        code=ErrorCode.INVALID_DELTA,
        message_type="deltas",
        items=items,
    )


def _judge(raw: msgspec.Raw, where: str, mtype: str) -> Delta | CodecError:
    """One delta of a message, at path ``where``: the delta, or its ``INVALID_DELTA`` error."""
    try:
        return _delta_decoder.decode(raw)
    except _DECODE_ERRORS as exc:
        detail = str(exc)
    # msgspec names the path from the delta's root (``$``): name it from the message's
    detail = detail.replace("`$", where, 1) if "- at `$" in detail else f"{detail} - at {where}`"
    try:
        obj = _any_decoder.decode(raw)
    except _DECODE_ERRORS:  # pragma: no cover - the whole message parsed as JSON already
        obj = None
    delta_id = obj.get("id") if isinstance(obj, dict) else None
    return CodecError(
        f"invalid delta: {detail}",
        code=ErrorCode.INVALID_DELTA,
        message_type=mtype,
        delta_id=delta_id if isinstance(delta_id, str) and delta_id else None,
    )
