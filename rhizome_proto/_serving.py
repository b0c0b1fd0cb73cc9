"""The node's two streams from the store, each a small machine of its own.

* :class:`SyncServer`: serving one initial sync (server side) from the store, in batches bounded
  by count and bytes, one page in memory.
* :class:`PushCatchUp`: an outgoing link offering the peer the stored deltas it may have missed
  (after a restart, from the durable push cursor), or any link that fell behind (its queue
  reached ``max_queued``) catching up from the store instead of queueing.

Both read the store and decide what to send; :class:`~rhizome_proto.FederationNode` sends it on
the link's connection and reports what they found (a delta too large to send). No I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

import msgspec

from ._delta import Delta
from ._filter import DeltaFilter
from ._store import DeltaStore, ScanOrder

__all__ = ["PushCatchUp", "PushState", "ServeState", "ServedBatch", "SyncServer"]

#: A position in a sync: ``seq`` in storage order, ``(timestamp, seq)`` in timestamp order.
Position: TypeAlias = tuple[float, int] | int
_encode = msgspec.json.Encoder().encode
#: Deltas per page when counting a sync the store cannot count alone.
_COUNT_PAGE = 1000


class ServeState(Enum):
    """Where a :class:`SyncServer` is."""

    #: batches remain to send (:meth:`SyncServer.next_batch`)
    STREAMING = "streaming"
    #: the last batch has been made: the sync is complete
    DONE = "done"
    #: the connection ended before the last batch
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class ServedBatch:
    """What :meth:`SyncServer.next_batch` made.

    ``deltas``: the stored text of each delta of the batch. ``send``: whether a ``sync_batch``
    goes out (an empty one is sent only as the last batch of a sync that sent some before).
    ``last``: the sync is complete after it (``sync_complete`` follows). ``cursor``: extension
    ``cursor``, the position after the batch. ``too_large``: the stored text of deltas skipped
    because no message the peer accepts can carry them (to report; never retried).
    """

    deltas: list[msgspec.Raw]
    send: bool
    last: bool
    cursor: str | None
    too_large: list[bytes]


class SyncServer:
    """Serves one initial sync from ``store``, oldest first, one page in memory.

    Parameters:
        store: where the deltas are.
        filters: every filter a delta must match (the first is pushed down to the store).
        from_timestamp: only deltas with ``timestamp >= from_timestamp``.
        cursor: extension ``cursor``: stream in storage order and give each batch the position
            after it, as ``"{store_id}:{seq}"``.
        after: resume after this sequence number (a client's cursor of this store).
        store_id: this store's identity in cursors (with ``cursor``).
        batch_size: most deltas per batch.
        max_batch_bytes: most bytes of deltas per batch (a batch holds at least one delta).
        max_delta_bytes: a delta larger than this cannot be carried: it is skipped.

    The total is counted when it is made (:attr:`total`); :attr:`sent` counts the deltas handed
    out so far.
    """

    def __init__(
        self,
        store: DeltaStore,
        *,
        filters: tuple[DeltaFilter, ...] = (),
        from_timestamp: float = 0,
        cursor: bool = False,
        after: int | None = None,
        store_id: str = "",
        batch_size: int,
        max_batch_bytes: int,
        max_delta_bytes: int,
    ) -> None:
        self.store = store
        self.filters = filters
        self.from_timestamp = from_timestamp
        self.cursor = cursor
        self.order: ScanOrder = "sequence" if cursor else "timestamp"
        self.store_id = store_id
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.max_delta_bytes = max_delta_bytes
        #: the position of the last delta handed out or skipped (``None``: the beginning)
        self.position: Position | None = after
        self.state = ServeState.STREAMING
        #: deltas handed out in batches so far
        self.sent = 0
        #: deltas this sync sends (those too large included)
        self.total = self._count()

    @property
    def streaming(self) -> bool:
        return self.state is ServeState.STREAMING

    def abort(self) -> None:
        """The connection ended: nothing more to send."""
        if self.state is ServeState.STREAMING:
            self.state = ServeState.ABORTED

    def next_batch(self) -> ServedBatch:
        """The next batch: at most ``batch_size`` deltas and ``max_batch_bytes`` of them (at
        least one); ``last`` on the final one (found by looking one delta ahead), after which
        the sync is ``DONE``. Only while ``STREAMING``."""
        if self.state is not ServeState.STREAMING:
            raise RuntimeError(f"no batch to make: the sync is {self.state.value}")
        batch: list[msgspec.Raw] = []
        too_large: list[bytes] = []
        size = 0
        finished = full = False
        limit, max_delta, max_bytes = self.batch_size, self.max_delta_bytes, self.max_batch_bytes
        while not full and len(batch) < limit:
            page = self._page(self.position, limit - len(batch))
            if page is None:
                finished = True
                break
            end, items = page
            for position, text in items:
                length = len(text) + 1
                if length > max_delta:
                    self.position = position
                    too_large.append(text)
                    continue
                if batch and size + length > max_bytes:
                    full = True
                    break
                batch.append(msgspec.Raw(text))
                size += length
                self.position = position
            else:
                self.position = end
        if not finished:  # look ahead, so the last batch carries the flag
            finished = self._page(self.position, 1) is None
        cursor = None
        if self.cursor:
            after = self.position
            seq = after if isinstance(after, int) else self.store.last_sequence()
            cursor = f"{self.store_id}:{seq}"
        send = bool(batch) or (finished and self.sent > 0)
        self.sent += len(batch)
        if finished:
            self.state = ServeState.DONE
        return ServedBatch(batch, send, finished, cursor, too_large)

    def _count(self) -> int:
        """How many deltas the sync will send (pages through the store when the store cannot
        count it alone: several filters, or a resumed position)."""
        filters = self.filters
        if len(filters) <= 1 and self.position is None:
            return self.store.count(
                filters[0] if filters else None, from_timestamp=self.from_timestamp
            )
        total, after = 0, self.position
        while True:
            page = self._page(after, _COUNT_PAGE)
            if page is None:
                return total
            after, items = page
            total += len(items)

    def _page(
        self, after: Position | None, limit: int
    ) -> tuple[Position, list[tuple[Position, bytes]]] | None:
        """One page of the deltas the sync sends, in its order, as ``(position, json)``, and
        the position after the page; ``None`` past the end. One filter is left to the store,
        which hands back its stored text; more are checked here on decoded deltas."""
        filters, order, store = self.filters, self.order, self.store
        if len(filters) <= 1:
            raw = store.scan_raw(
                after=after,
                filter=filters[0] if filters else None,
                from_timestamp=self.from_timestamp,
                limit=limit,
                order=order,
            )
            if not raw:
                return None
            if order == "sequence":
                items: list[tuple[Position, bytes]] = [(seq, text) for seq, _, text in raw]
            else:
                items = [((timestamp, seq), text) for seq, timestamp, text in raw]
            return items[-1][0], items
        rows = store.scan(
            after=after,
            filter=filters[0],
            from_timestamp=self.from_timestamp,
            limit=limit,
            order=order,
        )
        if not rows:
            return None
        is_negated = store.is_negated
        items = [
            (seq if order == "sequence" else (d.timestamp, seq), _encode(d))
            for seq, d in rows
            if all(f.matches(d, is_negated) for f in filters[1:])
        ]
        last_seq, last = rows[-1]
        return (last_seq if order == "sequence" else (last.timestamp, last_seq)), items


class PushState(Enum):
    """Where a :class:`PushCatchUp` is."""

    #: nothing to catch up: stored deltas are queued on the connection as they come
    IDLE = "idle"
    #: store positions ``(after, upto]`` are still to offer, in storage order
    CATCHING_UP = "catching_up"


class PushCatchUp:
    """A link's catch-up from the store: offer the peer the stored deltas of positions
    ``(after, upto]`` (storage order), a page at a time, within the caller's in-flight room.

    Entered when an outgoing link connects with a durable push cursor behind the store
    (:meth:`start`), or when a link's queue overflowed (:meth:`overflow`); while catching up,
    each new stored delta only moves ``upto`` (:meth:`extend`): the store has it, in order.
    Deltas the peer already holds are acknowledged and ignored by it.
    """

    __slots__ = ("after", "saved_at", "state", "upto")

    def __init__(self) -> None:
        self.state = PushState.IDLE
        #: the last position offered (or skipped)
        self.after = 0
        #: the last position to offer
        self.upto = 0
        #: when the link's durable push cursor was last saved (the node's clock, ms)
        self.saved_at: float = 0

    @property
    def active(self) -> bool:
        return self.state is PushState.CATCHING_UP

    @property
    def remaining(self) -> int:
        """Store positions still to look at (an upper bound of the deltas to offer)."""
        return self.upto - self.after if self.state is PushState.CATCHING_UP else 0

    def start(self, after: int, upto: int) -> None:
        """A new connection: catch up on ``(after, upto]`` if it is not empty, else idle."""
        if after < upto:
            self.state, self.after, self.upto = PushState.CATCHING_UP, after, upto
        else:
            self.state, self.after, self.upto = PushState.IDLE, 0, 0

    def overflow(self, seq: int) -> None:
        """The link's queue is full: the stored delta at ``seq`` (and what follows) is offered
        from the store instead."""
        self.state, self.after, self.upto = PushState.CATCHING_UP, seq - 1, seq

    def extend(self, seq: int) -> None:
        """A delta was stored at ``seq`` while catching up: it is offered in its turn."""
        if seq > self.upto:
            self.upto = seq

    def take(self, store: DeltaStore, limit: int) -> list[Delta]:
        """The next stored deltas to offer, at most ``limit``; ``IDLE`` once past ``upto``."""
        if self.state is not PushState.CATCHING_UP:
            return []
        rows = store.scan(after=self.after, limit=limit, order="sequence")
        out: list[Delta] = []
        upto = self.upto
        for seq, delta in rows:
            if seq > upto:
                break
            self.after = seq
            out.append(delta)
        if not rows or self.after >= upto or rows[-1][0] > upto:
            self.state, self.after, self.upto = PushState.IDLE, 0, 0
        return out
