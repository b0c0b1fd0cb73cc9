"""Adapters that run the sans-IO core ``rhizome_proto`` on real I/O, and storage backends.

``FederatedRhizomeDB`` here is the asyncio one (:mod:`rhizome_adapters.aio`). asyncio and trio
run one adapter written on anyio (:mod:`rhizome_adapters.anyio_adapter`); on trio import it from
:mod:`rhizome_adapters.trio_adapter` (needs ``rhizome-federation[trio]``; trio is not imported by
this package). Plain threads: :mod:`rhizome_adapters.threaded`.
"""

from .aio import EventHandler, FederatedRhizomeDB, FederationLink, LinkStatus

__all__ = ["EventHandler", "FederatedRhizomeDB", "FederationLink", "LinkStatus"]
