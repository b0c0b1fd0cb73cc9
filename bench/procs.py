"""Child processes of the bench: start, read their stdout lines with a timeout, read their peak
RSS, wait for their exit with ``os.wait4`` and kill them (always, on leaving a ``with`` block)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType

ROOT = Path(__file__).resolve().parent.parent


def python(module: str, *args: str) -> list[str]:
    """The command line running ``python -m module args`` (from the repository root)."""
    return [sys.executable, "-m", module, *args]


def rhizome(*args: str) -> list[str]:
    """The ``rhizome`` command next to this Python (else ``python -m rhizome_adapters.cli``)."""
    script = Path(sys.executable).parent / "rhizome"
    if script.exists():
        return [str(script), *args]
    return python("rhizome_adapters.cli", *args)


class Proc:
    """A child process: stdout is a pipe read line by line, stderr goes to ``log``."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        with open(log, "wb") as err:
            self.popen = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        self.pid = self.popen.pid
        self._buf = b""

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def fail(self, why: str) -> RuntimeError:
        """An error naming the process, with the end of its stderr."""
        name = " ".join([Path(self.argv[0]).name, *self.argv[1:4]])
        tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
        return RuntimeError(f"{name}: {why}" + "".join(f"\n    | {t}" for t in tail))

    def line(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with ``prefix`` (without it), within ``timeout``."""
        end = time.monotonic() + timeout
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                text = raw.decode(errors="replace").rstrip("\r")
                if text.startswith(prefix):
                    return text[len(prefix) :]
            left = end - time.monotonic()
            if left <= 0:
                raise self.fail(f"no line {prefix!r} within {timeout:.0f} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self.fail(f"exited before printing {prefix!r}")
                self._buf += chunk

    def peak_rss_mb(self) -> float:
        """VmHWM of the running process, in MB."""
        for text in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if text.startswith("VmHWM:"):
                return int(text.split()[1]) / 1024
        raise self.fail("no VmHWM in /proc (the process has ended)")

    def cpu_seconds(self) -> float:
        """The CPU time the running process has used so far (user and system, every
        thread), in seconds."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait(self, timeout: float) -> float:
        """Wait for a successful exit (killing it after ``timeout``); return its peak RSS
        in MB: the last VmHWM read while it ran (polled every 10 ms).

        Not ``os.wait4``'s ``ru_maxrss``: Linux carries the parent's peak RSS over the
        (v)fork and exec into the child's, so a small child of a big bench would report the
        bench's peak."""
        end = time.monotonic() + timeout
        peak = 0.0
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                peak = max(peak, self.peak_rss_mb())
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.popen.returncode = rc = os.waitstatus_to_exitcode(status)
                if rc != 0:
                    raise self.fail(f"exit code {rc}")
                return peak or usage.ru_maxrss / 1024
            if time.monotonic() > end:
                self.kill()
                raise self.fail(f"still running after {timeout:.0f} s: killed")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class Expired(Exception):
    """A measurement's time limit (not a socket timeout)."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`Expired` in the main thread after ``seconds`` (SIGALRM), so that the
    ``finally`` blocks in between kill the children."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise Expired(f"{what}: gave up after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
