"""The README's in-memory example runs and prints what it says it prints."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_core_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    core = [b for b in blocks if "FederationConnection(Role.CLIENT" in b]
    assert len(core) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(core[0], "README.md", "exec"), {})
    assert out.getvalue().strip() == "DeltaAcked(delta_id='d1')"


def test_in_memory_pair_example_runs() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(ROOT / "examples" / "in_memory_pair.py"), run_name="__main__")
    lines = out.getvalue().splitlines()
    assert lines[0] == "['HandshakeComplete'] ['HandshakeComplete']"
    assert "server got delta-1" in lines
    assert "synced 1 delta(s)" in lines
    assert lines[-1].startswith("[Closed(code=1000")
