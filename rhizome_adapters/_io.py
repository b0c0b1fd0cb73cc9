"""The steps of the base's flows, and TLS as bytes in and bytes out, for both adapters.

The base (:mod:`._base`) writes each flow of a connection once, as a generator that yields the
I/O it needs: :class:`Receive`, :class:`Send`, :class:`Sleep`, :class:`Wait`, :class:`Connect`,
:class:`Serve`, :class:`Accept` and :class:`Start`. An adapter runs a flow with its own
``_drive``, iterating a :class:`Flow`: it does each step the way its runtime does (``await`` on
anyio, a blocking call on threads) and sets the result, or the transport's error, to be sent
(thrown) back in. So the flows (the reader, the writer, the server's accepting, a pending server
connection, an outgoing link's attempts, the TLS handshake) have one copy, and an adapter keeps
only the few lines that do a step.

:class:`TLS` is ``ssl.SSLObject`` over memory BIOs: the base encrypts and decrypts, and the
adapters only move a plain socket's bytes. Its lock makes it safe for a reader and a writer on
two threads; it is held only for the TLS work, never while a socket blocks.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeAlias, TypeVar

if TYPE_CHECKING:
    from rhizome_proto import FederationConnection

    from ._base import LinkRun, Session

__all__ = [
    "TLS",
    "Accept",
    "Connect",
    "Flow",
    "Receive",
    "Send",
    "Serve",
    "Sleep",
    "Start",
    "Steps",
    "Wait",
]

#: Bytes of plaintext taken from TLS per read.
_PLAINTEXT_CHUNK = 64 * 1024


class Receive(NamedTuple):
    """Read the socket: the bytes (``b""`` at the end of the stream), or ``None`` once
    ``deadline`` (the instance's clock) passed first. A live connection's reader names its
    ``session``, whose :meth:`~._base.Session.rearm` may bring the deadline forward."""

    deadline: float
    session: Session | None = None


class Send(NamedTuple):
    """Write all of ``data``; past ``deadline`` (if any), :class:`TimeoutError` is thrown in."""

    data: bytes
    deadline: float | None = None


class Sleep(NamedTuple):
    """Wait ``seconds`` (an outgoing link's wait ends early when it is disconnected)."""

    seconds: float


class Wait(NamedTuple):
    """The writer waits until ``session`` is signalled."""

    session: Session


class Connect(NamedTuple):
    """Open a TCP connection: the socket of the steps that follow."""

    host: str
    port: int


class Serve(NamedTuple):
    """Serve a live connection of ``run`` over the socket (its reader and writer) until it
    ends; the socket is closed after it."""

    run: LinkRun
    conn: FederationConnection
    tls: TLS | None = None
    head: bytes = b""  # plaintext read before the connection was made (a server's request)


class Accept(NamedTuple):
    """Accept a connection on the listening socket: ``(conn, sock, peer)``, the adapter's
    handle, its socket and the peer's address; ``None`` if none came (a runtime that polls)."""


class Start(NamedTuple):
    """Run ``steps`` on their own (a task, a thread) over ``conn`` (an accepted connection's
    handle), which is closed after them."""

    steps: Steps[None]
    conn: Any


Op: TypeAlias = Receive | Send | Sleep | Wait | Connect | Serve | Accept | Start
T = TypeVar("T")
#: A flow of the base: yields steps, gets each one's result, returns ``T``.
Steps: TypeAlias = Generator[Op, Any, T]


class Flow(Generic[T]):
    """A flow being run: iterating gives its steps; set :attr:`result` (or :attr:`error`)
    before the next one, and it is sent (or thrown) in. Leaving ``with`` closes the flow."""

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self.result: Any = None
        self.error: BaseException | None = None

    def __iter__(self) -> Flow[T]:
        return self

    def __next__(self) -> Op:
        result, error, self.result, self.error = self.result, self.error, None, None
        return self._steps.send(result) if error is None else self._steps.throw(error)

    def __enter__(self) -> Flow[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._steps.close()


class TLS:
    """TLS over a socket whose bytes the adapter moves: a client's checking the server's
    certificate for ``hostname``, or a server's (``hostname`` ``None``)."""

    def __init__(self, context: ssl.SSLContext, hostname: str | None = None) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=hostname is None, server_hostname=hostname
        )
        self._lock = threading.Lock()
        #: the peer ended TLS (with ``close_notify`` or not)
        self.closed = False

    def handshake(self, data: bytes | None) -> tuple[bool, bytes]:
        """Feed the peer's records (``None``: none yet) to the handshake: whether it is done,
        and the records to send (an :class:`ssl.SSLError` if it failed)."""
        if data:
            self._incoming.write(data)
        try:
            self._tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        return done, self._outgoing.read()

    def decrypt(self, data: bytes | None) -> bytes:
        """The plaintext of the peer's records in ``data`` (``b""``: the stream ended;
        ``None``: only what came before, with the handshake's last records); any records TLS
        makes meanwhile wait for the next :meth:`encrypt` (see :attr:`pending`)."""
        out = bytearray()
        with self._lock:
            if data:
                self._incoming.write(data)
            elif data is not None:
                self._incoming.write_eof()
            try:
                while chunk := self._tls.read(_PLAINTEXT_CHUNK):
                    out += chunk
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.closed = True
        return bytes(out)

    @property
    def pending(self) -> bool:
        """Records wait to be sent (made while decrypting)."""
        return self._outgoing.pending > 0

    def encrypt(self, data: bytes) -> bytes:
        """The records to send: those waiting, then ``data``'s (``b""``: only those waiting)."""
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[self._tls.write(view) :]
            return self._outgoing.read()
