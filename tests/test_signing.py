"""Signed deltas: Ed25519 over a canonical encoding, kept with the delta through every hop."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from rhizome_adapters.storage import MemoryStore, SQLiteStore
from rhizome_proto import Delta, LinkConfig, Pointer, Reference, validate_delta
from rhizome_proto._codec import encode_value
from rhizome_proto._signing import (
    SIGNATURE_CONTEXT,
    SignatureTrustPolicy,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    public_key_text,
    sign_delta,
    signed_bytes,
    signing_key_pem,
    verify_delta,
)
from tests.harness import make_delta
from tests.node_sim import Network

ALICE_KEY = generate_signing_key()
BOB_KEY = generate_signing_key()


def signed(delta_id: str = "d1", system: str = "alice-sys", **fields: object) -> Delta:
    return sign_delta(make_delta(delta_id, system=system, **fields), ALICE_KEY)


def test_sign_and_verify_and_what_is_signed() -> None:
    delta = make_delta("d1")
    assert delta.signature is msgspec.UNSET
    assert "signature" not in encode_value(delta)  # an unsigned delta is plain v1
    s = sign_delta(delta, ALICE_KEY)
    assert isinstance(s.signature, str) and len(s.signature) == 86  # 64 bytes, base64url
    assert (
        signed_bytes(s)
        == signed_bytes(delta)
        == SIGNATURE_CONTEXT + encode_value(delta).encode("utf-8")
    )
    assert verify_delta(s, ALICE_KEY.public_key())
    assert not verify_delta(s, BOB_KEY.public_key())
    assert not verify_delta(delta, ALICE_KEY.public_key())
    assert validate_delta(s) == s  # the field survives the wire's rules
    text = encode_value(s)
    assert json.loads(text)["signature"] == s.signature


def test_malformed_signatures_do_not_verify() -> None:
    key = ALICE_KEY.public_key()
    s = signed()
    for bad in ("!!!", "AAAA", s.signature[:-2], s.signature + "AA", "é"):  # type: ignore[operator]
        assert not verify_delta(msgspec.structs.replace(s, signature=bad), key)


def test_keys_load_from_pem_raw_base64_and_hex(tmp_path: Path) -> None:
    pem_private = signing_key_pem(ALICE_KEY)
    raw_private = ALICE_KEY.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = ALICE_KEY.public_key()
    pem_public = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw_public = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    expected = public_key_text(ALICE_KEY)
    assert public_key_text(public) == expected
    for data in (pem_private, pem_private.decode(), raw_private, raw_private.hex()):
        assert public_key_text(load_signing_key(data)) == expected
    for key in (pem_public, raw_public, raw_public.hex(), expected, expected + "\n"):
        assert public_key_text(load_verify_key(key)) == expected
    for bad in ("", "nope", "00" * 31, b"\xff" * 31):
        with pytest.raises(ValueError):
            load_verify_key(bad)
        with pytest.raises(ValueError):
            load_signing_key(bad)
    rsa_pem = (
        b"-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMz3pVNlQlIlqOAsTFtgtf/rBV/z"
        b"5TMh\ntEdsAq1ki3h+2BZTrL+Hr9qK5Ehv4lbU5+m2pZxJ+SUmYtb6OQdZL6UCAwEAAQ==\n"
        b"-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(ValueError):
        load_verify_key(rsa_pem)


def test_policy_accepts_the_systems_signature_and_names_every_refusal() -> None:
    policy = SignatureTrustPolicy({"alice-sys": public_key_text(ALICE_KEY)})
    good = signed()
    assert policy.check(good) is None
    assert policy.check(make_delta("u", system="alice-sys")) == (
        "unsigned delta: system alice-sys requires a signature"
    )
    assert policy.check(make_delta("x", system="mallory")) == (
        "untrusted system: mallory (no key for it)"
    )
    invalid = "invalid signature: not a signature by system alice-sys's key over this delta's"
    spoofs = {
        "another author": msgspec.structs.replace(good, author="mallory"),
        "a changed pointer": msgspec.structs.replace(
            good, pointers=(Pointer(role="subject", target=Reference(id="other")),)
        ),
        "another timestamp": msgspec.structs.replace(good, timestamp=good.timestamp + 1),
        "a replayed signature on other content": msgspec.structs.replace(
            make_delta("d2", system="alice-sys"), signature=good.signature
        ),
        "signed by another key": sign_delta(make_delta("d3", system="alice-sys"), BOB_KEY),
    }
    for what, delta in spoofs.items():
        reason = policy.check(delta)
        assert reason is not None and reason.startswith(invalid), what
    # another system claimed, with alice's signature carried over
    policy2 = SignatureTrustPolicy(
        {"alice-sys": ALICE_KEY.public_key(), "bob-sys": [BOB_KEY.public_key()]}
    )
    claimed = msgspec.structs.replace(good, system="bob-sys")
    assert (policy2.check(claimed) or "").startswith(
        "invalid signature: not a signature by system bob-sys"
    )
    assert policy2.to_json()["trustedSystems"] == ["alice-sys", "bob-sys"]
    with pytest.raises(ValueError, match="no key given"):
        SignatureTrustPolicy({"x": []})


def test_rotated_keys_both_verify() -> None:
    policy = SignatureTrustPolicy({"alice-sys": [ALICE_KEY.public_key(), BOB_KEY.public_key()]})
    assert policy.check(sign_delta(make_delta("a", system="alice-sys"), BOB_KEY)) is None
    assert policy.check(signed("b")) is None


_text = st.text(min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(["id", "author", "system", "timestamp", "pointers"]),
    text=_text,
    number=st.integers(min_value=1, max_value=2**53 - 1),
)
def test_any_change_to_any_field_breaks_the_signature(field: str, text: str, number: int) -> None:
    good = signed()
    value: object = {
        "timestamp": number,
        "pointers": (Pointer(role=text, target=number),),
    }.get(field, text)
    changed = msgspec.structs.replace(good, **{field: value})
    assert verify_delta(changed, ALICE_KEY.public_key()) == (changed == good)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_stores_keep_the_signature(kind: str, tmp_path: Path) -> None:
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "s.db")
    try:
        s, plain = signed("s"), make_delta("p")
        store.put_many([s, plain])
        assert store.get("s") == s and store.get("p") == plain
        rows = {json.loads(raw)["id"]: json.loads(raw) for _, _, raw in store.scan_raw()}
        assert rows["s"]["signature"] == s.signature and "signature" not in rows["p"]
        assert [d for _, d in store.scan()] == [s, plain]
    finally:
        store.close()


@pytest.mark.parametrize("extensions", [("cursor",), ("cursor", "batch", "credit")])
def test_signature_travels_every_hop_live_and_by_sync(
    extensions: tuple[str, ...], tmp_path: Path
) -> None:
    """alice -> hub -> bob, live and by initial sync: bob's policy (alice's key) accepts what
    alice signed, whichever way it came, and refuses what the hub forged in alice's name."""
    policy = SignatureTrustPolicy({"alice-sys": ALICE_KEY.public_key()})
    net = Network(extensions=extensions)
    try:
        net.add_node("alice-sys")
        net.add_node("hub", sqlite_dir=tmp_path)
        net.add_node("bob", trust_policy=policy)
        alice, hub = net.node("alice-sys"), net.node("hub")
        early = sign_delta(
            alice.create_delta("alice", [{"role": "n", "target": 1}], id="early"), ALICE_KEY
        )
        assert alice.persist_delta(early)
        net.connect("alice-sys", "hub", LinkConfig(mode="bidirectional", initial_sync="none"))
        net.deliver()
        forged = msgspec.structs.replace(
            hub.create_delta("alice", [{"role": "n", "target": 9}], id="forged"),
            system="alice-sys",
            signature=early.signature,
        )
        assert hub.persist_delta(forged)
        net.connect("bob", "hub", LinkConfig(mode="bidirectional", initial_sync="full"))
        net.deliver()
        live = sign_delta(
            alice.create_delta("alice", [{"role": "n", "target": 2}], id="live"), ALICE_KEY
        )
        assert alice.persist_delta(live)
        net.deliver()
        assert net.ids("bob") == {"early", "live"}
        bob_store = net.store("bob")
        for delta in (early, live):
            (stored,) = [d for _, d in bob_store.scan(filter=None) if d.id == delta.id]
            assert stored == delta and verify_delta(stored, ALICE_KEY.public_key())
        assert net.store("hub").scan_raw()  # the hub kept them too
    finally:
        net.close()


def test_a_node_with_a_signing_key_signs_what_it_creates() -> None:
    policy = SignatureTrustPolicy({"alice-sys": ALICE_KEY.public_key()})
    net = Network()
    try:
        net.add_node("alice-sys", signing_key=ALICE_KEY)
        net.add_node("bob", trust_policy=policy)
        net.add_node("mallory")
        for name in ("alice-sys", "mallory"):
            net.connect(name, "bob", LinkConfig(mode="push", initial_sync="none"))
        net.deliver()
        good = net.author("alice-sys", delta_id="a1")
        assert verify_delta(good, ALICE_KEY.public_key())
        net.author("mallory", delta_id="m1")  # unsigned, and no key for mallory
        net.deliver()
        assert net.ids("bob") == {"a1"}
    finally:
        net.close()


def test_adapters_pass_the_signing_key_on() -> None:
    from rhizome_adapters import anyio_adapter, threaded

    for cls in (anyio_adapter.FederatedRhizomeDB, threaded.FederatedRhizomeDB):
        db = cls(system_id="alice-sys", signing_key=ALICE_KEY)
        delta = db.create_delta("alice", [{"role": "n", "target": 1}])
        assert verify_delta(delta, ALICE_KEY.public_key())
        assert cls(system_id="x").create_delta("a", []).signature is msgspec.UNSET
