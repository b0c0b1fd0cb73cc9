"""Adapters that run the sans-IO core ``rhizome_proto`` on real I/O, and storage backends."""

from .aio import FederatedRhizomeDB, FederationLink

__all__ = ["FederatedRhizomeDB", "FederationLink"]
