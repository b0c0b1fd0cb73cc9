"""Trust policies, as in the seed's ``examples/trust-policies``: which deltas an instance accepts.

1. A server-wide *system* policy: the server accepts deltas from two trusted systems only; an
   untrusted client's delta is rejected (``delta_nack``) and never stored.
2. Per-link policies on pull clients that sync everything the server holds: by *author*, by a
   *custom* predicate, and *combined* (all must pass).

Every accepted and rejected delta is printed with the reason, and the link counters
(``stats.deltas_received`` / ``stats.deltas_rejected``) agree. Exits 0 when every scenario
accepted and rejected what it should.

    python examples/trust-policies/main.py
"""

from __future__ import annotations

import asyncio
import sys

from rhizome_adapters import FederatedRhizomeDB
from rhizome_proto import (
    Delta,
    FederationEvent,
    LinkConfig,
    Pointer,
    Reference,
    TrustPolicy,
    combine_trust_policies,
    create_author_trust_policy,
    create_custom_trust_policy,
    create_system_trust_policy,
)


def who(delta: Delta) -> str:
    return f"{delta.author}@{delta.system}"


def note(author: str, item: str, text: str, *, verified: bool = False) -> list[Pointer]:
    pointers = [Pointer(role="data", target=Reference(id=item)), Pointer(role="value", target=text)]
    if verified:
        pointers.append(Pointer(role="verified", target=True))
    return pointers


async def push_from(url: str, system_id: str, author: str, pointers: list[Pointer]) -> str:
    """A push-only client authors one delta; the server's verdict (``accepted`` or the reason)
    and the link's counters."""
    async with FederatedRhizomeDB(system_id=system_id) as client:
        verdict: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_event(event: FederationEvent) -> None:
            if verdict.done():
                return
            if event.type == "delta:sent":
                verdict.set_result("accepted")
            elif event.type == "delta:rejected":
                verdict.set_result(f"rejected: {event.reason}")

        client.on_federation_event(on_event)
        link = await client.connect_to_remote(url, LinkConfig(mode="push", initial_sync="none"))
        await client.persist_delta(client.create_delta(author, pointers))
        result = await asyncio.wait_for(verdict, 10)
        stats = link.stats
        return (
            f"{result} (sent={stats.deltas_sent} rejected_by_peer={stats.deltas_rejected_by_peer})"
        )


async def pull_with(url: str, name: str, policy: TrustPolicy) -> tuple[list[str], int, int]:
    """A pull client syncs everything under ``policy``: what it printed as accepted, and its
    link's received / rejected counters."""
    async with FederatedRhizomeDB(system_id=name) as client:
        accepted: list[str] = []
        synced = asyncio.Event()

        def on_event(event: FederationEvent) -> None:
            if event.type == "delta:received" and event.delta:
                accepted.append(who(event.delta))
                print(f"  accepted  {who(event.delta)}")
            elif event.type == "delta:rejected" and event.delta:
                print(f"  rejected  {who(event.delta)}: {event.reason}")
            elif event.type == "sync:completed":
                synced.set()

        client.on_federation_event(on_event)
        config = LinkConfig(mode="pull", initial_sync="full", trust_policy=policy)
        link = await client.connect_to_remote(url, config)
        await asyncio.wait_for(synced.wait(), 10)
        stats = link.stats
        print(f"  stats: received={stats.deltas_received} rejected={stats.deltas_rejected}")
        return sorted(accepted), stats.deltas_received, stats.deltas_rejected


async def main() -> int:
    failures: list[str] = []

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            failures.append(f"{what}: got {got!r}, expected {want!r}")

    server_policy = create_system_trust_policy(["trusted-client-1", "trusted-client-2"])
    async with FederatedRhizomeDB(system_id="trusted-server", trust_policy=server_policy) as server:
        url = await server.enable_server(host="127.0.0.1", port=0)
        print(f"server listening on {url}")

        print("\n--- 1. server policy: only systems trusted-client-1, trusted-client-2 ---")
        pushes = [
            ("trusted-client-1", "alice", note("alice", "item_1", "hello", verified=True)),
            ("trusted-client-2", "bob", note("bob", "item_2", "hi")),
            ("untrusted-client-999", "mallory", note("mallory", "item_3", "spam")),
        ]
        for system_id, author, pointers in pushes:
            verdict = await push_from(url, system_id, author, pointers)
            print(f"  {author}@{system_id}: {verdict}")
            if system_id.startswith("untrusted"):
                want = f"rejected: untrusted system: {system_id} (sent=0 rejected_by_peer=1)"
            else:
                want = "accepted (sent=1 rejected_by_peer=0)"
            expect(f"{author}@{system_id}", verdict, want)
        # the server's own deltas are not checked by its policy (it trusts itself)
        for author in ("alice", "carol"):
            await server.persist_delta(server.create_delta(author, note(author, "item_4", "own")))
        held = sorted(who(d) for d in server.scan_deltas())
        print(f"  the server holds {len(held)} deltas: {', '.join(held)}")
        expect("server holds", len(held), 4)

        print("\n--- 2. author policy: alice and bob ---")
        got = await pull_with(url, "author-client", create_author_trust_policy(["alice", "bob"]))
        expect("author policy", got[1:], (3, 1))

        print("\n--- 3. custom policy: only deltas with a 'verified' pointer ---")
        verified = create_custom_trust_policy(
            lambda d: any(p.role == "verified" for p in d.pointers), reason="not verified"
        )
        got = await pull_with(url, "custom-client", verified)
        expect("custom policy", got, (["alice@trusted-client-1"], 1, 3))

        print("\n--- 4. combined: author alice AND system trusted-client-1 ---")
        combined = combine_trust_policies(
            create_author_trust_policy(["alice"]), create_system_trust_policy(["trusted-client-1"])
        )
        got = await pull_with(url, "combined-client", combined)
        expect("combined policy", got, (["alice@trusted-client-1"], 1, 3))

    print()
    for failure in failures:
        print(f"UNEXPECTED {failure}")
    print("all policies behaved as expected" if not failures else "some policies misbehaved")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
