"""The scenarios: which processes run, what is timed, and the baseline of each.

Every measurement starts its own processes (servers wait for their ``listening on`` line) and
kills them on the way out; :meth:`Bench.run` wraps each in a time limit.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bench import gen
from bench.gen import Measure
from bench.procs import Expired, Proc, python, rhizome, time_limit
from bench.wire import delta_objects


@dataclass(frozen=True)
class Target:
    """What is measured: ``cli`` (the ``rhizome`` command), ``lib`` (bench/_server.py) or
    ``raw`` (the baseline, bench/_raw.py); its runtime and store."""

    server: str
    runtime: str = "-"
    store: str = "-"


RAW = Target("raw")


@dataclass
class Row:
    scenario: str
    server: str
    runtime: str
    store: str
    n: int
    ours: Measure | None = None
    base: Measure | None = None
    error: str | None = None
    ratios: dict[str, float] = field(default_factory=dict)


class Size(NamedTuple):
    smoke: int
    full: int
    best: str  # the figure compared by --repeat: "rate" (highest) or "p50" (lowest)


SIZES: dict[str, Size] = {
    "live-v1": Size(500, 20_000, "rate"),
    "rtt": Size(200, 2_000, "p50"),
    "sync-serve": Size(2_000, 100_000, "rate"),
    "sync-client": Size(2_000, 100_000, "rate"),
    "live-batch": Size(500, 50_000, "rate"),
    "relay": Size(200, 20_000, "rate"),
}
RECEIVERS = 8  # the links a relayed delta goes to (relay)


def targets(scenario: str, runtimes: list[str]) -> list[Target]:
    """The rows of a scenario: the CLI is the asyncio runtime; the lib server runs every
    runtime on memory, and trio and threads on SQLite too (asyncio's SQLite is the CLI's)."""
    cli = (
        [Target("cli", "asyncio", s) for s in ("memory", "sqlite")] if "asyncio" in runtimes else []
    )
    lib_mem = [Target("lib", rt, "memory") for rt in runtimes]
    lib_sql = [Target("lib", rt, "sqlite") for rt in runtimes if rt != "asyncio"]
    return {
        "live-v1": cli + lib_mem + lib_sql,
        "rtt": cli + lib_mem + lib_sql,
        "sync-serve": cli[1:] + lib_mem + lib_sql,  # `rhizome serve --memory` starts empty
        "sync-client": cli,
        "live-batch": lib_mem + [Target("lib", rt, "sqlite") for rt in runtimes],
        "relay": cli + lib_mem + lib_sql,
    }[scenario]


class Bench:
    def __init__(self, tmp: Path, timeout: float, repeat: int) -> None:
        self.tmp, self.timeout, self.repeat = tmp, timeout, repeat
        self.read_timeout = min(timeout, 30.0)
        self.files = 0
        self.synced: dict[int, Path] = {}
        self.budget = 3 * timeout  # for a whole scenario
        self.budget_end = 0.0

    def fresh(self, name: str) -> Path:
        self.files += 1
        return self.tmp / f"{self.files:03d}-{name}"

    def log(self, name: str) -> Path:
        return self.fresh(name + ".log")

    # ------------------------------------------------------------------ running

    def run(self, scenario: str, n: int, target: Target) -> Measure:
        """Best of ``repeat`` measurements, each under the time limit."""
        method: Callable[[Target, int], Measure] = getattr(self, scenario.replace("-", "_"))
        key = SIZES[scenario].best
        best: Measure | None = None
        for _ in range(self.repeat):
            limit = min(self.timeout, self.budget_end - time.monotonic())
            if limit <= 0:
                raise Expired(f"{scenario}: its time budget of {self.budget:.0f} s is spent")
            with time_limit(limit, f"{scenario} {target.server} {target.runtime}"):
                m = method(target, n)
            if best is None or (
                (m.p50 or 0) < (best.p50 or 0) if key == "p50" else (m.rate or 0) > (best.rate or 0)
            ):
                best = m
        assert best is not None
        return best

    @contextlib.contextmanager
    def server(self, t: Target, mode: str, n: int) -> Iterator[tuple[Proc, str]]:
        """A server process for ``t``, its URL; ``mode`` ``sync`` preloads ``n`` deltas."""
        db: list[str] = []
        if t.store == "sqlite":
            db = ["--db", str(self.synced_db(n) if mode == "sync" else self.fresh("srv.sqlite"))]
        if t.server == "raw":
            argv = python("bench._raw", "server", "--mode", mode, "--n", str(n))
            argv += ["--timeout", str(self.timeout)]
        elif t.server == "cli":
            argv = rhizome("serve", "--port", "0", "--system-id", "bench-server")
            argv += db or ["--memory"]
        else:
            argv = python("bench._server", "serve", "--runtime", t.runtime, "--store", t.store)
            argv += [*db, "--preload", str(n if mode == "sync" and not db else 0)]
        with Proc(argv, self.log(f"{t.server}-{t.runtime}")) as proc:
            yield proc, proc.line("listening on ", self.timeout)

    def synced_db(self, n: int) -> Path:
        """An SQLite file holding deltas 0..n-1, built once per size in this process."""
        if n not in self.synced:
            from rhizome_adapters.storage import SQLiteStore

            path = self.fresh(f"sync-{n}.sqlite")
            store = SQLiteStore(path)
            try:
                for i in range(0, n, 5_000):
                    store.put_many(delta_objects(i, min(i + 5_000, n)))
            finally:
                store.close()
            self.synced[n] = path
        return self.synced[n]

    # ------------------------------------------------------------------ scenarios

    def live_v1(self, t: Target, n: int) -> Measure:
        with self.server(t, "ack", n) as (proc, url):
            m = gen.live(url, n, self.read_timeout)
            m.rss = {"server": proc.peak_rss_mb()}
        return m

    def rtt(self, t: Target, n: int) -> Measure:
        with self.server(t, "ack", n) as (proc, url):
            m = gen.rtt(url, n, self.read_timeout)
            m.rss = {"server": proc.peak_rss_mb()}
        return m

    def relay(self, t: Target, n: int) -> Measure:
        with self.server(t, "relay", n) as (proc, url):
            m = gen.relay(url, n, RECEIVERS, self.read_timeout, proc.cpu_seconds)
            m.rss = {"server": proc.peak_rss_mb()}
        return m

    def sync_serve(self, t: Target, n: int) -> Measure:
        with self.server(t, "sync", n) as (proc, url):
            m = gen.sync_read(url, n, self.read_timeout)
            m.rss = {"server": proc.peak_rss_mb()}
        return m

    def sync_client(self, t: Target, n: int) -> Measure:
        """A client process syncs n deltas from the raw sync server, which times it from the
        sync_request to the client's close."""
        if t.server == "raw":
            argv = python("bench._raw", "client", "URL", "--n", str(n))
        else:
            store = ["--memory"] if t.store == "memory" else ["--db", str(self.fresh("c.sqlite"))]
            argv = rhizome("connect", "URL", "--once", "--max-attempts", "1", *store)
        with self.server(RAW, "sync", n) as (server, url):
            argv[argv.index("URL")] = url
            with Proc(argv, self.log(f"client-{t.server}")) as client:
                peak = client.wait(self.timeout)
                if t.server == "cli":
                    synced = client.line("synced ", self.read_timeout).split()[0]
                    if synced != str(n):
                        raise client.fail(f"synced {synced} deltas, expected {n}")
            result = json.loads(server.line("result ", self.read_timeout))
            return Measure(n / result["elapsed"], rss={"client": peak}, wire=result["wire"])

    def live_batch(self, t: Target, n: int) -> Measure:
        """A client instance persists n deltas that stream to a server instance; baseline:
        the raw generator and the raw ack server."""
        if t.server == "raw":
            return self.live_v1(t, n)
        with self.server(t, "ack", n) as (server, url):
            argv = python("bench._server", "push", url, "--runtime", t.runtime, "--n", str(n))
            argv += ["--timeout", str(self.timeout)]
            with Proc(argv, self.log(f"push-{t.runtime}")) as client:
                peak = client.wait(self.timeout)
                result = json.loads(client.line("result ", self.read_timeout))
                rss = {"client": peak, "server": server.peak_rss_mb()}
                return Measure(result["rate"], rss=rss, wire=result["wire"])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def scenario_rows(bench: Bench, scenario: str, n: int, runtimes: list[str]) -> list[Row]:
    """The baseline, then every target of the scenario; a failure becomes the row's error."""
    bench.budget_end = time.monotonic() + bench.budget
    base: Measure | None = None
    base_error = None
    try:
        base = bench.run(scenario, n, RAW)
    except Exception as exc:
        base_error = f"baseline: {exc}"
    note(f"{scenario:<11} raw baseline: {describe(base) if base else base_error}")
    rows = []
    for t in targets(scenario, runtimes):
        row = Row(scenario, t.server, t.runtime, t.store, n, base=base, error=base_error)
        try:
            row.ours = bench.run(scenario, n, t)
        except Exception as exc:
            row.error = str(exc)
        if row.ours and base:
            for key, ours, theirs in [
                ("rate", row.ours.rate, base.rate),
                ("p50", row.ours.p50, base.p50),
                ("rss", sum(row.ours.rss.values()), sum(base.rss.values())),
                ("wire", row.ours.wire, base.wire),
            ]:
                if (r := ratio(ours, theirs)) is not None:
                    row.ratios[key] = r
        label = f"{t.server} {t.runtime} {t.store}"
        note(f"{scenario:<11} {label}: {describe(row.ours) if row.ours else row.error}")
        rows.append(row)
    return rows


def describe(m: Measure) -> str:
    parts = [f"{m.rate:,.0f} deltas/s"] if m.rate else []
    if m.p50 is not None and m.p99 is not None:
        parts.append(f"p50 {m.p50:.3f} ms p99 {m.p99:.3f} ms")
    parts += [f"{k} {v:.1f} MB" for k, v in m.rss.items()]
    parts += [f"{k} CPU {v:.2f} s" for k, v in m.cpu.items()]
    return ", ".join([*parts, f"{(m.wire or 0) / 1e6:.2f} MB on the wire"])


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
