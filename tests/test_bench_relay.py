"""The ``relay`` benchmark's baseline, ``python -m bench._raw server --mode relay``: like a hub,
it forwards each delta a sender writes, unmasked, to every receiver (links whose hello asks
for mode ``pull``), in order, acknowledges it to the sender and drops what receivers send; and
the generator ``bench.gen.relay`` completes against it and against ``rhizome serve``."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gen
from bench.procs import Proc, python, rhizome
from bench.wire import FrameSplitter, ack_message, client_frame, delta_message

TIMEOUT = 20.0


def raw_relay(tmp_path: Path, n: int) -> Proc:
    argv = python("bench._raw", "server", "--mode", "relay", "--n", str(n))
    return Proc([*argv, "--timeout", str(TIMEOUT)], tmp_path / "relay.log")


def text_frames(link: gen.Link, splitter: FrameSplitter, count: int) -> list[bytes]:
    """The payloads of the next ``count`` text frames the link receives (server frames: not
    masked)."""
    out: list[bytes] = []
    while len(out) < count:
        for opcode, key, a, b in splitter.feed(link.recv()):
            assert key == b""
            if opcode == 1:
                out.append(splitter.last[a:b])
    return out


def test_raw_relay_forwards_to_receivers_and_acks_the_sender(tmp_path: Path) -> None:
    with raw_relay(tmp_path, 4) as proc:
        url = proc.line("listening on ", TIMEOUT)
        receivers = [gen.Link(url, "none", TIMEOUT, mode="pull") for _ in range(2)]
        sender = gen.Link(url, "none", TIMEOUT, mode="push")
        splitters = [FrameSplitter() for _ in receivers]
        sender.send(b"".join(client_frame(delta_message(i)) for i in range(3)))
        assert text_frames(sender, FrameSplitter(), 3) == [ack_message(i) for i in range(3)]
        for link, splitter in zip(receivers, splitters, strict=True):
            assert text_frames(link, splitter, 3) == [delta_message(i) for i in range(3)]
            link.send(client_frame(ack_message(0)))  # read and dropped
        # what the receivers sent reached no one: the next frame of each is the next delta
        sender.send(client_frame(delta_message(3)))
        assert text_frames(sender, FrameSplitter(), 1) == [ack_message(3)]
        for link, splitter in zip(receivers, splitters, strict=True):
            assert text_frames(link, splitter, 1) == [delta_message(3)]
        for link in [*receivers, sender]:
            link.close()


@pytest.mark.parametrize("server", ["raw", "cli"])
def test_relay_generator_completes(tmp_path: Path, server: str) -> None:
    n, receivers = 300, 3
    if server == "raw":
        proc = raw_relay(tmp_path, n)
    else:
        argv = rhizome("serve", "--port", "0", "--memory", "--system-id", "bench-server")
        proc = Proc(argv, tmp_path / "serve.log")
    with proc:
        url = proc.line("listening on ", TIMEOUT)
        m = gen.relay(url, n, receivers, TIMEOUT, proc.cpu_seconds)
    assert m.rate is not None and m.rate > 0
    assert m.wire is not None and m.wire > n * (receivers + 1) * len(delta_message(0))
    assert set(m.cpu) == {"bench", "server"}
