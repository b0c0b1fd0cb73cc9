"""What the atheris targets share: a seed corpus and a dictionary when none is given, then
``atheris.Setup`` / ``atheris.Fuzz``.

Unless the command line names a corpus directory, the target's seeds are written to a
temporary corpus; unless it passes ``-dict=``, a dictionary of the wire vocabulary is written
beside it. ``-seeds=0`` (ours, not libFuzzer's) skips both.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fuzz.seeds import DICTIONARY


def _dict_entry(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def with_seeds(
    argv: list[str], workdir: Path, name: str, seeds: Callable[[], Iterable[bytes]]
) -> list[str]:
    """``argv`` plus a seed corpus and a dictionary in ``workdir`` where the user gave none."""
    if "-seeds=0" in argv:
        return [arg for arg in argv if arg != "-seeds=0"]
    args = list(argv)
    if not any(arg.startswith("-dict=") for arg in args[1:]):
        dict_file = workdir / f"{name}.dict"
        dict_file.write_text("\n".join(_dict_entry(t) for t in DICTIONARY) + "\n")
        args.append(f"-dict={dict_file}")
    if not any(not arg.startswith("-") for arg in args[1:]):
        corpus = workdir / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i:02d}").write_bytes(seed)
        args.append(str(corpus))
    return args


def run(
    name: str, test_one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]
) -> None:
    """Fuzz ``test_one_input`` with the command line's libFuzzer options."""
    import atheris  # type: ignore[import-untyped,unused-ignore]

    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        atheris.Setup(with_seeds(sys.argv, Path(tmp), name, seeds), test_one_input)
        atheris.Fuzz()
