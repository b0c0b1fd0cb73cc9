"""atheris target: ``rhizome_proto.decode`` on arbitrary input (invariants in fuzz/invariants.py).

Run from the repository root::

    python fuzz/fuzz_codec.py -max_total_time=20
    python fuzz/fuzz_codec.py my-corpus/ -max_total_time=600 -jobs=4

Unless the command line names a corpus directory, the recorded reference messages
(tests/vectors) are copied into a temporary seed corpus; unless it passes ``-dict=``, a dictionary
of the wire vocabulary is written next to it. ``-seeds=0`` (ours, not libFuzzer's) skips both.
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
    import rhizome_proto  # noqa: F401  (instrumented for coverage feedback)
    from fuzz.invariants import DICTIONARY, check_codec, seed_inputs


def TestOneInput(data: bytes) -> None:  # the name libFuzzer expects
    check_codec(data)


def _dict_entry(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def with_seeds(argv: list[str], workdir: Path) -> list[str]:
    """``argv`` plus a seed corpus and a dictionary in ``workdir`` where the user gave none."""
    if "-seeds=0" in argv:
        return [arg for arg in argv if arg != "-seeds=0"]
    args = list(argv)
    if not any(arg.startswith("-dict=") for arg in args[1:]):
        dict_file = workdir / "codec.dict"
        dict_file.write_text("\n".join(_dict_entry(t) for t in DICTIONARY) + "\n")
        args.append(f"-dict={dict_file}")
    if not any(not arg.startswith("-") for arg in args[1:]):
        corpus = workdir / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(seed_inputs()):
            (corpus / f"vector-{i:02d}.json").write_bytes(seed)
        args.append(str(corpus))
    return args


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-codec-") as tmp:
        atheris.Setup(with_seeds(sys.argv, Path(tmp)), TestOneInput)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
