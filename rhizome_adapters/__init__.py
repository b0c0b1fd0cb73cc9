"""Adapters that run the sans-IO core ``rhizome_proto`` on real I/O, and storage backends.

``FederatedRhizomeDB`` here is the asyncio one (:mod:`rhizome_adapters.aio`); the same API runs
on trio in :mod:`rhizome_adapters.trio_adapter` (needs ``rhizome-federation[trio]``; not imported
by this package) and on plain threads in :mod:`rhizome_adapters.threaded`.
"""

from .aio import EventHandler, FederatedRhizomeDB, FederationLink, LinkStatus

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]
