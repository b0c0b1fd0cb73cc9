"""Trust policies: which received deltas an instance accepts.

A policy is pure and synchronous: :meth:`TrustPolicy.check` returns ``None`` when the delta is
trusted and otherwise the reason it is not (sent to the peer in ``delta_nack``). The receiving
instance always applies its own policy; a policy a peer declares in ``hello`` is informational.
A decision that needs I/O belongs in the application, which answers the connection's
``DeltaReceived`` event with ``ack`` or ``nack`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ._delta import Delta

__all__ = [
    "AuthorTrustPolicy",
    "CombinedTrustPolicy",
    "CustomTrustPolicy",
    "PermissiveTrustPolicy",
    "SystemTrustPolicy",
    "TrustPolicy",
    "combine_trust_policies",
    "create_author_trust_policy",
    "create_custom_trust_policy",
    "create_system_trust_policy",
]


class TrustPolicy(Protocol):
    """Anything with ``check(delta) -> reason | None`` and ``to_json()`` is a trust policy."""

    def check(self, delta: Delta) -> str | None:
        """``None`` if ``delta`` is trusted, else why it is not."""
        ...

    def to_json(self) -> dict[str, Any]:
        """The policy as the reference puts it in ``hello`` (only its lists survive)."""
        ...


class PermissiveTrustPolicy:
    """Trusts every delta (the default)."""

    def check(self, delta: Delta) -> str | None:
        return None

    def to_json(self) -> dict[str, Any]:
        return {"type": "permissive"}

    def __repr__(self) -> str:
        return "PermissiveTrustPolicy()"


class AuthorTrustPolicy:
    """Trusts deltas whose ``author`` is one of ``authors``."""

    def __init__(self, authors: Iterable[str]) -> None:
        self.authors = frozenset(authors)

    def check(self, delta: Delta) -> str | None:
        if delta.author in self.authors:
            return None
        return f"untrusted author: {delta.author}"

    def to_json(self) -> dict[str, Any]:
        return {"type": "author", "trustedAuthors": sorted(self.authors)}

    def __repr__(self) -> str:
        return f"AuthorTrustPolicy({sorted(self.authors)!r})"


class SystemTrustPolicy:
    """Trusts deltas whose ``system`` is one of ``systems``."""

    def __init__(self, systems: Iterable[str]) -> None:
        self.systems = frozenset(systems)

    def check(self, delta: Delta) -> str | None:
        if delta.system in self.systems:
            return None
        return f"untrusted system: {delta.system}"

    def to_json(self) -> dict[str, Any]:
        return {"type": "system", "trustedSystems": sorted(self.systems)}

    def __repr__(self) -> str:
        return f"SystemTrustPolicy({sorted(self.systems)!r})"


class CustomTrustPolicy:
    """Trusts deltas for which ``predicate(delta)`` is true.

    ``reason`` is the rejection reason sent to the peer.
    """

    def __init__(
        self, predicate: Callable[[Delta], bool], reason: str = "rejected by custom trust policy"
    ) -> None:
        self.predicate = predicate
        self.reason = reason

    def check(self, delta: Delta) -> str | None:
        return None if self.predicate(delta) else self.reason

    def to_json(self) -> dict[str, Any]:
        return {"type": "custom"}

    def __repr__(self) -> str:
        return f"CustomTrustPolicy({self.predicate!r})"


class CombinedTrustPolicy:
    """Trusts a delta only when every policy does; the first refusal gives the reason."""

    def __init__(self, policies: Iterable[TrustPolicy]) -> None:
        self.policies = tuple(policies)

    def check(self, delta: Delta) -> str | None:
        for policy in self.policies:
            reason = policy.check(delta)
            if reason is not None:
                return reason
        return None

    def to_json(self) -> dict[str, Any]:
        return {"type": "combined", "policies": [p.to_json() for p in self.policies]}

    def __repr__(self) -> str:
        return f"CombinedTrustPolicy({list(self.policies)!r})"


def create_author_trust_policy(authors: Iterable[str]) -> AuthorTrustPolicy:
    """The seed's ``createAuthorTrustPolicy``."""
    return AuthorTrustPolicy(authors)


def create_system_trust_policy(systems: Iterable[str]) -> SystemTrustPolicy:
    """The seed's ``createSystemTrustPolicy``."""
    return SystemTrustPolicy(systems)


def create_custom_trust_policy(
    predicate: Callable[[Delta], bool], reason: str = "rejected by custom trust policy"
) -> CustomTrustPolicy:
    """The seed's ``createCustomTrustPolicy``."""
    return CustomTrustPolicy(predicate, reason)


def combine_trust_policies(*policies: TrustPolicy) -> CombinedTrustPolicy:
    """The seed's ``combineTrustPolicies``: all must pass."""
    return CombinedTrustPolicy(policies)
