"""Delta stores for the adapters: the :class:`Store` protocol, ``MemoryStore`` and ``SQLiteStore``.

Both give every new delta the next local sequence number (1, 2, 3, ...), ignore a delta whose id
is already stored, answer keyset-paginated scans in sequence or timestamp order, honour negation
(spec section 2.5, double negation included) and notify subscribers after each new delta.

``scan`` and ``count`` with ``filter=None`` apply no filter at all: every stored delta counts,
negated or not. With a :class:`~rhizome_proto.DeltaFilter` (even an empty one) the filter's rules
apply, including leaving out negated deltas unless ``include_negated`` is true.

Stores are thread-confined: use a store from one thread (or one event loop) at a time.
"""

from __future__ import annotations

import bisect
import functools
import os
import sqlite3
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice, pairwise
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeAlias

import msgspec

from rhizome_proto import (
    NEGATES_ROLE,
    Delta,
    DeltaFilter,
    DeltaStore,
    NegationIndex,
    ScanOrder,
    negated_targets,
    resolve_negation,
    validate_delta,
)

__all__ = ["MemoryStore", "SQLiteStore", "Store", "StoreCallback", "open_store"]

#: What :meth:`MemoryStore.subscribe` and :meth:`SQLiteStore.subscribe` accept.
StoreCallback: TypeAlias = Callable[[int, Delta], None]


class Store(DeltaStore, Protocol):
    """A store an adapter (``FederatedRhizomeDB``) runs on: what the core's
    :class:`~rhizome_proto.DeltaStore` asks for, plus what applications and the adapters call.
    ``MemoryStore`` and ``SQLiteStore`` are both; pass your own as ``store=``."""

    def put(self, delta: Delta) -> int | None:
        """Store ``delta`` unless a delta with its id is stored; return its new sequence number,
        or ``None`` when it was already there (the stored one is kept). Durable on return."""
        ...

    def __len__(self) -> int:
        """How many deltas are stored."""
        ...

    def __contains__(self, delta_id: object) -> bool:
        """Whether a delta with this id is stored."""
        ...

    def subscribe(self, callback: StoreCallback) -> Callable[[], None]:
        """Call ``callback(seq, delta)`` after each new delta is stored; returns unsubscribe."""
        ...

    def close(self) -> None:
        """Release resources; further calls may fail."""
        ...


#: Where a scan starts, checked: the sequence number a ``"sequence"`` scan continues after (0 for
#: the beginning) and the ``(timestamp, seq)`` pair a ``"timestamp"`` scan continues after
#: (``None`` for the beginning).
_Start: TypeAlias = tuple[int, tuple[float, int] | None]
_BEGINNING: Final[_Start] = (0, None)

_encoder: Final = msgspec.json.Encoder()
_encode: Final = _encoder.encode
#: Typed decoder for stored bodies: int timestamps stay int, float timestamps stay float.
_decoder: Final = msgspec.json.Decoder(Delta)

#: Rows fetched per query when some of a filter must be checked in Python.
_PAGE_SIZE: Final = 256
#: Up to this many values, an ``IN`` list is sent as bound parameters; beyond, as one JSON array.
_MAX_IN_PARAMS: Final = 500
#: The schema version kept in ``PRAGMA user_version``.
_SCHEMA_VERSION: Final = 2


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def _start(after: tuple[float, int] | int | None, order: str) -> _Start:
    """Check ``after`` and ``order`` (raising ``TypeError`` / ``ValueError``) and return where
    the scan starts."""
    if order == "sequence":
        if after is None:
            return _BEGINNING
        if isinstance(after, bool) or not isinstance(after, int):
            raise TypeError(f"after must be a sequence number for order='sequence', got {after!r}")
        return (after, None)
    if order == "timestamp":
        if after is None:
            return _BEGINNING
        if not isinstance(after, tuple | list) or len(after) != 2:
            raise TypeError(
                f"after must be a (timestamp, seq) pair for order='timestamp', got {after!r}"
            )
        timestamp, seq = after
        return (0, (timestamp, seq))
    raise ValueError(f"order must be 'sequence' or 'timestamp', got {order!r}")


def _scan_start(after: tuple[float, int] | int | None, order: str, limit: int) -> _Start | None:
    """:func:`_start` for a scan of at most ``limit`` (checked too); ``None`` when the scan
    can only be empty (``limit == 0``)."""
    start = _start(after, order)
    _check_limit(limit)
    return start if limit else None


def _matches_nothing(flt: DeltaFilter) -> bool:
    """Whether a list field of ``flt`` is empty, so that no delta can match."""
    return any(
        values is not None and len(values) == 0
        for values in (flt.ids, flt.authors, flt.systems, flt.target_ids, flt.target_contexts)
    )


def _applies_negation(flt: DeltaFilter | None) -> bool:
    """Whether scanning with ``flt`` leaves out negated deltas."""
    return flt is not None and not flt.include_negated


def _lower_timestamp(flt: DeltaFilter | None, from_timestamp: float) -> float:
    """The lowest timestamp a delta may have to match ``flt`` and ``from_timestamp``."""
    if flt is not None and flt.timestamp_range is not None:
        start = flt.timestamp_range.start
        if start is not None and start > from_timestamp:
            return start
    return from_timestamp


class _Subscribers:
    """Callbacks to call after each new delta, in subscription order."""

    def __init__(self) -> None:
        self._callbacks: dict[int, StoreCallback] = {}
        self._next_token = 0

    def subscribe(self, callback: StoreCallback) -> Callable[[], None]:
        token = self._next_token
        self._next_token += 1
        self._callbacks[token] = callback

        def unsubscribe() -> None:
            self._callbacks.pop(token, None)

        return unsubscribe

    def notify(self, stored: Iterable[tuple[int, Delta]]) -> None:
        """Call every callback for every ``(seq, delta)``; then re-raise the first exception.

        A failing callback does not keep the others from being called; the deltas are stored
        whatever the callbacks do.
        """
        if not self._callbacks:
            return
        first_error: BaseException | None = None
        for seq, delta in stored:
            for callback in list(self._callbacks.values()):
                try:
                    callback(seq, delta)
                except Exception as exc:
                    if first_error is None:
                        first_error = exc
        if first_error is not None:
            raise first_error

    def clear(self) -> None:
        self._callbacks.clear()


def _needs_delta(flt: DeltaFilter) -> bool:
    """Whether checking ``flt`` needs more of a delta than its id and timestamp."""
    return any(
        values is not None
        for values in (flt.authors, flt.systems, flt.target_ids, flt.target_contexts)
    )


class MemoryStore:
    """A :class:`~rhizome_proto.DeltaStore` held in memory (lost when the process ends).

    Keeps no delta objects: per delta, its canonical JSON text (what :meth:`scan_raw` returns,
    as kept), and in columns indexed by ``seq - 1`` its id and its timestamp (an ``array("d")``,
    exact for every valid timestamp, and a byte telling an int from a float); a dict from id to
    text; and a :class:`~rhizome_proto.NegationIndex`. Deltas are decoded when read (``get``,
    ``scan``, and filters on authors, systems or targets; ids, timestamps and negation are
    checked without decoding). The ``(timestamp, seq)`` order is built by the first scan or
    count that needs it and kept up to date after that. A million deltas of 260 bytes of JSON
    take about 440 MB. ``put`` is "durable on return" only in the sense that the delta is
    visible to every later call.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, bytes] = {}
        self._ids: list[str] = []
        self._texts: list[bytes] = []
        self._timestamps: array[float] = array("d")
        #: 1 where the timestamp was an int, 0 where it was a float
        self._int_timestamps = bytearray()
        #: indices (``seq - 1``) sorted by ``(timestamp, seq)``; ``None`` until a scan needs it
        self._by_timestamp: array[int] | None = None
        self._negations = NegationIndex()
        self._subscribers = _Subscribers()
        self._meta: dict[str, str] = {}

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def put(self, delta: Delta) -> int | None:
        """Store ``delta`` unless its id is stored; return its sequence number or ``None``.

        Raises :class:`~rhizome_proto.InvalidDeltaError` (storing nothing) when ``delta`` breaks
        a rule of spec section 2.1.1.
        """
        return self.put_many((delta,))[0]

    def put_many(
        self,
        deltas: Iterable[Delta],
        *,
        validate: bool = True,
        meta: Mapping[str, str] | None = None,
    ) -> list[int | None]:
        """Store each delta as :meth:`put` would; return their sequence numbers (``None`` for
        ids already stored, including repeats within ``deltas``); ``meta`` is set with them.

        Every delta is validated first: when one is invalid, nothing is stored.
        ``validate=False`` skips that for deltas known valid (decoded by the codec).
        """
        valid = [validate_delta(d) for d in deltas] if validate else list(deltas)
        results: list[int | None] = []
        stored: list[tuple[int, Delta]] = []
        by_id, ids, texts = self._by_id, self._ids, self._texts
        timestamps, ints, by_timestamp = self._timestamps, self._int_timestamps, self._by_timestamp
        latest = timestamps[by_timestamp[-1]] if by_timestamp else 0.0
        add_negations = self._negations.add
        for delta in valid:
            delta_id = delta.id
            if delta_id in by_id:
                results.append(None)
                continue
            text = _encode(delta)  # first: a delta it cannot encode changes nothing
            timestamp = delta.timestamp
            index = len(texts)
            timestamps.append(timestamp)
            ints.append(isinstance(timestamp, int))
            ids.append(delta_id)
            texts.append(text)
            by_id[delta_id] = text
            if by_timestamp is not None:
                if timestamp >= latest:
                    by_timestamp.append(index)
                    latest = timestamp
                else:
                    bisect.insort(by_timestamp, index, key=timestamps.__getitem__)
            add_negations(delta)
            results.append(index + 1)
            stored.append((index + 1, delta))
        if meta:
            self._meta.update(meta)
        self._subscribers.notify(stored)
        return results

    def stored_ids(self, delta_ids: Iterable[str]) -> set[str]:
        """Which of ``delta_ids`` are stored."""
        return {delta_id for delta_id in delta_ids if delta_id in self._by_id}

    def get(self, delta_id: str) -> Delta | None:
        """The stored delta with this id (decoded from its text), or ``None``."""
        text = self._by_id.get(delta_id)
        return None if text is None else _decoder.decode(text)

    def __contains__(self, delta_id: object) -> bool:
        """Whether a delta with this id is stored."""
        return isinstance(delta_id, str) and delta_id in self._by_id

    def __len__(self) -> int:
        """The number of stored deltas."""
        return len(self._texts)

    def last_sequence(self) -> int:
        """The highest sequence number given so far (0 when empty)."""
        return len(self._texts)

    def is_negated(self, delta_id: str) -> bool:
        """Whether a delta in effect in this store negates ``delta_id`` (spec section 2.5)."""
        return self._negations.is_negated(delta_id)

    def count(self, filter: DeltaFilter | None = None, *, from_timestamp: float = 0) -> int:
        """How many stored deltas match ``filter`` and have ``timestamp >= from_timestamp``.

        ``filter=None`` counts every delta, negated or not.
        """
        if filter is None:
            if from_timestamp <= 0:
                return len(self._texts)
            by_timestamp = self._timestamp_order()
            first = bisect.bisect_left(
                by_timestamp, from_timestamp, key=self._timestamps.__getitem__
            )
            return len(by_timestamp) - first
        return sum(1 for _ in self._matching(_BEGINNING, filter, from_timestamp, "sequence"))

    def scan(
        self,
        *,
        after: tuple[float, int] | int | None = None,
        filter: DeltaFilter | None = None,
        from_timestamp: float = 0,
        limit: int = 100,
        order: ScanOrder = "sequence",
    ) -> list[tuple[int, Delta]]:
        """Up to ``limit`` ``(seq, delta)`` pairs that match, in ``order``, strictly after
        ``after`` (a sequence number for ``"sequence"``, a ``(timestamp, seq)`` pair for
        ``"timestamp"``, ``None`` for the beginning). ``filter=None`` applies no filter at all;
        a filter leaves out deltas negated in this store unless ``include_negated`` is true."""
        start = _scan_start(after, order, limit)
        if start is None:
            return []
        texts = self._texts
        return [
            (index + 1, _decoder.decode(texts[index]) if delta is None else delta)
            for index, delta in islice(self._matching(start, filter, from_timestamp, order), limit)
        ]

    def scan_raw(
        self,
        *,
        after: tuple[float, int] | int | None = None,
        filter: DeltaFilter | None = None,
        from_timestamp: float = 0,
        limit: int = 100,
        order: ScanOrder = "sequence",
    ) -> list[tuple[int, float, bytes]]:
        """:meth:`scan` as ``(seq, timestamp, json)``: each delta's JSON text as kept (the
        timestamp an int or a float as given), decoded only for filters on authors, systems
        or targets."""
        start = _scan_start(after, order, limit)
        if start is None:
            return []
        timestamps, ints, texts = self._timestamps, self._int_timestamps, self._texts
        return [
            (index + 1, int(timestamps[index]) if ints[index] else timestamps[index], texts[index])
            for index, _ in islice(self._matching(start, filter, from_timestamp, order), limit)
        ]

    def _timestamp_order(self) -> array[int]:
        """The indices (``seq - 1``) sorted by ``(timestamp, seq)``, built on first use and then
        kept up to date by :meth:`put_many`."""
        if self._by_timestamp is None:
            timestamps = self._timestamps
            indices = range(len(timestamps))
            if all(a <= b for a, b in pairwise(timestamps)):  # the usual arrival order
                self._by_timestamp = array("q", indices)
            else:  # the sort is stable: equal timestamps stay in sequence order
                self._by_timestamp = array("q", sorted(indices, key=timestamps.__getitem__))
        return self._by_timestamp

    def _candidates(self, start: _Start, lower: float, order: ScanOrder) -> Iterator[int]:
        """The index (``seq - 1``) of every stored delta past ``start``, in ``order``; for
        ``"timestamp"``, starting at the first delta with ``timestamp >= lower``."""
        seq_position, ts_position = start
        if order == "sequence":
            return iter(range(max(seq_position, 0), len(self._texts)))
        by_timestamp = self._timestamp_order()
        timestamps = self._timestamps
        first = bisect.bisect_left(by_timestamp, lower, key=timestamps.__getitem__)
        if ts_position is not None:
            after = bisect.bisect_right(
                by_timestamp, ts_position, key=lambda index: (timestamps[index], index + 1)
            )
            first = max(first, after)
        return map(by_timestamp.__getitem__, range(first, len(by_timestamp)))

    def _matching(
        self, start: _Start, flt: DeltaFilter | None, from_timestamp: float, order: ScanOrder
    ) -> Iterator[tuple[int, Delta | None]]:
        """Every matching stored delta past ``start``, in ``order``, as ``(index, delta)``:
        ``index`` is ``seq - 1``; ``delta`` is the decoded delta when the filter needed it,
        else ``None`` (ids, timestamps and negation are checked without decoding)."""
        if flt is not None and _matches_nothing(flt):
            return
        lower = _lower_timestamp(flt, from_timestamp)
        upper = None if flt is None or flt.timestamp_range is None else flt.timestamp_range.end
        wanted = None if flt is None or flt.ids is None else frozenset(flt.ids)
        is_negated = self._negations.is_negated if _applies_negation(flt) else None
        check = flt.matches if flt is not None and _needs_delta(flt) else None
        timestamps, ids, texts = self._timestamps, self._ids, self._texts
        for index in self._candidates(start, lower, order):
            timestamp = timestamps[index]
            if timestamp < lower or (upper is not None and timestamp > upper):
                continue
            if wanted is not None and ids[index] not in wanted:
                continue
            if is_negated is not None and is_negated(ids[index]):
                continue
            if check is None:
                yield index, None
                continue
            delta = _decoder.decode(texts[index])
            if check(delta):  # negation is checked above
                yield index, delta

    def subscribe(self, callback: StoreCallback) -> Callable[[], None]:
        """Call ``callback(seq, delta)`` after each new delta (not for ignored duplicates);
        returns a function that unsubscribes. An exception from a callback propagates to the
        caller of ``put`` after every callback ran; the delta stays stored."""
        return self._subscribers.subscribe(callback)

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key`` by :meth:`set_meta`, or ``None``."""
        return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (replacing any previous value)."""
        self._meta[key] = value

    def close(self) -> None:
        """Drop the subscribers; the deltas stay readable."""
        self._subscribers.clear()


#: SQL, for a row of ``deltas``: whether some stored delta negates it (it has negators).
_HAS_NEGATORS: Final = "EXISTS (SELECT 1 FROM negations WHERE negations.target = deltas.id)"

#: The tables and indexes of the current schema. ``seq`` is the rowid (no ``AUTOINCREMENT``:
#: nothing is ever deleted, so SQLite's next rowid, the highest plus one, is the next sequence
#: number, and a row ignored as a duplicate uses none). The timestamp index holds
#: ``(timestamp, rowid)``: the ``(timestamp, seq)`` order. Authors and systems are not indexed:
#: a filter on them is checked by SQL on each row of the scan (an index made every insert
#: dearer and could make SQLite sort each page of a timestamp-ordered scan: quadratic).
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS deltas (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        timestamp NOT NULL,
        author,
        system,
        body BLOB
    )""",
    "CREATE INDEX IF NOT EXISTS deltas_timestamp ON deltas (timestamp)",
    """CREATE TABLE IF NOT EXISTS negations (
        target TEXT NOT NULL,
        negator TEXT NOT NULL,
        PRIMARY KEY (target, negator)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
)

#: From schema version 1 (``seq ... AUTOINCREMENT``, indexes on ``(timestamp, seq)``, author
#: and system) to 2: the deltas move to a table of the current schema, in one transaction.
_MIGRATE_FROM_1: Final = (
    "DROP INDEX IF EXISTS deltas_timestamp",
    "DROP INDEX IF EXISTS deltas_author",
    "DROP INDEX IF EXISTS deltas_system",
    "ALTER TABLE deltas RENAME TO deltas_v1",
    *_SCHEMA,
    "INSERT INTO deltas (seq, id, timestamp, author, system, body) "
    "SELECT seq, id, timestamp, author, system, body FROM deltas_v1 ORDER BY seq",
    "DROP TABLE deltas_v1",
)

#: Rows of ``deltas`` per ``INSERT`` of :meth:`SQLiteStore.put_many` (one statement of many
#: rows costs less than ``executemany`` of one; 500 parameters stay under the 999 that SQLite
#: before 3.32 allows).
_ROWS_PER_INSERT: Final = 100


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert(rows: int) -> str:
    """An ``INSERT`` of ``rows`` rows of ``deltas`` (SQLite numbers them; known ids are
    ignored)."""
    values = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    return f"INSERT OR IGNORE INTO deltas (id, timestamp, author, system, body) VALUES {values}"


#: What the JSON text of a delta holds when a pointer has the role ``negates`` (only then can
#: it negate anything): inside a JSON string the quotes would be escaped.
_NEGATES_KEY: Final = _encode({"role": NEGATES_ROLE})[1:-1]

_SYNCHRONOUS: Final = ("FULL", "NORMAL")


class SQLiteStore:
    """A :class:`~rhizome_proto.DeltaStore` kept in an SQLite file (WAL mode).

    Table ``deltas`` holds one row per delta (``seq`` is its local sequence number, ``body`` its
    JSON encoding; ``timestamp`` is indexed, ``author`` and ``system`` are columns SQL filters
    on), ``negations`` one row per ``(target, negator)`` pair of a negating delta and ``meta``
    small key-value settings. ``PRAGMA user_version`` is the schema version; an older file is
    migrated when opened.
    Every ``put`` / ``put_many`` is one ``BEGIN IMMEDIATE`` transaction, durable on return with
    ``synchronous="FULL"`` (the default); ``"NORMAL"`` may lose the last transactions on power
    loss but never corrupts the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self.path = os.fspath(path)
        self._subscribers = _Subscribers()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._setup(synchronous)
        except BaseException:
            self._conn.close()
            raise
        self._json_each = self._has_json_each()

    def _setup(self, synchronous: str) -> None:
        """Check the schema version, switch to WAL, and create the tables in a new file or
        migrate an older one (in one transaction: a crash leaves the old schema)."""
        version = self._schema_version()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        if version == _SCHEMA_VERSION:
            return
        with _Transaction(self._conn):
            version = self._schema_version()  # another process may have migrated it meanwhile
            if version == _SCHEMA_VERSION:
                return
            for statement in _MIGRATE_FROM_1 if version == 1 else _SCHEMA:
                self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _schema_version(self) -> int:
        """The file's schema version (0: a new file); ``ValueError`` if newer than ours."""
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > _SCHEMA_VERSION:
            raise ValueError(
                f"{self.path} has schema version {version}, newer than this version of "
                f"rhizome-federation supports ({_SCHEMA_VERSION})"
            )
        return version

    def _has_json_each(self) -> bool:
        """Whether this SQLite has the JSON functions (``json_each``)."""
        try:
            self._conn.execute("SELECT value FROM json_each('[]')").fetchall()
        except sqlite3.OperationalError:
            return False
        return True

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def put(self, delta: Delta) -> int | None:
        """Store ``delta`` unless its id is stored; return its sequence number or ``None``.

        Durable on return. Raises :class:`~rhizome_proto.InvalidDeltaError` (storing nothing)
        when ``delta`` breaks a rule of spec section 2.1.1.
        """
        return self.put_many((delta,))[0]

    def put_many(
        self,
        deltas: Iterable[Delta],
        *,
        validate: bool = True,
        meta: Mapping[str, str] | None = None,
    ) -> list[int | None]:
        """Store each delta as :meth:`put` would, in one transaction; return their sequence
        numbers (``None`` for ids already stored, including repeats within ``deltas``).
        ``meta`` is set in the same transaction.

        Every delta is validated first: when one is invalid, nothing is stored
        (``validate=False`` skips that for deltas known valid, e.g. decoded by the codec). A
        crash stores all of the batch or none of it.
        """
        valid = [validate_delta(d) for d in deltas] if validate else list(deltas)
        # one row per id (the first delta with it); SQLite ignores the ids it holds
        rows: list[tuple[str, float, str, str, bytes]] = []
        firsts: list[int] = []  # the index in ``valid`` of each row
        seen: set[str] = set()
        for index, delta in enumerate(valid):
            delta_id = delta.id
            if delta_id in seen:
                continue
            seen.add(delta_id)
            rows.append((delta_id, delta.timestamp, delta.author, delta.system, _encode(delta)))
            firsts.append(index)
        results: list[int | None] = [None] * len(valid)
        conn = self._conn
        with _Transaction(conn):
            last = self.last_sequence()
            before = conn.total_changes
            for begin in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[begin : begin + _ROWS_PER_INSERT]
                conn.execute(_insert(len(chunk)), [value for row in chunk for value in row])
            if conn.total_changes - before == len(rows):  # all new: numbered in order
                for seq, index in enumerate(firsts, last + 1):
                    results[index] = seq
            else:
                numbered = dict(conn.execute("SELECT id, seq FROM deltas WHERE seq > ?", (last,)))
                for (delta_id, *_), index in zip(rows, firsts, strict=True):
                    results[index] = numbered.get(delta_id)
            negations = [
                (target, row[0])
                for row, index in zip(rows, firsts, strict=True)
                if _NEGATES_KEY in row[4] and results[index] is not None
                for target in sorted(set(negated_targets(valid[index])))
            ]
            if negations:
                conn.executemany(
                    "INSERT OR IGNORE INTO negations (target, negator) VALUES (?, ?)", negations
                )
            if meta:
                conn.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items()
                )
        self._subscribers.notify(
            (seq, delta) for seq, delta in zip(results, valid, strict=True) if seq is not None
        )
        return results

    def stored_ids(self, delta_ids: Iterable[str]) -> set[str]:
        """Which of ``delta_ids`` are stored (one query per 500 ids)."""
        return self._stored_ids(set(delta_ids))

    def _stored_ids(self, delta_ids: set[str]) -> set[str]:
        """The ids of ``delta_ids`` that are stored."""
        wanted = sorted(delta_ids)
        found: set[str] = set()
        for begin in range(0, len(wanted), _MAX_IN_PARAMS):
            chunk = wanted[begin : begin + _MAX_IN_PARAMS]
            rows = self._conn.execute(
                f"SELECT id FROM deltas WHERE id IN ({', '.join('?' * len(chunk))})", chunk
            )
            found.update(str(row[0]) for row in rows)
        return found

    def get(self, delta_id: str) -> Delta | None:
        """The stored delta with this id, or ``None``."""
        row = self._conn.execute("SELECT body FROM deltas WHERE id = ?", (delta_id,)).fetchone()
        if row is None:
            return None
        found: Delta = _decoder.decode(row[0])
        return found

    def __contains__(self, delta_id: object) -> bool:
        """Whether a delta with this id is stored."""
        if not isinstance(delta_id, str):
            return False
        row = self._conn.execute("SELECT 1 FROM deltas WHERE id = ?", (delta_id,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        """The number of stored deltas."""
        return int(self._conn.execute("SELECT COUNT(*) FROM deltas").fetchone()[0])

    def last_sequence(self) -> int:
        """The highest sequence number given so far (0 when empty)."""
        row = self._conn.execute("SELECT MAX(seq) FROM deltas").fetchone()
        return 0 if row[0] is None else int(row[0])

    def is_negated(self, delta_id: str) -> bool:
        """Whether a delta in effect in this store negates ``delta_id`` (spec section 2.5).

        :func:`~rhizome_proto.resolve_negation` over the ``negations`` table, reading only the
        negators the walk needs.
        """
        return resolve_negation(delta_id, self._negators)

    def _negators(self, delta_id: str) -> list[str]:
        """The ids of the stored deltas negating ``delta_id``, sorted as Python sorts them."""
        rows = self._conn.execute("SELECT negator FROM negations WHERE target = ?", (delta_id,))
        return sorted(str(row[0]) for row in rows)

    def count(self, filter: DeltaFilter | None = None, *, from_timestamp: float = 0) -> int:
        """How many stored deltas match ``filter`` and have ``timestamp >= from_timestamp``.

        ``filter=None`` counts every delta, negated or not. Uses SQL ``COUNT`` for what SQL can
        decide and checks only the remaining rows in Python, a page at a time.
        """
        if filter is None:
            sql = "SELECT COUNT(*) FROM deltas WHERE timestamp >= ?"
            return int(self._conn.execute(sql, (from_timestamp,)).fetchone()[0])
        if _matches_nothing(filter):
            return 0
        clauses, params, exact = self._pushdown(filter, from_timestamp)
        if not exact:
            return sum(1 for _ in self._matching(_BEGINNING, filter, from_timestamp, "sequence"))
        if filter.include_negated:
            return self._sql_count(clauses, params)
        # Deltas nobody negates match outright; only those with negators need the negation walk.
        plain = self._sql_count([*clauses, f"NOT {_HAS_NEGATORS}"], params)
        rest = self._matching(
            _BEGINNING, filter, from_timestamp, "sequence", extra_clause=_HAS_NEGATORS
        )
        return plain + sum(1 for _ in rest)

    def _sql_count(self, clauses: list[str], params: list[object]) -> int:
        where = " AND ".join(clauses) if clauses else "1"
        row = self._conn.execute(f"SELECT COUNT(*) FROM deltas WHERE {where}", params).fetchone()
        return int(row[0])

    def scan(
        self,
        *,
        after: tuple[float, int] | int | None = None,
        filter: DeltaFilter | None = None,
        from_timestamp: float = 0,
        limit: int = 100,
        order: ScanOrder = "sequence",
    ) -> list[tuple[int, Delta]]:
        """Up to ``limit`` ``(seq, delta)`` pairs that match, in ``order``, strictly after
        ``after`` (a sequence number for ``"sequence"``, a ``(timestamp, seq)`` pair for
        ``"timestamp"``, ``None`` for the beginning). ``filter=None`` applies no filter at all;
        a filter leaves out deltas negated in this store unless ``include_negated`` is true."""
        start = _scan_start(after, order, limit)
        if start is None:
            return []
        rows = self._matching(start, filter, from_timestamp, order, limit=limit)
        return list(islice(rows, limit))

    def _pushdown(
        self, flt: DeltaFilter | None, from_timestamp: float
    ) -> tuple[list[str], list[object], bool]:
        """SQL conditions (and their parameters) implied by ``flt`` and ``from_timestamp``, and
        whether they decide the filter exactly, negation aside."""
        clauses: list[str] = []
        params: list[object] = []
        exact = True
        if from_timestamp > 0:
            clauses.append("timestamp >= ?")
            params.append(from_timestamp)
        if flt is None:
            return clauses, params, exact
        for column, values in (("id", flt.ids), ("author", flt.authors), ("system", flt.systems)):
            if values is None:
                continue
            clause = self._in_clause(column, values, params)
            if clause is None:
                exact = False
            else:
                clauses.append(clause)
        rng = flt.timestamp_range
        if rng is not None and rng.start is not None:
            clauses.append("timestamp >= ?")
            params.append(rng.start)
        if rng is not None and rng.end is not None:
            clauses.append("timestamp <= ?")
            params.append(rng.end)
        if flt.target_ids is not None or flt.target_contexts is not None:
            exact = False
        return clauses, params, exact

    def _in_clause(self, column: str, values: tuple[str, ...], params: list[object]) -> str | None:
        """``column IN (...)`` for ``values``, appending its parameters; ``None`` when the list
        is too long for parameters and cannot be sent as JSON (then Python checks it)."""
        unique = sorted(set(values))
        if len(unique) <= _MAX_IN_PARAMS:
            params.extend(unique)
            return f"{column} IN ({', '.join('?' * len(unique))})"
        # SQLite's JSON functions cut strings at NUL; such lists are left to Python.
        if self._json_each and not any("\x00" in value for value in unique):
            params.append(_encoder.encode(unique).decode())
            return f"{column} IN (SELECT value FROM json_each(?))"
        return None

    def _matching(
        self,
        start: _Start,
        flt: DeltaFilter | None,
        from_timestamp: float,
        order: ScanOrder,
        *,
        limit: int | None = None,
        extra_clause: str | None = None,
    ) -> Iterator[tuple[int, Delta]]:
        """Every matching ``(seq, delta)`` past ``start``, in ``order``, a page at a time
        (:meth:`_rows`, decoded)."""
        for seq, _timestamp, body, delta in self._rows(
            start, flt, from_timestamp, order, limit=limit, extra_clause=extra_clause
        ):
            yield seq, _decoder.decode(body) if delta is None else delta

    def scan_raw(
        self,
        *,
        after: tuple[float, int] | int | None = None,
        filter: DeltaFilter | None = None,
        from_timestamp: float = 0,
        limit: int = 100,
        order: ScanOrder = "sequence",
    ) -> list[tuple[int, float, bytes]]:
        """:meth:`scan` as ``(seq, timestamp, json)``: each delta's stored JSON text, decoded
        only where SQL cannot decide the filter alone."""
        start = _scan_start(after, order, limit)
        if start is None:
            return []
        if filter is None:  # SQL decides: the rows as they come
            clauses, params, _ = self._pushdown(None, from_timestamp)
            return self._page("seq, timestamp, body", clauses, params, order, start, limit)
        rows = self._rows(start, filter, from_timestamp, order, limit=limit)
        return [(seq, timestamp, body) for seq, timestamp, body, _ in islice(rows, limit)]

    def _rows(
        self,
        start: _Start,
        flt: DeltaFilter | None,
        from_timestamp: float,
        order: ScanOrder,
        *,
        limit: int | None = None,
        extra_clause: str | None = None,
    ) -> Iterator[tuple[int, float, bytes, Delta | None]]:
        """Every matching ``(seq, timestamp, body, delta)`` past ``start``, in ``order``, a
        page at a time; ``delta`` is the decoded body where the filter needed it, else ``None``.

        ``limit`` is how many the caller wants at most (it sizes the first page when SQL
        decides the filter exactly); ``extra_clause`` is one more SQL condition.
        """
        if flt is not None and _matches_nothing(flt):
            return
        clauses, params, exact = self._pushdown(flt, from_timestamp)
        if extra_clause is not None:
            clauses.append(extra_clause)
        negation = _applies_negation(flt)
        page = _PAGE_SIZE
        if limit is not None and ((exact and not negation) or limit > page):
            page = limit
        has_negators = _HAS_NEGATORS if negation else "0"
        columns = f"seq, timestamp, body, {has_negators}"
        while True:
            rows = self._page(columns, clauses, params, order, start, page)
            for seq, timestamp, body, negated_candidate in rows:
                if flt is None or (exact and not negated_candidate):
                    yield seq, timestamp, body, None  # SQL decided: no need to decode
                    continue
                delta: Delta = _decoder.decode(body)
                if flt.matches(delta, self.is_negated if negated_candidate else None):
                    yield seq, timestamp, body, delta
            if len(rows) < page:
                return
            last_seq, last_timestamp = rows[-1][0], rows[-1][1]
            start = (last_seq, None) if order == "sequence" else (0, (last_timestamp, last_seq))

    def _page(
        self,
        columns: str,
        clauses: list[str],
        params: list[object],
        order: ScanOrder,
        start: _Start,
        page: int,
    ) -> list[Any]:
        """Up to ``page`` rows of ``deltas`` (``columns``, beginning ``seq, timestamp``) that
        meet ``clauses``, past ``start``, in ``order``.

        Past a ``(timestamp, seq)`` position, the rows with that timestamp and a higher ``seq``
        (one seek in the timestamp index, which holds ``(timestamp, rowid)``) come first, then
        those with a later timestamp: with ``(timestamp, seq) > (?, ?)`` SQLite would step over
        every row with that timestamp before the position, page after page.
        """
        seq_position, ts_position = start
        where = " AND ".join(clauses) if clauses else "1"
        execute = self._conn.execute
        if order == "sequence":
            sql = f"SELECT {columns} FROM deltas WHERE {where} AND seq > ? ORDER BY seq LIMIT ?"
            return execute(sql, [*params, seq_position, page]).fetchall()
        by_time = "ORDER BY timestamp, seq LIMIT ?"
        if ts_position is None:
            sql = f"SELECT {columns} FROM deltas WHERE {where} {by_time}"
            return execute(sql, [*params, page]).fetchall()
        timestamp, seq = ts_position
        sql = f"SELECT {columns} FROM deltas WHERE {where} AND timestamp = ? AND seq > ? {by_time}"
        rows: list[Any] = execute(sql, [*params, timestamp, seq, page]).fetchall()
        if len(rows) < page:
            sql = f"SELECT {columns} FROM deltas WHERE {where} AND timestamp > ? {by_time}"
            rows += execute(sql, [*params, timestamp, page - len(rows)]).fetchall()
        return rows

    def subscribe(self, callback: StoreCallback) -> Callable[[], None]:
        """Call ``callback(seq, delta)`` after each new delta is committed (not for ignored
        duplicates); returns a function that unsubscribes. An exception from a callback
        propagates to the caller of ``put`` after every callback ran; the delta stays stored."""
        return self._subscribers.subscribe(callback)

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key`` by :meth:`set_meta`, or ``None``."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (replacing any previous value), durably."""
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        """Close the database file; later calls raise ``sqlite3.ProgrammingError``."""
        self._subscribers.clear()
        self._conn.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._conn.execute("COMMIT")
        finally:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")


def open_store(
    storage: Literal["memory", "sqlite"], path: str | os.PathLike[str] | None = None
) -> MemoryStore | SQLiteStore:
    """A new store: ``"memory"`` (``path`` is not used) or ``"sqlite"`` kept in the file ``path``.

    Raises ``ValueError`` for an unknown ``storage`` or for ``"sqlite"`` without a path.
    """
    if storage == "memory":
        return MemoryStore()
    if storage == "sqlite":
        if path is None or os.fspath(path) == "":
            raise ValueError("storage 'sqlite' needs a path to the database file")
        return SQLiteStore(path)
    raise ValueError(f"unknown storage {storage!r}: expected 'memory' or 'sqlite'")
