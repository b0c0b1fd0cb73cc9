"""Authentication over real sockets on 127.0.0.1, in every runtime (asyncio, trio, threads) and
through the ``rhizome`` command: the right token federates; no token or a wrong one gets HTTP
401 and the link's failure says so; a token for ``spoke1`` saying hello as ``hub-2`` is refused
(``UNAUTHORIZED``) and gets none of ``hub-2``'s parked deltas, which go to ``hub-2`` itself
(finding 4 of #8)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rhizome_adapters import threaded
from rhizome_proto import LinkConfig, ReconnectPolicy
from rhizome_proto._auth import Credentials
from tests.adapter_support import Recorder, ids
from tests.aio_support import deadline, instance, wait_until

ONE_RETRY = LinkConfig(
    reconnect=ReconnectPolicy(max_attempts=1, initial_delay=0.02, max_delay=0.05)
)
#: no initial sync: what a client gets, it gets from the link's outbox (parked deltas)
NO_SYNC = LinkConfig(initial_sync="none", reconnect=ONE_RETRY.reconnect)
CREDENTIALS = Credentials({"tok-spoke1": ["spoke1"], "tok-hub2": ["hub-2"]})


@deadline(20)
async def test_tokens_over_sockets() -> None:
    async with (
        instance(system_id="hub") as hub,
        instance(system_id="spoke1") as spoke,
        instance(system_id="hub-2") as hub2,
    ):
        events = Recorder(hub)
        url = await hub.enable_server(port=0, credentials=CREDENTIALS)
        await hub.persist_delta(hub.create_delta("alice", []))
        await spoke.connect_to_remote(url, token="tok-spoke1")
        await wait_until(lambda: ids(spoke) == ids(hub))
        for token in (None, "wrong"):
            with pytest.raises(ConnectionError, match="HTTP 401"):
                await hub2.connect_to_remote(url, ONE_RETRY, token=token)
        assert ids(hub2) == set()

        # hub-2's deltas are parked on the hub: it paused, then left
        link = await hub2.connect_to_remote(url, NO_SYNC, token="tok-hub2")
        await link.pause()
        await wait_until(lambda: events.of("link:paused"))
        parked = [hub.create_delta("bob", [{"role": "n", "target": i}]) for i in range(3)]
        await hub.persist_deltas(parked)
        await link.disconnect()
        await wait_until(lambda: len(hub.get_federation_links()) == 1)

        async with instance(system_id="hub-2") as thief:  # spoke1's token, hub-2's name
            with pytest.raises(
                ConnectionError, match="'hub-2' is not one this credential may claim"
            ):
                await thief.connect_to_remote(url, NO_SYNC, token="tok-spoke1")
            assert ids(thief) == set()
        await hub2.connect_to_remote(url, NO_SYNC, token="tok-hub2")
        await wait_until(lambda: {d.id for d in parked} <= ids(hub2))


def test_threaded_tokens_over_sockets() -> None:
    with (
        threaded.FederatedRhizomeDB(system_id="hub") as hub,
        threaded.FederatedRhizomeDB(system_id="spoke1") as spoke,
        threaded.FederatedRhizomeDB(system_id="hub-2") as hub2,
        threaded.FederatedRhizomeDB(system_id="hub-2") as thief,
    ):
        events = Recorder(hub)
        url = hub.enable_server(port=0, credentials=CREDENTIALS)
        hub.persist_delta(hub.create_delta("alice", []))
        spoke.connect_to_remote(url, token="tok-spoke1", timeout=5)
        _wait(lambda: ids(spoke) == ids(hub))
        for token in (None, "wrong"):
            with pytest.raises(ConnectionError, match="HTTP 401"):
                hub2.connect_to_remote(url, ONE_RETRY, token=token, timeout=5)

        link = hub2.connect_to_remote(url, NO_SYNC, token="tok-hub2", timeout=5)
        link.pause()
        _wait(lambda: events.of("link:paused"))
        parked = [hub.create_delta("bob", [{"role": "n", "target": i}]) for i in range(3)]
        hub.persist_deltas(parked)
        link.disconnect()
        _wait(lambda: len(hub.get_federation_links()) == 1)

        with pytest.raises(ConnectionError, match="'hub-2' is not one this credential may claim"):
            thief.connect_to_remote(url, NO_SYNC, token="tok-spoke1", timeout=5)
        assert ids(thief) == set()
        hub2.connect_to_remote(url, NO_SYNC, token="tok-hub2", timeout=5)
        _wait(lambda: {d.id for d in parked} <= ids(hub2))


def _wait(predicate: object, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


# ---------------------------------------------------------------- the command

CLI = [sys.executable, "-m", "rhizome_adapters.cli"]


def test_cli_serve_with_an_auth_file_and_put_with_a_token(tmp_path: Path) -> None:
    auth = tmp_path / "tokens"
    auth.write_text("# token  system ids\ns3cret spoke1\n")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    db = str(tmp_path / "hub.sqlite")
    serve = [*CLI, "serve", "--port", "0", "--db", db, "--auth-file", str(auth)]
    with subprocess.Popen(
        [*serve, "--max-pending", "8"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as server:
        try:
            assert server.stdout is not None
            url = server.stdout.readline().split()[-1]
            assert url.startswith("ws://")

            def put(*extra: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [
                        *CLI,
                        "put",
                        "n=x",
                        "--author",
                        "a",
                        "--system-id",
                        "spoke1",
                        "--to",
                        url,
                        *extra,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )

            refused = put()
            assert refused.returncode != 0 and "401" in refused.stderr
            assert put("--token", "wrong").returncode != 0
            assert put("--token", "s3cret").returncode == 0
            assert put("--token-file", str(token_file)).returncode == 0
            both = put("--token", "s3cret", "--token-file", str(token_file))
            assert both.returncode != 0 and "give one of them" in both.stderr
            connect = [*CLI, "connect", url, "--once", "--memory", "--system-id", "spoke1"]
            synced = subprocess.run(
                [*connect, "--token-file", str(token_file)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert synced.returncode == 0, synced.stderr
            refused = subprocess.run(
                [*connect, "--max-attempts", "1"], capture_output=True, text=True, timeout=30
            )
            assert refused.returncode != 0 and "401" in refused.stderr
        finally:
            server.terminate()
    listed = subprocess.run(
        [*CLI, "ls", "--db", db, "--count"], capture_output=True, text=True, timeout=30
    )
    assert listed.stdout.strip() == "2"


def test_cli_refuses_a_bad_auth_file(tmp_path: Path) -> None:
    auth = tmp_path / "tokens"
    auth.write_text("lonely\n")
    result = subprocess.run(
        [*CLI, "serve", "--port", "0", "--memory", "--auth-file", str(auth)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "tokens:1" in result.stderr
