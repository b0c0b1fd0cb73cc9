"""The trio adapter: :class:`FederatedRhizomeDB` is the anyio adapter
(:mod:`rhizome_adapters.anyio_adapter`), which runs on trio as it does on asyncio
(``pip install rhizome-federation[trio]``).

``async with FederatedRhizomeDB(...) as db:`` opens the task group (nursery) that every
connection, the listening server and the coroutine event handlers run in; leaving the block
closes the links (close handshake), stops the server and waits for all of it. TLS (``wss://``):
``ssl=`` takes an :class:`ssl.SSLContext` as on asyncio.
"""

from __future__ import annotations

from ._base import EventHandler, LinkStatus
from .anyio_adapter import FederatedRhizomeDB, FederationLink

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]
