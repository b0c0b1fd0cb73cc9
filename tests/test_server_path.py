"""The path a server serves is checked once, in the core (``server_path``), for every runtime
and for ``rhizome serve --path``: ``federation`` means ``/federation``, a malformed path is a
``ValueError`` before anything listens."""

from __future__ import annotations

import pytest

from rhizome_adapters import threaded
from rhizome_proto import LinkConfig, server_path
from tests.aio_support import deadline, instance


def test_server_path() -> None:
    assert server_path("federation") == server_path("/federation") == "/federation"
    assert server_path("/a/b") == "/a/b"
    for bad in ("/a b", "/x?y=1", "/x#y", "/é", "/\x00"):
        with pytest.raises(ValueError, match="not a URL path"):
            server_path(bad)


@deadline()
async def test_async_server_normalises_its_path() -> None:
    async with instance(system_id="srv") as server, instance(system_id="cli") as client:
        with pytest.raises(ValueError, match="not a URL path"):
            await server.enable_server(port=0, path="/a b")
        assert server.server_url is None  # nothing listens
        url = await server.enable_server(port=0, path="federation")
        assert url.split("/", 3)[3] == "federation"  # ws://127.0.0.1:PORT/federation
        link = await client.connect_to_remote(url, LinkConfig(initial_sync="none"))
        assert link.status == "connected"


def test_threaded_server_normalises_its_path() -> None:
    server = threaded.FederatedRhizomeDB(system_id="srv")
    client = threaded.FederatedRhizomeDB(system_id="cli")
    try:
        with pytest.raises(ValueError, match="not a URL path"):
            server.enable_server(port=0, path="/x?y")
        assert server.server_url is None
        url = server.enable_server(port=0, path="federation")
        assert url.split("/", 3)[3] == "federation"
        link = client.connect_to_remote(url, LinkConfig(initial_sync="none"), timeout=5)
        assert link.status == "connected"
    finally:
        client.close()
        server.close()
