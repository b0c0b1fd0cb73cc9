"""The delta model (RhizomeDB spec section 2.1): ``Delta``, ``Pointer``, ``Reference``.

The validity rules of spec section 2.1.1 are declared once, as msgspec constraints on these types,
so decoding from JSON checks them in C and names the offending field by its path
(``at `$.pointers[0].target.id```). :func:`validate_delta` applies the same rules to a delta
built in Python.

Unknown fields on a delta are dropped when decoding: a delta is identified by its id and its five
defined fields, and only those are stored and forwarded, with one exception of ours: an optional
``signature`` (extension ``signatures``, ``rhizome_proto._signing``), kept and forwarded with the
delta, and absent from the JSON of an unsigned delta. A ``Reference`` target, however, admits
exactly ``id`` and ``context``; any other object as a pointer target is invalid.
"""

from __future__ import annotations

from typing import Annotated, TypeAlias

import msgspec

__all__ = [
    "MAX_TIMESTAMP",
    "Delta",
    "InvalidDeltaError",
    "Pointer",
    "PointerTarget",
    "Reference",
    "Timestamp",
    "validate_delta",
]

#: The largest timestamp accepted (JavaScript's ``Number.MAX_SAFE_INTEGER``): beyond it the
#: TypeScript reference cannot represent a millisecond timestamp exactly.
MAX_TIMESTAMP = 2**53 - 1

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]

#: Milliseconds since the Unix epoch: a positive number, int or float, kept as received.
Timestamp: TypeAlias = (
    Annotated[int, msgspec.Meta(gt=0, le=MAX_TIMESTAMP)]
    | Annotated[float, msgspec.Meta(gt=0, le=float(MAX_TIMESTAMP))]
)


class Reference(
    msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True, gc=False
):
    """A pointer target that names another entity: ``{"id": str, "context"?: str}``."""

    id: NonEmptyStr
    context: NonEmptyStr | None = None


#: What a pointer may point at: a reference or a primitive (never null, an array or another object).
PointerTarget: TypeAlias = Reference | str | bool | int | float


class Pointer(msgspec.Struct, frozen=True, gc=False):
    """One labelled pointer of a delta: ``{"role": str, "target": ...}``."""

    role: NonEmptyStr
    target: PointerTarget


class Delta(msgspec.Struct, frozen=True, gc=False):
    """An immutable, self-describing delta.

    ``pointers`` is a tuple (it encodes as a JSON array). Instances built in Python are not checked
    until :func:`validate_delta` (or sending them) checks them; instances decoded from JSON are
    always valid.

    Deltas, pointers and references are not tracked by the cyclic garbage collector
    (``gc=False``): they hold only strings, numbers and each other, so they cannot form a cycle,
    and a store of a million deltas is not rescanned at every collection.
    """

    id: NonEmptyStr
    timestamp: Timestamp
    author: NonEmptyStr
    system: NonEmptyStr
    pointers: tuple[Pointer, ...] = ()
    #: Ed25519 signature by the system's key (base64url), or unset: see ``sign_delta``
    signature: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | msgspec.UnsetType = (
        msgspec.UNSET
    )


class InvalidDeltaError(ValueError):
    """A delta breaks a rule of spec section 2.1.1.

    ``str(error)`` names the rule and the field, e.g.
    ``Expected `str` of length >= 1 - at `$.author```; ``delta_id`` is the delta's id when it is
    a readable string, else ``None``.
    """

    def __init__(self, message: str, delta_id: str | None = None) -> None:
        super().__init__(message)
        self.delta_id = delta_id


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Delta)


def validate_delta(delta: Delta, *, max_size: int | None = None) -> Delta:
    """Check ``delta`` against spec section 2.1.1 and return it; raise :class:`InvalidDeltaError`.

    The check runs the delta through the same typed decoder the wire uses, so one set of rules
    (the constraints on the types above) governs both. ``max_size``: the most bytes its JSON
    text may take (a delta no message could carry is refused too).
    """
    if not isinstance(delta, Delta):
        raise InvalidDeltaError(f"Expected a Delta, got {type(delta).__name__}")
    delta_id = delta.id if isinstance(delta.id, str) and delta.id else None
    try:
        text = _encoder.encode(delta)
        checked: Delta = _decoder.decode(text)
    except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidDeltaError(str(exc), delta_id) from None
    if max_size is not None and len(text) > max_size:
        raise InvalidDeltaError(
            f"delta {delta_id!r} is {len(text)} bytes of JSON: too large for a message "
            f"(at most {max_size})",
            delta_id,
        )
    return checked
