"""Signed deltas (extension ``signatures``): Ed25519 over a canonical encoding of the delta.

Where the signature lives: in the delta itself, as an optional ``signature`` field (base64url,
no padding, of the 64-byte Ed25519 signature). A delta without one encodes exactly as in v1. Our
decoder keeps the field, so a signed delta is stored with its signature (the stores keep each
delta's JSON text) and travels on, unchanged, through every hop of ours: live, relayed and in
sync batches. A v1 peer ignores the field (unknown fields are ignored by every receiver).

What is signed: the bytes ``b"rhizome-delta-signature-v1\\n"`` followed by the delta's canonical
JSON *without* its ``signature`` field (``encode_value``: fields in the order id, timestamp,
author, system, pointers; no whitespace). Every field is covered, so another author, another
system, a changed pointer or timestamp, or a signature moved onto other content fails to verify.

Keys: :func:`generate_signing_key`, and :func:`load_signing_key` / :func:`load_verify_key` read
PEM files or the raw 32-byte key in base64 / base64url / hex text (:func:`public_key_text` writes
the latter).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._delta import Delta

__all__ = [
    "SIGNATURE_CONTEXT",
    "SignatureTrustPolicy",
    "generate_signing_key",
    "load_signing_key",
    "load_verify_key",
    "public_key_text",
    "sign_delta",
    "signed_bytes",
    "signing_key_pem",
    "verify_delta",
]

#: Prefixed to what is signed, so a delta signature can never be taken for another kind of one.
SIGNATURE_CONTEXT = b"rhizome-delta-signature-v1\n"

#: A public key as accepted by :class:`SignatureTrustPolicy`: the object, raw bytes, or text.
VerifyKey: TypeAlias = Ed25519PublicKey | bytes | str

_encoder = msgspec.json.Encoder()


def signed_bytes(delta: Delta) -> bytes:
    """What the signature of ``delta`` covers (its ``signature`` field left out)."""
    if delta.signature is not msgspec.UNSET:
        delta = msgspec.structs.replace(delta, signature=msgspec.UNSET)
    return SIGNATURE_CONTEXT + _encoder.encode(delta)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    text = text.strip().replace("+", "-").replace("/", "_")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_delta(delta: Delta, key: Ed25519PrivateKey) -> Delta:
    """``delta`` with its ``signature`` set by ``key`` (any previous signature replaced)."""
    return msgspec.structs.replace(delta, signature=_b64(key.sign(signed_bytes(delta))))


def verify_delta(delta: Delta, key: Ed25519PublicKey) -> bool:
    """Whether ``delta`` carries a signature by ``key`` over its present content."""
    signature = delta.signature
    if not isinstance(signature, str):
        return False
    try:
        raw = _unb64(signature)
    except (binascii.Error, ValueError):
        return False
    if len(raw) != 64:
        return False
    try:
        key.verify(raw, signed_bytes(delta))
    except InvalidSignature:
        return False
    return True


def generate_signing_key() -> Ed25519PrivateKey:
    """A new random Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def signing_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (what :func:`load_signing_key` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw public key in base64url: what ``--trust-key SYSTEM=KEY`` takes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(raw)


def _raw_key(data: bytes | str) -> bytes | None:
    """The 32 bytes of a raw key given as bytes, or as base64 / base64url / hex text."""
    if isinstance(data, bytes):
        if len(data) == 32:
            return data
        try:
            data = data.decode("ascii")
        except UnicodeDecodeError:
            return None
    text = data.strip()
    for parse in (bytes.fromhex, _unb64):
        try:
            raw = parse(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            return raw
    return None


def _load(
    data: bytes | str,
    kind: str,
    from_pem: Callable[[bytes], object],
    from_raw: Callable[[bytes], object],
) -> object:
    """A key from PEM or the raw 32 bytes (or their text); the caller checks its class."""
    pem = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN" in pem:
        return from_pem(pem)
    raw = _raw_key(data)
    if raw is None:
        raise ValueError(f"not an Ed25519 {kind} key (PEM, or 32 bytes as base64 or hex)")
    return from_raw(raw)


def load_signing_key(data: bytes | str) -> Ed25519PrivateKey:
    """A private key from PEM (PKCS#8, unencrypted) or the raw 32 bytes (or their text).
    Raises ``ValueError`` when ``data`` is neither."""
    key = _load(
        data,
        "private",
        lambda pem: serialization.load_pem_private_key(pem, password=None),
        Ed25519PrivateKey.from_private_bytes,
    )
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"not an Ed25519 private key: {type(key).__name__}")
    return key


def load_verify_key(data: VerifyKey) -> Ed25519PublicKey:
    """A public key from an ``Ed25519PublicKey``, PEM (SubjectPublicKeyInfo) or the raw 32 bytes
    (or their base64 / base64url / hex text). Raises ``ValueError`` when it is none of these."""
    if isinstance(data, Ed25519PublicKey):
        return data
    key = _load(
        data, "public", serialization.load_pem_public_key, Ed25519PublicKey.from_public_bytes
    )
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 public key: {type(key).__name__}")
    return key


class SignatureTrustPolicy:
    """Trusts a delta only when its ``system`` has a key here and the delta carries a valid
    signature by one of that system's keys (several keys per system allow rotation).

    The refusal names why: no key for the system, no signature, or a signature that does not
    verify (content changed after signing, another author or system claimed, a signature
    copied from another delta, or a key that is not the system's).
    """

    def __init__(self, keys: Mapping[str, VerifyKey | Iterable[VerifyKey]]) -> None:
        self.keys: dict[str, tuple[Ed25519PublicKey, ...]] = {}
        for system, given in keys.items():
            if isinstance(given, Ed25519PublicKey | bytes | str):
                given = (given,)
            loaded = tuple(load_verify_key(k) for k in given)
            if not loaded:
                raise ValueError(f"no key given for system {system!r}")
            self.keys[system] = loaded

    def check(self, delta: Delta) -> str | None:
        keys = self.keys.get(delta.system)
        if keys is None:
            return f"untrusted system: {delta.system} (no key for it)"
        if delta.signature is msgspec.UNSET:
            return f"unsigned delta: system {delta.system} requires a signature"
        if any(verify_delta(delta, key) for key in keys):
            return None
        return (
            f"invalid signature: not a signature by system {delta.system}'s key over this "
            "delta's content"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "system",
            "trustedSystems": sorted(self.keys),
            "keys": {s: [public_key_text(k) for k in ks] for s, ks in sorted(self.keys.items())},
        }

    def __repr__(self) -> str:
        return f"SignatureTrustPolicy({sorted(self.keys)!r})"
