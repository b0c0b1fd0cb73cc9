"""atheris target: ``rhizome_proto.decode`` on arbitrary input (invariants in fuzz/invariants.py).

Run from the repository root::

    python fuzz/fuzz_codec.py -max_total_time=20
    python fuzz/fuzz_codec.py my-corpus/ -max_total_time=600 -jobs=4

Seeds and a dictionary are added as fuzz/runner.py describes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped,unused-ignore]

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

with atheris.instrument_imports():
    # rhizome_proto, and wsproto and h11 under it, are instrumented for coverage feedback
    import rhizome_proto  # noqa: F401
    from fuzz.invariants import check_codec, seed_inputs

from fuzz.runner import run  # noqa: E402


def TestOneInput(data: bytes) -> None:  # the name libFuzzer expects
    check_codec(data)


if __name__ == "__main__":
    run("codec", TestOneInput, seed_inputs)
