"""Authentication of federation clients: bearer tokens mapped to the system ids they may claim.

A client presents its token in the upgrade request, in one of three forms (the first found
counts):

1. ``Authorization: Bearer <token>`` (clients of ours, any HTTP client);
2. ``Sec-WebSocket-Protocol: rhizome-federation, rhizome.bearer.<token>``: browsers cannot set
   headers on a WebSocket, but can offer subprotocols; the server selects
   ``rhizome-federation``, never echoing the token;
3. a query parameter ``?access_token=<token>`` (last resort: URLs end up in logs).

A server given :class:`Credentials` answers an upgrade without a valid token with HTTP 401, and
a ``hello`` whose ``systemId`` the token does not allow with a fatal ``UNAUTHORIZED`` error.
Tokens are kept as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "BEARER_SUBPROTOCOL_PREFIX",
    "SUBPROTOCOL",
    "Credentials",
    "Principal",
    "parse_token_file",
    "token_from_request",
]

#: The subprotocol a server selects when a browser offers its token as a subprotocol.
SUBPROTOCOL = "rhizome-federation"
#: A token offered as a subprotocol: this prefix, then the token.
BEARER_SUBPROTOCOL_PREFIX = "rhizome.bearer."
_QUERY_PARAMETER = "access_token"


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to, and the system ids it may claim (``None``: any)."""

    name: str
    system_ids: frozenset[str] | None

    def allows(self, system_id: str) -> bool:
        return self.system_ids is None or system_id in self.system_ids


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Credentials:
    """The tokens a server accepts: ``{token: system ids it may claim}`` (``"*"`` in the ids:
    any). The principal's name is ``name`` if given per token, else the token's first ids."""

    def __init__(
        self, tokens: Mapping[str, Iterable[str]], *, names: Mapping[str, str] | None = None
    ) -> None:
        self._by_digest: dict[bytes, Principal] = {}
        for token, ids in tokens.items():
            if not token or any(c.isspace() for c in token):
                raise ValueError("a token must be non-empty, without whitespace")
            allowed = frozenset(ids)
            if not allowed:
                raise ValueError("a token must allow at least one system id (or '*')")
            name = (names or {}).get(token) or ",".join(sorted(allowed))
            self._by_digest[_digest(token)] = Principal(name, None if "*" in allowed else allowed)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal of ``token``, or ``None`` when it is missing or unknown."""
        if not token:
            return None
        wanted = _digest(token)
        found = None
        for digest, principal in self._by_digest.items():  # constant time over the table
            if hmac.compare_digest(digest, wanted):
                found = principal
        return found


def token_from_request(
    headers: Sequence[tuple[bytes, bytes]], target: bytes | str
) -> tuple[str | None, bool]:
    """The token an upgrade request presents, and whether it came as a subprotocol (then the
    server must select :data:`SUBPROTOCOL`)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip(), False
    for name, value in headers:
        if name.lower() == b"sec-websocket-protocol":
            for offered in value.decode("latin-1").split(","):
                offered = offered.strip()
                if offered.startswith(BEARER_SUBPROTOCOL_PREFIX):
                    token = offered[len(BEARER_SUBPROTOCOL_PREFIX) :]
                    if token:
                        return token, True
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    for key, query_value in parse_qsl(urlsplit(text).query):
        if key == _QUERY_PARAMETER and query_value:
            return query_value, False
    return None, False


def parse_token_file(text: str, source: str = "token file") -> Credentials:
    """A server's token file: one ``TOKEN SYSTEM_ID [SYSTEM_ID ...]`` per line (``*`` for any
    system id); blank lines and ``#`` comments are skipped. Raises ``ValueError`` naming the
    line of a malformed entry."""
    tokens: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            raise ValueError(f"{source}:{number}: expected TOKEN SYSTEM_ID [SYSTEM_ID ...]")
        if words[0] in tokens:
            raise ValueError(f"{source}:{number}: the same token twice")
        tokens[words[0]] = words[1:]
    if not tokens:
        raise ValueError(f"{source}: no tokens")
    return Credentials(tokens)
