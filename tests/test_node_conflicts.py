"""Finding 5 of the security review: a delta whose id is stored with other content used to be
acknowledged in silence. Now: a ``delta_nack`` saying so, a counter, a ``delta:rejected``
event with code ``CONFLICT``; the stored delta is kept."""

from __future__ import annotations

import msgspec
import pytest

from rhizome_proto import (
    ErrorCode,
    EventType,
    LinkConfig,
    create_author_trust_policy,
)
from tests.node_sim import Network

V1 = ("cursor",)
ALL = ("cursor", "batch", "credit")


@pytest.mark.parametrize("extensions", [V1, ALL], ids=["v1", "batch"])
@pytest.mark.parametrize("policy", [False, True], ids=["permissive", "trust-policy"])
def test_a_live_delta_conflicting_with_a_stored_one_is_refused(
    extensions: tuple[str, ...], policy: bool
) -> None:
    net = Network(extensions=extensions)
    trust = create_author_trust_policy(["user"]) if policy else None
    net.add_node("hub", trust_policy=trust)
    net.add_node("spoke")
    original = net.author("hub", delta_id="x", pointers=({"role": "v", "target": 1},))
    net.connect("spoke", "hub", LinkConfig(mode="bidirectional", initial_sync="none"))
    net.deliver()
    same = msgspec.structs.replace(original, signature="c2lnbmVk")  # a signature is no change
    other = net.node("spoke").create_delta("user", [{"role": "v", "target": 2}], id="x")
    (ch,) = net.between("spoke", "hub")
    client = net.conn(ch, "client")
    for delta in (same, other):  # the same delta again is fine; other content is not
        client.send_delta(delta)
        net.deliver()
    reason = "conflict: a different delta with id 'x' is already stored (kept)"
    assert net.store("hub").get("x") == original
    (rejected,) = net.node_events("hub", EventType.DELTA_REJECTED)
    assert rejected.code is ErrorCode.CONFLICT and rejected.reason == reason
    assert rejected.delta == other
    (link,) = net.node("hub").links
    assert link.stats.deltas_conflicting == 1 and link.stats.deltas_received == 0
    (spoke_link,) = net.node("spoke").links
    assert spoke_link.stats.deltas_rejected_by_peer == 1  # the nack reached the spoke
    (nacked,) = net.node_events("spoke", EventType.DELTA_REJECTED)
    assert nacked.reason == reason


def test_a_conflicting_delta_in_a_sync_batch_is_nacked() -> None:
    net = Network(extensions=V1)
    net.add_node("hub")
    net.add_node("spoke")
    net.author("hub", delta_id="x", pointers=({"role": "v", "target": 1},))
    net.author("spoke", delta_id="x", pointers=({"role": "v", "target": 2},))
    net.author("hub", delta_id="y")
    net.connect("spoke", "hub", LinkConfig(mode="pull", initial_sync="full"))
    net.deliver()
    (rejected,) = net.node_events("spoke", EventType.DELTA_REJECTED)
    assert rejected.code is ErrorCode.CONFLICT and rejected.delta is not None
    assert rejected.delta.pointers[0].target == 1
    assert net.store("spoke").get("x").pointers[0].target == 2  # type: ignore[union-attr]
    assert "y" in net.ids("spoke")
