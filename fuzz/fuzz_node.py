"""atheris target: a whole ``FederationNode`` (three incoming links, a memory store) driven by
hostile message sequences read from the fuzzer's bytes.

The invariants (fuzz/node_harness.py, ``check_node``): no exception escapes but the fatal
``RemoteProtocolError`` of a link; the store stays consistent; every delta the node acked is
stored; what it holds for peers stays within its memory budget.

Run from the repository root::

    python fuzz/fuzz_node.py -max_total_time=20
    python fuzz/fuzz_node.py my-corpus/ -max_total_time=600

Seeds are a few hand-made step sequences (fuzz/node_harness.py, ``node_seed_inputs``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped,unused-ignore]

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

with atheris.instrument_imports():
    import rhizome_proto  # noqa: F401
    from fuzz.node_harness import check_node, node_seed_inputs

from fuzz.runner import run  # noqa: E402


def TestOneInput(data: bytes) -> None:  # the name libFuzzer expects
    check_node(data)


if __name__ == "__main__":
    run("node", TestOneInput, node_seed_inputs)
