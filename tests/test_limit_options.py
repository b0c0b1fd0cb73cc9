"""The limits for untrusted peers reach the node and every connection, on every runtime."""

from __future__ import annotations

import pytest

from rhizome_adapters import anyio_adapter, threaded
from rhizome_proto import DEFAULT_MAX_ID_LENGTH, DEFAULT_MEMORY_BUDGET, Role


@pytest.mark.parametrize("module", [anyio_adapter, threaded], ids=["anyio", "threaded"])
def test_limits_reach_the_node_and_the_connections(module: object) -> None:
    cls = module.FederatedRhizomeDB  # type: ignore[attr-defined]
    db = cls(
        system_id="s",
        memory_budget=8 * 2**20,
        max_connection_memory=2**20,
        rate_limit=(100.0, 500.0),
        max_id_length=64,
    )
    assert db.node.memory_budget == 8 * 2**20
    assert db.node.max_connection_memory == 2**20
    assert db.node.rate_limit == (100.0, 500.0)
    assert db._new_connection(Role.CLIENT).max_id_length == 64
    plain = cls(system_id="t")
    assert plain.node.memory_budget == DEFAULT_MEMORY_BUDGET and plain.node.rate_limit is None
    assert plain._new_connection(Role.CLIENT).max_id_length == DEFAULT_MAX_ID_LENGTH
    with pytest.raises(ValueError):
        cls(system_id="u", max_id_length=0)
    with pytest.raises(ValueError):
        cls(system_id="v", rate_limit=(0.0, 1.0))
