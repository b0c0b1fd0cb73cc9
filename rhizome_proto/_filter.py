"""``DeltaFilter`` and negation (PROTOCOL.md "DeltaFilter"; RhizomeDB spec section 2.5).

A filter matches a delta when every field that is present matches. Negation needs knowledge of a
store (which deltas negate which), so :meth:`DeltaFilter.matches` takes a predicate
``is_negated(delta_id) -> bool``; :class:`NegationIndex` is the incremental index that answers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, TypeAlias

import msgspec

from ._delta import MAX_TIMESTAMP, Delta, Reference

__all__ = [
    "MAX_NEGATION_DEPTH",
    "NEGATES_ROLE",
    "DeltaFilter",
    "NegationIndex",
    "TimestampRange",
    "negated_targets",
    "resolve_negation",
]

#: The pointer role by which a delta negates the delta its reference target names.
NEGATES_ROLE = "negates"


#: A bound of a ``timestampRange``: any number (PROTOCOL.md), so ``0`` ("from the beginning") and
#: negatives too; integers stay within JavaScript's safe range, like timestamps.
TimestampBound: TypeAlias = (
    Annotated[int, msgspec.Meta(ge=-MAX_TIMESTAMP, le=MAX_TIMESTAMP)] | float
)


class TimestampRange(msgspec.Struct, frozen=True, omit_defaults=True):
    """An inclusive range ``start <= timestamp <= end``; either bound may be absent."""

    start: TimestampBound | None = None
    end: TimestampBound | None = None


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


#: How deep a negation chain is followed; beyond it a delta counts as not negated.
MAX_NEGATION_DEPTH = 256


def resolve_negation(delta_id: str, negators_of: Callable[[str], Iterable[str]]) -> bool:
    """Whether ``delta_id`` is negated, given ``negators_of(id)``: the ids of the deltas that
    negate ``id`` (spec section 2.5, double negation honoured).

    A delta is negated when some negator *in effect* (itself not negated) negates it. The walk
    visits each delta at most once per call (work grows with the size of the negation graph,
    never exponentially), ignores a negator already on its path (a cycle), and treats deltas
    deeper than :data:`MAX_NEGATION_DEPTH` as not negated. Stores answer ``is_negated`` with it.
    """
    memo: dict[str, bool] = {}
    path: set[str] = set()

    def negated(current: str) -> bool:
        known = memo.get(current)
        if known is not None:
            return known
        result = False
        if len(path) < MAX_NEGATION_DEPTH:
            path.add(current)
            for negator in sorted(negators_of(current)):
                if negator not in path and not negated(negator):
                    result = True
                    break
            path.discard(current)
        memo[current] = result
        return result

    return negated(delta_id)


class NegationIndex:
    """Which deltas are negated, built incrementally from the deltas of a store.

    Negations may arrive before the delta they negate. :meth:`is_negated` follows
    :func:`resolve_negation`.
    """

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
        if delta_id not in self._negators:
            return False
        return resolve_negation(delta_id, lambda i: self._negators.get(i, ()))
