"""``SQLiteStore`` schema versions: a file made with schema version 1 opens, is migrated to the
current schema in place and keeps working (numbers, order, negation, meta)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from rhizome_adapters.storage import SQLiteStore
from rhizome_proto import Delta, DeltaFilter, Pointer, Reference

#: Schema version 1, as the first SQLiteStore wrote it.
SCHEMA_V1 = (
    """CREATE TABLE IF NOT EXISTS deltas (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        timestamp NOT NULL,
        author,
        system,
        body BLOB
    )""",
    "CREATE INDEX IF NOT EXISTS deltas_timestamp ON deltas (timestamp, seq)",
    "CREATE INDEX IF NOT EXISTS deltas_author ON deltas (author)",
    "CREATE INDEX IF NOT EXISTS deltas_system ON deltas (system)",
    """CREATE TABLE IF NOT EXISTS negations (
        target TEXT NOT NULL,
        negator TEXT NOT NULL,
        PRIMARY KEY (target, negator)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
)


def delta(delta_id: str, timestamp: float, author: str = "alice", *negates: str) -> Delta:
    pointers = tuple(Pointer("negates", Reference(target)) for target in negates)
    return Delta(id=delta_id, timestamp=timestamp, author=author, system="s1", pointers=pointers)


def write_v1_file(path: Path, deltas: list[Delta]) -> None:
    """A file as version 1 wrote it: rows numbered by AUTOINCREMENT, negation pairs, meta."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA_V1:
            conn.execute(statement)
        for d in deltas:
            conn.execute(
                "INSERT INTO deltas (id, timestamp, author, system, body) VALUES (?, ?, ?, ?, ?)",
                (d.id, d.timestamp, d.author, d.system, msgspec.json.encode(d)),
            )
            for p in d.pointers:
                assert isinstance(p.target, Reference)
                conn.execute("INSERT INTO negations VALUES (?, ?)", (p.target.id, d.id))
        conn.execute("INSERT INTO meta VALUES ('push:peer', 'store-1:3')")
        conn.execute("PRAGMA user_version=1")
    finally:
        conn.close()


def test_a_version_1_file_opens_and_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    old = [
        delta("a", 5),
        delta("b", 2**40, "bob"),
        delta("c", 3.5),
        delta("n1", 6, "bob", "a"),
        delta("d", 5),
    ]
    write_v1_file(path, old)
    with SQLiteStore(path) as store:
        assert len(store) == 5
        assert store.last_sequence() == 5
        assert store.get_meta("push:peer") == "store-1:3"
        assert store.get("b") == old[1]
        stored = store.get("b")
        assert stored is not None and type(stored.timestamp) is int
        assert store.is_negated("a")
        assert [d.id for _, d in store.scan()] == ["a", "b", "c", "n1", "d"]
        by_time = store.scan(order="timestamp")
        assert [(seq, d.id) for seq, d in by_time] == [
            (3, "c"),
            (1, "a"),
            (5, "d"),
            (4, "n1"),
            (2, "b"),
        ]
        assert [d.id for _, d in store.scan(filter=DeltaFilter(authors=("bob",)))] == ["b", "n1"]
        assert store.scan_raw(after=4) == [(5, 5, msgspec.json.encode(old[4]))]
        # new deltas continue the numbering; known ids are still recognised
        assert store.put_many([delta("e", 7), delta("a", 9), delta("n2", 8, "alice", "n1")]) == [
            6,
            None,
            7,
        ]
        assert not store.is_negated("a")
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "deltas_v1" not in names
        assert "deltas_author" not in names and "deltas_system" not in names
        assert "deltas_timestamp" in names
    finally:
        conn.close()
    with SQLiteStore(path) as again:  # the migrated file opens as it is
        assert again.last_sequence() == 7
        assert [d.id for _, d in again.scan(after=5)] == ["e", "n2"]


def test_an_empty_version_1_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "empty-v1.db"
    write_v1_file(path, [])
    with SQLiteStore(path) as store:
        assert len(store) == 0
        assert store.put(delta("a", 1)) == 1


def test_duplicates_in_a_batch_and_in_the_store_leave_no_gap(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s.db") as store:
        assert store.put_many([delta("a", 1), delta("b", 2)]) == [1, 2]
        batch = [
            delta("c", 3),
            delta("a", 1),
            delta("c", 3),
            delta("n", 4, "x", "b"),
            delta("b", 2),
        ]
        assert store.put_many(batch) == [3, None, None, 4, None]
        assert store.is_negated("b")
        assert [(seq, d.id) for seq, d in store.scan()] == [(1, "a"), (2, "b"), (3, "c"), (4, "n")]
        # a pointer with the role "negates" and a non-reference target negates nothing
        text = Delta(
            id="t", timestamp=5, author="x", system="s", pointers=(Pointer("negates", "c"),)
        )
        assert store.put(text) == 5
        assert not store.is_negated("c")


def test_timestamp_pages_through_long_runs_of_one_timestamp(tmp_path: Path) -> None:
    # 5 and 5.0 are the same timestamp; runs longer than a page, a filter on some
    deltas = [
        delta(f"d{i:03}", [5, 5.0, 7][i // 100] if i < 300 else 1, f"a{i % 2}") for i in range(310)
    ]
    expected = sorted(enumerate(deltas, 1), key=lambda pair: (pair[1].timestamp, pair[0]))
    with SQLiteStore(tmp_path / "ties.db") as store:
        store.put_many(deltas)
        for flt in (None, DeltaFilter(authors=("a1",))):
            got: list[tuple[int, str]] = []
            after: tuple[float, int] | None = None
            while page := store.scan_raw(after=after, filter=flt, limit=7, order="timestamp"):
                got.extend((seq, msgspec.json.decode(body)["id"]) for seq, _, body in page)
                after = (page[-1][1], page[-1][0])
            wanted = [(seq, d.id) for seq, d in expected if flt is None or flt.matches(d)]
            assert got == wanted
