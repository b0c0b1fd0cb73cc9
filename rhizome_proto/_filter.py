"""``DeltaFilter`` and negation (PROTOCOL.md "DeltaFilter"; RhizomeDB spec section 2.5).

A filter matches a delta when every field that is present matches. Negation needs knowledge of a
store (which deltas negate which), so :meth:`DeltaFilter.matches` takes a predicate
``is_negated(delta_id) -> bool``; :class:`NegationIndex` is the incremental index that answers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from ._delta import Delta, Reference, Timestamp

__all__ = ["NEGATES_ROLE", "DeltaFilter", "NegationIndex", "TimestampRange", "negated_targets"]

#: The pointer role by which a delta negates the delta its reference target names.
NEGATES_ROLE = "negates"


class TimestampRange(msgspec.Struct, frozen=True, omit_defaults=True):
    """An inclusive range ``start <= timestamp <= end``; either bound may be absent."""

    start: Timestamp | None = None
    end: Timestamp | None = None


class DeltaFilter(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """Which deltas a link pushes, pulls or syncs. An empty filter matches every delta.

    Lists are tuples; ``None`` means the field is absent (an empty tuple matches nothing).
    """

    ids: tuple[str, ...] | None = None
    target_ids: tuple[str, ...] | None = None
    target_contexts: tuple[str, ...] | None = None
    authors: tuple[str, ...] | None = None
    systems: tuple[str, ...] | None = None
    timestamp_range: TimestampRange | None = None
    include_negated: bool | None = None

    def matches(self, delta: Delta, is_negated: Callable[[str], bool] | None = None) -> bool:
        """Whether ``delta`` passes this filter.

        ``is_negated`` tells whether a delta id is negated in the store the delta comes from;
        without it no delta counts as negated. Negated deltas are left out unless
        ``include_negated`` is true; negation deltas themselves are never left out for that.
        """
        if self.ids is not None and delta.id not in self.ids:
            return False
        if self.authors is not None and delta.author not in self.authors:
            return False
        if self.systems is not None and delta.system not in self.systems:
            return False
        rng = self.timestamp_range
        if rng is not None:
            if rng.start is not None and delta.timestamp < rng.start:
                return False
            if rng.end is not None and delta.timestamp > rng.end:
                return False
        if self.target_ids is not None and not any(
            isinstance(p.target, Reference) and p.target.id in self.target_ids
            for p in delta.pointers
        ):
            return False
        if self.target_contexts is not None and not any(
            isinstance(p.target, Reference) and p.target.context in self.target_contexts
            for p in delta.pointers
        ):
            return False
        return bool(self.include_negated) or is_negated is None or not is_negated(delta.id)

    def select(
        self, deltas: Iterable[Delta], is_negated: Callable[[str], bool] | None = None
    ) -> list[Delta]:
        """The deltas of ``deltas`` that match, in their order."""
        return [d for d in deltas if self.matches(d, is_negated)]


def negated_targets(delta: Delta) -> list[str]:
    """The ids ``delta`` negates: targets of its pointers with role ``negates``."""
    return [
        p.target.id
        for p in delta.pointers
        if p.role == NEGATES_ROLE and isinstance(p.target, Reference)
    ]


class NegationIndex:
    """Which deltas are negated, built incrementally from the deltas of a store.

    A delta is negated when some delta *in effect* negates it; a negation delta that is itself
    negated is not in effect (double negation restores the original, and so on). Negations that
    form a cycle are resolved by treating the delta where the walk re-enters the cycle as in
    effect. Negations may arrive before the delta they negate.
    """

    MAX_DEPTH = 256

    def __init__(self, deltas: Iterable[Delta] = ()) -> None:
        self._negators: dict[str, set[str]] = {}
        for delta in deltas:
            self.add(delta)

    def add(self, delta: Delta) -> None:
        """Record ``delta``'s negations (a delta without any costs nothing)."""
        for target in negated_targets(delta):
            self._negators.setdefault(target, set()).add(delta.id)

    def __len__(self) -> int:
        """The number of delta ids that have at least one negator."""
        return len(self._negators)

    def is_negated(self, delta_id: str) -> bool:
        """Whether ``delta_id`` is negated by a negation in effect."""
        return self._negated(delta_id, set())

    def _negated(self, delta_id: str, visiting: set[str]) -> bool:
        negators = self._negators.get(delta_id)
        if not negators or len(visiting) >= self.MAX_DEPTH:
            return False
        visiting.add(delta_id)
        try:
            return any(
                n not in visiting and not self._negated(n, visiting) for n in sorted(negators)
            )
        finally:
            visiting.discard(delta_id)
