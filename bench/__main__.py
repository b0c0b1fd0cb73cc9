"""``python -m bench``: every scenario between separate processes over 127.0.0.1, each row
against a raw-framing baseline measured in the same run; one table on stdout (progress on
stderr), ``--json FILE`` for the rows. Exit status 1 if any measurement failed."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from bench.gen import Measure
from bench.scenarios import SIZES, Bench, Row, scenario_rows

RUNTIMES = ("asyncio", "trio", "threaded")
COLUMNS = [
    "scenario", "server", "runtime", "store", "n", "deltas/s", "base/s", "x",
    "p50 ms", "p99 ms", "base p50", "base p99", "x p50",
    "RSS MB", "base RSS", "x RSS", "wire MB", "base MB", "x wire",
]  # fmt: skip


def listed(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(allowed)}; not {bad or text!r}")
    return items


def num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def times(value: float | None) -> str:
    """A ratio: three decimals below 0.1, else two."""
    return num(value, ".3f" if value is not None and value < 0.1 else ".2f")


def rss(values: dict[str, float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{next(iter(values.values())):.1f}"
    return " ".join(f"{k[0]}{v:.0f}" for k, v in sorted(values.items()))


def megabytes(m: Measure) -> float | None:
    return None if m.wire is None else m.wire / 1e6


def cells(row: Row) -> list[str]:
    ours, base, x = row.ours or Measure(), row.base or Measure(), row.ratios
    return [
        row.scenario, row.server, row.runtime, row.store, f"{row.n:,}",
        num(ours.rate, ",.0f"), num(base.rate, ",.0f"), times(x.get("rate")),
        num(ours.p50, ".3f"), num(ours.p99, ".3f"),
        num(base.p50, ".3f"), num(base.p99, ".3f"), times(x.get("p50")),
        rss(ours.rss), rss(base.rss), times(x.get("rss")),
        num(megabytes(ours), ".2f"), num(megabytes(base), ".2f"), times(x.get("wire")),
    ]  # fmt: skip


def table(rows: list[Row]) -> str:
    grid = [COLUMNS] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(COLUMNS))]
    lines = []
    for line, row in zip(grid, [None, *rows], strict=True):
        text = "  ".join(
            c.rjust(w) if i >= 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        lines.append(text.rstrip())
        if row is not None and row.error:
            lines.append("    FAILED: " + row.error.replace("\n", "\n    "))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every scenario")
    parser.add_argument(
        "--n", type=int, default=0, help="deltas (or round trips) per scenario, instead of its size"
    )
    parser.add_argument(
        "--only", type=lambda s: listed(s, tuple(SIZES)), default=list(SIZES),
        help=f"scenarios, comma-separated: {','.join(SIZES)}",
    )  # fmt: skip
    parser.add_argument(
        "--runtime", type=lambda s: listed(s, RUNTIMES), default=list(RUNTIMES),
        help="runtimes, comma-separated: asyncio,trio,threaded",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="best of K runs of each row")
    parser.add_argument(
        "--timeout", type=float,
        help="seconds per measurement (smoke 20, full 600); a scenario gets 3 times that",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args()
    timeout = args.timeout or (20.0 if args.smoke else 600.0)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds the `with` blocks: children are killed

    signal.signal(signal.SIGTERM, stop)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rhizome-bench-") as tmp:
        bench = Bench(Path(tmp), timeout, max(1, args.repeat))
        for scenario in args.only:
            n = args.n or (SIZES[scenario].smoke if args.smoke else SIZES[scenario].full)
            rows += scenario_rows(bench, scenario, n, args.runtime)
    print(table(rows))
    if args.json:
        meta = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "python": platform.python_version(),
            "machine": platform.platform(),
        }
        data = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
