"""atheris target: our server ``FederationConnection`` on arbitrary bytes from a client.

The invariant (fuzz/invariants.py, ``check_server_connection``): ``receive_data`` raises nothing
but ``RemoteProtocolError``; taking events and output, timers and end of stream raise nothing;
no event follows ``Closed``. The input's first two bytes choose the setup (upgrade already done,
``hello`` already received, compression, a small size limit ...) and how the rest is chunked.

Run from the repository root::

    python fuzz/fuzz_server.py -max_total_time=20
    python fuzz/fuzz_server.py my-corpus/ -max_total_time=600 -jobs=4

Unless the command line names a corpus directory, seeds (the reference client's side of a
recorded session, as frames) are written to a temporary corpus, with a dictionary of the wire
vocabulary unless ``-dict=`` is given. ``-seeds=0`` (ours, not libFuzzer's) skips both.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-untyped,unused-ignore]

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

with atheris.instrument_imports():
    # rhizome_proto, and wsproto and h11 under it, are instrumented for coverage feedback
    import rhizome_proto  # noqa: F401
    from fuzz.invariants import DICTIONARY, check_server_connection, server_seed_inputs


def TestOneInput(data: bytes) -> None:  # the name libFuzzer expects
    check_server_connection(data)


def _dict_entry(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def with_seeds(argv: list[str], workdir: Path) -> list[str]:
    """``argv`` plus a seed corpus and a dictionary in ``workdir`` where the user gave none."""
    if "-seeds=0" in argv:
        return [arg for arg in argv if arg != "-seeds=0"]
    args = list(argv)
    if not any(arg.startswith("-dict=") for arg in args[1:]):
        dict_file = workdir / "server.dict"
        dict_file.write_text("\n".join(_dict_entry(t) for t in DICTIONARY) + "\n")
        args.append(f"-dict={dict_file}")
    if not any(not arg.startswith("-") for arg in args[1:]):
        corpus = workdir / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(server_seed_inputs()):
            (corpus / f"seed-{i:02d}").write_bytes(seed)
        args.append(str(corpus))
    return args


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-server-") as tmp:
        atheris.Setup(with_seeds(sys.argv, Path(tmp)), TestOneInput)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
