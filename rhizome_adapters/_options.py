"""The parameters of the public methods every adapter has, written once: ``enable_server``'s
(:class:`ServerOptions`) and ``connect_to_remote``'s (:class:`ConnectOptions`), documented here.

An adapter writes such a method as ``(self, options)`` (``async`` or not) under :func:`takes`,
which gives it the options' parameters (as ``help()`` and mypy see them) and their
documentation after its own.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from ssl import SSLContext
from typing import Any, Concatenate, ParamSpec, TypeVar

from rhizome_proto import DEFAULT_PATH, AdmissionLimits, Credentials, LinkConfig

__all__ = ["ConnectOptions", "ServerOptions", "takes"]

P = ParamSpec("P")
OptionsT = TypeVar("OptionsT")
SelfT = TypeVar("SelfT")
R = TypeVar("R")


def takes(
    options: Callable[P, OptionsT],
) -> Callable[[Callable[[SelfT, OptionsT], R]], Callable[Concatenate[SelfT, P], R]]:
    """Make ``method(self, options)`` (a function or a coroutine function) a method taking the
    parameters of ``options`` (a dataclass) and called with them gathered into one; its
    docstring is the method's own, then that of each class of ``options``, most general first.
    """

    def decorate(method: Callable[[SelfT, OptionsT], R]) -> Callable[Concatenate[SelfT, P], R]:
        call: Callable[..., Any] = method

        async def coroutine(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await call(self, options(*args, **kwargs))

        def function(self: Any, *args: Any, **kwargs: Any) -> Any:
            return call(self, options(*args, **kwargs))

        public: Callable[..., Any] = coroutine if inspect.iscoroutinefunction(method) else function
        functools.update_wrapper(public, method)
        classes = options.__mro__[-2::-1] if isinstance(options, type) else ()
        docs = (method.__doc__, *(cls.__doc__ for cls in classes))
        public.__doc__ = "\n\n".join(inspect.cleandoc(doc) for doc in docs if doc)
        signature = inspect.signature(method)  # its ``self`` and what it returns
        self, *_ = signature.parameters.values()
        parameters = [self, *inspect.signature(options).parameters.values()]
        public.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return public

    return decorate


@dataclass(frozen=True)
class ServerOptions:
    """Returns ``ws://host:port/path`` (the actual port: ``port=0`` takes a free one), or
    ``wss://...`` when ``ssl`` (a server context holding the certificate) is given.
    ``auto_broadcast`` (as in the seed's server config) overrides the instance's setting.

    ``limits`` are the admission limits (:class:`~rhizome_proto.AdmissionLimits`;
    defaults: ``max_pending=64`` connections in the TLS handshake or HTTP upgrade at once,
    the oldest closed to make room; ``pending_timeout=5.0`` seconds to complete it;
    ``max_links=100`` open links; ``max_links_per_address=32`` from one client address;
    an upgrade beyond is answered HTTP 503 with ``Retry-After``). ``max_connections``, if
    given, is ``max_links``. With ``credentials`` (bearer tokens and the system ids each
    may claim) an upgrade without a valid token is answered 401 and a ``hello`` claiming
    another system id is refused; without, anyone may connect (v1)."""

    _: KW_ONLY
    host: str = "127.0.0.1"
    port: int = 8080
    path: str = DEFAULT_PATH
    max_connections: int | None = None
    auto_broadcast: bool | None = None
    ssl: SSLContext | None = None
    limits: AdmissionLimits | None = None
    credentials: Credentials | None = None

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Around opening the listening socket: a failure to listen says where and why."""
        try:
            yield
        except OSError as exc:
            why = "the address is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            where = f"cannot listen on {self.host}:{self.port}"
            raise OSError(exc.errno, f"{where}: {why or exc}") from exc


@dataclass(frozen=True)
class ConnectOptions:
    """``url`` is ``ws://host[:port]/path`` or ``wss://...``; the link reconnects per
    ``config.reconnect`` (a failed first connect is retried too). ``wss://`` verifies the
    server's certificate for the URL's host with ``ssl`` (default: the system's trust
    store); a TLS failure is a connect failure like any other. ``headers`` go with the
    upgrade request; ``token`` is sent as ``Authorization: Bearer`` (a server that refuses
    it answers 401: the link's failure says so).

    With ``wait`` this returns once the handshake completed and raises
    :class:`ConnectionError` if the policy gives up first; without, it returns at once."""

    url: str
    config: LinkConfig | None = None
    _: KW_ONLY
    headers: Sequence[tuple[str, str]] = ()
    wait: bool = True
    ssl: SSLContext | None = None
    token: str | None = None


@dataclass(frozen=True)
class Target:
    """Where an outgoing link connects (``ssl``: the TLS context of a ``wss://`` URL), and what
    its upgrade request says beside the core's own headers."""

    host: str
    port: int
    path: str
    ssl: SSLContext | None
    headers: Sequence[tuple[str, str]]
    token: str | None
