"""Hub and spokes, as in the seed's ``examples/hub-and-spoke``: one process, four instances.

The hub listens (on a free port); three spokes connect to it with bidirectional links. Each
spoke authors deltas about a shared document; the hub stores them and relays them to the other
spokes (``auto_broadcast``), so every instance ends up with the same deltas. Exits 0 only when
all four converged.

    python examples/hub-and-spoke/main.py
"""

from __future__ import annotations

import asyncio
import sys

from rhizome_adapters import FederatedRhizomeDB
from rhizome_proto import FederationEvent, LinkConfig, Pointer, Reference

DOC = Reference(id="doc_1", context="documents")
EDITS = {  # spoke -> (author, [(role, text), ...])
    "spoke-A": ("user-alice", [("title", "Collaborative Document")]),
    "spoke-B": ("user-bob", [("content", "This is a collaborative document."), ("tag", "demo")]),
    "spoke-C": ("user-carol", [("comment", "Great collaboration!")]),
}


async def converge(instances: list[FederatedRhizomeDB], timeout: float = 10.0) -> bool:
    """Wait until every instance holds the same set of delta ids."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ids = [{d.id for d in db.scan_deltas()} for db in instances]
        if all(s == ids[0] for s in ids):
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)


async def main() -> int:
    async with FederatedRhizomeDB(system_id="hub-server") as hub:
        url = await hub.enable_server(host="127.0.0.1", port=0)
        print(f"hub listening on {url}")

        def on_hub_event(event: FederationEvent) -> None:
            link = hub.get_federation_link(event.link_id)
            if event.type == "link:connected" and link:
                print(f"[hub] spoke connected: {link.remote_system_id}")
            elif event.type == "delta:received" and event.delta and link:
                print(f"[hub] relaying {event.delta.author}'s delta from {link.remote_system_id}")

        hub.on_federation_event(on_hub_event)

        spokes = [FederatedRhizomeDB(system_id=name) for name in EDITS]
        try:
            for spoke in spokes:
                await spoke.connect_to_remote(
                    url, LinkConfig(mode="bidirectional", initial_sync="full")
                )
            print(f"{len(spokes)} spokes connected\n")

            for spoke in spokes:
                author, fields = EDITS[spoke.system_id]
                for role, text in fields:
                    delta = spoke.create_delta(
                        author, [Pointer(role="doc", target=DOC), Pointer(role=role, target=text)]
                    )
                    await spoke.persist_delta(delta)  # stored, then sent to the hub
                    print(f"[{spoke.system_id}] {author} set {role}")

            expected = sum(len(fields) for _, fields in EDITS.values())
            ok = await converge([hub, *spokes])
            print()
            for db in (hub, *spokes):
                print(f"{db.system_id:<10} holds {len(db.scan_deltas())} deltas")
            ok = ok and len(hub.scan_deltas()) == expected
            print("converged" if ok else "did NOT converge")
            return 0 if ok else 1
        finally:
            for spoke in spokes:
                await spoke.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
