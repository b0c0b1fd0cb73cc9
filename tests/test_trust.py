"""Trust policies: which received deltas an instance accepts, and why it refuses the others."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from rhizome_proto import (
    AuthorTrustPolicy,
    CombinedTrustPolicy,
    CustomTrustPolicy,
    Delta,
    PermissiveTrustPolicy,
    Pointer,
    SystemTrustPolicy,
    TrustPolicy,
    combine_trust_policies,
    create_author_trust_policy,
    create_custom_trust_policy,
    create_system_trust_policy,
)
from tests.strategies import deltas, deterministic


def delta(author: str = "alice", system: str = "sys-a", *pointers: Pointer) -> Delta:
    return Delta("d1", 1, author, system, pointers)


def test_permissive_trusts_everything() -> None:
    policy = PermissiveTrustPolicy()
    assert policy.check(delta()) is None
    assert policy.check(delta("mallory", "evil")) is None
    assert policy.to_json() == {"type": "permissive"}
    assert repr(policy) == "PermissiveTrustPolicy()"


@deterministic()
@given(deltas())
def test_permissive_trusts_any_delta(d: Delta) -> None:
    assert PermissiveTrustPolicy().check(d) is None


def test_author_policy() -> None:
    policy = AuthorTrustPolicy(["alice", "bob", "alice"])
    assert policy.check(delta("alice")) is None
    assert policy.check(delta("bob", "anything")) is None
    assert policy.check(delta("mallory")) == "untrusted author: mallory"
    assert policy.check(delta("Alice")) == "untrusted author: Alice"
    assert policy.to_json() == {"type": "author", "trustedAuthors": ["alice", "bob"]}
    assert repr(policy) == "AuthorTrustPolicy(['alice', 'bob'])"


def test_author_policy_takes_any_iterable_once() -> None:
    policy = AuthorTrustPolicy(a for a in ("x", "y"))
    assert policy.check(delta("y")) is None
    assert policy.check(delta("x")) is None  # a generator consumed once still works


def test_system_policy() -> None:
    policy = SystemTrustPolicy({"sys-b", "sys-a"})
    assert policy.check(delta(system="sys-a")) is None
    assert policy.check(delta("mallory", "sys-b")) is None
    assert policy.check(delta(system="sys-c")) == "untrusted system: sys-c"
    assert policy.to_json() == {"type": "system", "trustedSystems": ["sys-a", "sys-b"]}


def test_empty_lists_trust_nobody() -> None:
    assert AuthorTrustPolicy([]).check(delta()) == "untrusted author: alice"
    assert SystemTrustPolicy(()).check(delta()) == "untrusted system: sys-a"
    assert AuthorTrustPolicy([]).to_json() == {"type": "author", "trustedAuthors": []}


def test_custom_policy() -> None:
    seen: list[Delta] = []

    def has_rating(d: Delta) -> bool:
        seen.append(d)
        return any(p.role == "rating" for p in d.pointers)

    policy = CustomTrustPolicy(has_rating)
    rated = delta("a", "s", Pointer("rating", 5))
    assert policy.check(rated) is None
    assert policy.check(delta()) == "rejected by custom trust policy"
    assert seen == [rated, delta()]
    assert policy.to_json() == {"type": "custom"}

    named = CustomTrustPolicy(lambda d: False, reason="no ratings accepted")
    assert named.check(rated) == "no ratings accepted"
    assert named.reason == "no ratings accepted"


def test_combined_all_must_pass() -> None:
    policy = CombinedTrustPolicy([AuthorTrustPolicy(["alice"]), SystemTrustPolicy(["sys-a"])])
    assert policy.check(delta("alice", "sys-a")) is None
    assert policy.check(delta("alice", "sys-b")) == "untrusted system: sys-b"
    assert policy.check(delta("bob", "sys-a")) == "untrusted author: bob"


def test_combined_gives_the_first_refusal_and_stops_there() -> None:
    calls: list[str] = []

    def recording(name: str, verdict: bool) -> CustomTrustPolicy:
        def predicate(d: Delta) -> bool:
            calls.append(name)
            return verdict

        return CustomTrustPolicy(predicate, reason=f"refused by {name}")

    policy = combine_trust_policies(
        recording("first", True),
        recording("second", False),
        recording("third", False),
    )
    assert policy.check(delta()) == "refused by second"
    assert calls == ["first", "second"]


def test_combined_of_nothing_trusts_everything() -> None:
    assert CombinedTrustPolicy([]).check(delta()) is None
    assert combine_trust_policies().to_json() == {"type": "combined", "policies": []}


def test_combined_nests() -> None:
    inner = combine_trust_policies(create_author_trust_policy(["alice"]))
    outer = combine_trust_policies(inner, create_system_trust_policy(["sys-a"]))
    assert outer.check(delta()) is None
    assert outer.check(delta("eve")) == "untrusted author: eve"
    assert outer.to_json() == {
        "type": "combined",
        "policies": [
            {"type": "combined", "policies": [{"type": "author", "trustedAuthors": ["alice"]}]},
            {"type": "system", "trustedSystems": ["sys-a"]},
        ],
    }


def test_create_helpers_build_the_matching_classes() -> None:
    author = create_author_trust_policy(["alice"])
    system = create_system_trust_policy(["sys-a"])
    custom = create_custom_trust_policy(lambda d: d.author == "alice", "only alice")
    combined = combine_trust_policies(author, system, custom)
    assert isinstance(author, AuthorTrustPolicy) and author.authors == frozenset({"alice"})
    assert isinstance(system, SystemTrustPolicy) and system.systems == frozenset({"sys-a"})
    assert isinstance(custom, CustomTrustPolicy)
    assert custom.check(delta("bob")) == "only alice"
    assert create_custom_trust_policy(lambda d: False).check(delta()) == (
        "rejected by custom trust policy"
    )
    assert isinstance(combined, CombinedTrustPolicy)
    assert combined.policies == (author, system, custom)


def test_to_json_is_json_with_sorted_lists() -> None:
    policy = combine_trust_policies(
        create_author_trust_policy(["zed", "amy", "Émile"]),
        create_system_trust_policy(["s2", "s1"]),
        create_custom_trust_policy(lambda d: True),
        PermissiveTrustPolicy(),
    )
    wire = policy.to_json()
    assert json.loads(json.dumps(wire)) == wire
    assert wire["policies"][0]["trustedAuthors"] == ["amy", "zed", "Émile"]
    assert wire["policies"][1]["trustedSystems"] == ["s1", "s2"]
    assert [p["type"] for p in wire["policies"]] == ["author", "system", "custom", "permissive"]


@deterministic()
@given(deltas(), st.sets(st.text(max_size=4), max_size=4), st.sets(st.text(max_size=4), max_size=4))
def test_combined_equals_both_checks(d: Delta, authors: set[str], systems: set[str]) -> None:
    author = AuthorTrustPolicy(authors | ({d.author} if len(authors) % 2 else set()))
    system = SystemTrustPolicy(systems | ({d.system} if len(systems) % 2 else set()))
    expected = author.check(d) or system.check(d)
    assert CombinedTrustPolicy([author, system]).check(d) == expected
    assert (expected is None) == (d.author in author.authors and d.system in system.systems)


def test_policies_satisfy_the_protocol() -> None:
    policies: list[TrustPolicy] = [
        PermissiveTrustPolicy(),
        AuthorTrustPolicy([]),
        SystemTrustPolicy([]),
        CustomTrustPolicy(lambda d: True),
        CombinedTrustPolicy([]),
    ]
    for policy in policies:
        assert callable(policy.check) and isinstance(policy.to_json(), dict)
