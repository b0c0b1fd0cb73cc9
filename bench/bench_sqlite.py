"""``SQLiteStore`` in-process: storing and scanning, no network, no federation logic.

    python bench/bench_sqlite.py [--n 100000] [--repeat 3] [--only put,put1,serve,filtered]

* ``put B``: ``put_many`` of batches of B deltas (with a ``meta`` value, as a sync commits its
  cursor) into a fresh file, ``synchronous=FULL``: deltas/s. B = 100 (one ``sync_batch``) and
  1000 (a group commit of ten).
* ``put1``: one delta per transaction (a live v1 stream at its worst): deltas/s, n/50 of them.
* ``serve``: what an initial sync asks of the store: ``scan_raw`` pages of 100 in timestamp
  order, each followed by a look-ahead of 1: deltas/s.
  ``serve ties``: the same with a thousand deltas in a row sharing each timestamp.
* ``filtered X``: the same pass with a filter on authors matching a share X of the deltas
  (every tenth delta has author ``a3``, every hundredth ``rare``).

Scans count the stored deltas passed per second, matching or not.

The deltas are the bench's (``wire.delta_objects``, about 300 bytes of JSON). Medians of
``--repeat`` runs. To compare two versions, run this script with each on ``PYTHONPATH``,
alternating, several times: the machine is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from wire import T0, delta_objects

from rhizome_adapters.storage import SQLiteStore
from rhizome_proto import Delta, DeltaFilter


def author(i: int) -> str:
    return "rare" if i % 100 == 7 else f"a{i % 10}"


def deltas(n: int, tie: int = 1) -> list[Delta]:
    """n deltas; ``tie`` of them in a row share their timestamp."""
    return [
        msgspec.structs.replace(d, author=author(i), timestamp=T0 + i // tie)
        for i, d in enumerate(delta_objects(0, n))
    ]


def put(folder: Path, ds: list[Delta], batch: int) -> float:
    path = folder / f"put-{time.monotonic_ns()}.sqlite"
    with SQLiteStore(path) as store:
        start = time.perf_counter()
        for i in range(0, len(ds), batch):
            store.put_many(ds[i : i + batch], validate=False, meta={"sync:peer": str(i)})
        return len(ds) / (time.perf_counter() - start)


def full_pass(store: SQLiteStore, flt: DeltaFilter | None) -> float:
    """Stored deltas passed per second (matching or not)."""
    start = time.perf_counter()
    after: tuple[float, int] | None = None
    while True:
        page = store.scan_raw(after=after, filter=flt, limit=100, order="timestamp")
        if not page:
            break
        seq, timestamp, _ = page[-1]
        after = (timestamp, seq)
        store.scan_raw(after=after, filter=flt, limit=1, order="timestamp")
    return len(store) / (time.perf_counter() - start)


def stored(path: Path, ds: list[Delta]) -> SQLiteStore:
    store = SQLiteStore(path)
    for i in range(0, len(ds), 5_000):
        store.put_many(ds[i : i + 5_000])
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="put,put1,serve,filtered")
    args = parser.parse_args()
    only = set(args.only.split(","))
    ds = deltas(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases: dict[str, Callable[[], float]] = {}
        if "put" in only:
            cases["put 100"] = lambda: put(folder, ds, 100)
            cases["put 1000"] = lambda: put(folder, ds, 1000)
        if "put1" in only:
            cases["put1"] = lambda: put(folder, ds[: args.n // 50], 1)
        if only & {"serve", "filtered"}:
            served = stored(folder / "served.sqlite", ds)
            if "serve" in only:
                cases["serve"] = lambda: full_pass(served, None)
                tied = stored(folder / "tied.sqlite", deltas(args.n, tie=1000))
                cases["serve ties"] = lambda: full_pass(tied, None)
            if "filtered" in only:
                for name, authors in (("10%", ("a3",)), ("1%", ("rare",)), ("0%", ("none",))):
                    flt = DeltaFilter(authors=authors)
                    cases[f"filtered {name}"] = lambda flt=flt: full_pass(served, flt)  # type: ignore[misc]
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, case in cases.items():
                rates[name].append(case())
        for name, values in rates.items():
            print(f"{name:14s} {statistics.median(values):12,.0f} /s")


if __name__ == "__main__":
    main()
