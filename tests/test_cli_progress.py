"""The sync progress bar of ``rhizome connect``: redrawn in place on a terminal, a bounded
log of lines elsewhere."""

from __future__ import annotations

import io

from rhizome_adapters.cli import _Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_is_redrawn_in_place() -> None:
    out = Terminal()
    bar = _Progress(out)
    bar.start(200)
    for _ in range(2):
        bar.advance(100)
    bar.finish()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("200/200\n")


def test_elsewhere_at_most_a_line_per_percent_and_always_the_last() -> None:
    out = io.StringIO()
    bar = _Progress(out)
    bar.start(20_000)
    for _ in range(20_000 // 7):
        bar.advance(7)
    bar.advance(20_000 % 7)
    bar.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) <= 101 and lines[-1].endswith("] 20000/20000")
    assert all(line.startswith("syncing [") for line in lines)
