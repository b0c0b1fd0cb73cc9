"""The store interface the federation logic calls: small, synchronous, and durable when it says so.

Implementations live in ``rhizome_adapters.storage`` (``MemoryStore``, ``SQLiteStore``). Every
stored delta gets a local sequence number (1, 2, 3, ... in insertion order); scans are keyset
paginated, so streaming a store of any size holds one page in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol, TypeAlias

from ._delta import Delta
from ._filter import DeltaFilter

__all__ = ["DeltaStore", "ScanOrder"]

#: ``"sequence"``: storage order (local sequence numbers ascending).
#: ``"timestamp"``: oldest first by delta timestamp, ties broken by sequence number.
ScanOrder: TypeAlias = Literal["sequence", "timestamp"]


class DeltaStore(Protocol):
    """What ``FederationNode`` calls on a store, and nothing more. All methods are synchronous
    and thread-confined to the caller (adapters call them from one thread or one event loop).

    The adapters' stores offer more (``put``, ``subscribe``, ``close`` ...): see
    ``rhizome_adapters.storage.Store``."""

    def put_many(
        self,
        deltas: Sequence[Delta],
        *,
        validate: bool = True,
        meta: Mapping[str, str] | None = None,
    ) -> list[int | None]:
        """Store each delta unless a delta with its id is stored (the stored one is kept), in
        one durable transaction; results in order: the new sequence number, or ``None`` for a
        delta already there.
        ``validate=False``: the caller guarantees the deltas are valid (decoded by the codec,
        or checked by :func:`validate_delta`), so the store need not check them again.
        ``meta``: values to :meth:`set_meta` in the same transaction (a cursor saved with
        the deltas it covers)."""
        ...

    def get(self, delta_id: str) -> Delta | None:
        """The stored delta with this id, or ``None`` (the node compares a duplicate with it)."""
        ...

    def stored_ids(self, delta_ids: Iterable[str]) -> set[str]:
        """Which of ``delta_ids`` are stored (the node asks once per commit)."""
        ...

    def count(self, filter: DeltaFilter | None = None, *, from_timestamp: float = 0) -> int:
        """How many stored deltas match ``filter`` and have ``timestamp >= from_timestamp``."""
        ...

    def scan(
        self,
        *,
        after: tuple[float, int] | int | None = None,
        filter: DeltaFilter | None = None,
        from_timestamp: float = 0,
        limit: int = 100,
        order: ScanOrder = "sequence",
    ) -> list[tuple[int, Delta]]:
        """Up to ``limit`` ``(seq, delta)`` pairs that match, in ``order``, strictly after the
        position ``after`` (for ``"sequence"`` a sequence number; for ``"timestamp"`` a
        ``(timestamp, seq)`` pair; ``None`` starts at the beginning). The filter honours
        negation by this store's own deltas (``include_negated``)."""
        ...

    def scan_raw(
        self,
        *,
        after: tuple[float, int] | int | None = None,
        filter: DeltaFilter | None = None,
        from_timestamp: float = 0,
        limit: int = 100,
        order: ScanOrder = "sequence",
    ) -> list[tuple[int, float, bytes]]:
        """:meth:`scan`, as ``(seq, timestamp, json)`` with each delta's canonical JSON text
        (what ``encode_value(delta)`` writes): a sync writes it into its batches as it is,
        without decoding and encoding again. A store that keeps the text returns it as kept."""
        ...

    def is_negated(self, delta_id: str) -> bool:
        """Whether a delta in effect in this store negates ``delta_id`` (spec section 2.5)."""
        ...

    def last_sequence(self) -> int:
        """The highest sequence number given so far (0 when empty)."""
        ...

    def get_meta(self, key: str) -> str | None:
        """A value the federation logic keeps in the store (push cursors), or ``None``."""
        ...

    def set_meta(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key``, durably for a durable store."""
        ...
