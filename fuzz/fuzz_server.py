"""atheris target: our server ``FederationConnection`` on arbitrary bytes from a client.

The invariant (fuzz/invariants.py, ``check_server_connection``): ``receive_data`` raises nothing
but ``RemoteProtocolError``; taking events and output, timers and end of stream raise nothing;
no event follows ``Closed``. The input's first two bytes choose the setup (upgrade already done,
``hello`` already received, compression, a small size limit ...) and how the rest is chunked.

Run from the repository root::

    python fuzz/fuzz_server.py -max_total_time=20
    python fuzz/fuzz_server.py my-corpus/ -max_total_time=600 -jobs=4

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
    from fuzz.harness import check_server_connection
    from fuzz.seeds import server_seed_inputs

from fuzz.runner import run  # noqa: E402


def TestOneInput(data: bytes) -> None:  # the name libFuzzer expects
    check_server_connection(data)


if __name__ == "__main__":
    run("server", TestOneInput, server_seed_inputs)
