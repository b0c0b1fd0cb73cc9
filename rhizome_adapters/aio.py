"""The asyncio adapter: :class:`FederatedRhizomeDB` is the anyio adapter
(:mod:`rhizome_adapters.anyio_adapter`) as asyncio code has always used it.

On asyncio the instance needs no ``async with``: its tasks (connections, the server, the
commits, coroutine handlers) are asyncio tasks of its own, so it may be created anywhere,
used from any task and closed with :meth:`~FederatedRhizomeDB.close` (``async with`` calls it on
exit). Everything else, the protocol and the I/O included, is the anyio adapter's.

TLS (``wss://``): ``enable_server(ssl=...)`` and ``connect_to_remote(..., ssl=...)`` take an
:class:`ssl.SSLContext`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from . import anyio_adapter
from ._base import EventHandler, LinkStatus
from ._base import host_port as _host_port  # noqa: F401 -- importable from here, as before
from ._base import parse_url as _parse_url  # noqa: F401 -- importable from here, as before
from .anyio_adapter import FederationLink

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]


class FederatedRhizomeDB(anyio_adapter.FederatedRhizomeDB):
    """A RhizomeDB instance that federates over WebSocket, for asyncio.

    Use it as an async context manager (``close()`` on exit), or call :meth:`close`.
    ``storage`` picks a new ``"memory"`` or ``"sqlite"`` store (``path`` for the file) unless
    ``store`` is given; a store passed in is not closed by :meth:`close`.
    """

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._own_tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        task = asyncio.ensure_future(func(*args))
        self._own_tasks.add(task)
        task.add_done_callback(self._own_tasks.discard)

    def _can_spawn(self) -> bool:
        return True

    async def __aenter__(self) -> FederatedRhizomeDB:
        return self

    async def close(self) -> None:
        """Close every link (close handshake), stop the server, close the store we opened, and
        cancel and await the instance's tasks still running."""
        await super().close()
        current = asyncio.current_task()
        pending = {t for t in self._own_tasks if not t.done() and t is not current}
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
