"""LinkConfig and ReconnectPolicy: validation, the backoff schedule, the hello config."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_proto import (
    AuthorTrustPolicy,
    DeltaFilter,
    FederationConfig,
    LinkConfig,
    ReconnectPolicy,
)


def test_backoff_grows_by_the_multiplier_up_to_max_delay_with_full_jitter() -> None:
    policy = ReconnectPolicy(initial_delay=1.0, max_delay=10.0, backoff_multiplier=2.0)
    assert [policy.delay(n, 0.999999) for n in (1, 2, 3, 4, 5)] == pytest.approx(
        [1.0, 2.0, 4.0, 8.0, 10.0], rel=1e-5
    )
    assert [policy.delay(n, 0.5) for n in (1, 2, 5)] == [0.5, 1.0, 5.0]
    assert [policy.delay(n, 0.0) for n in (1, 2, 5)] == [0.0, 0.0, 0.0]


@given(attempt=st.integers(1, 60), jitter=st.floats(0, 1, exclude_max=True))
def test_delay_is_the_jitter_times_the_ceiling(attempt: int, jitter: float) -> None:
    policy = ReconnectPolicy(initial_delay=0.1, max_delay=30.0, backoff_multiplier=3.0)
    delay = policy.delay(attempt, jitter)
    assert delay is not None
    ceiling = min(0.1 * 3.0 ** (attempt - 1), 30.0)
    assert 0 <= delay <= ceiling
    assert delay == pytest.approx(ceiling * jitter)


def test_give_up_after_max_attempts_or_when_disabled() -> None:
    assert ReconnectPolicy(max_attempts=2).delay(2, 0.5) is not None
    assert ReconnectPolicy(max_attempts=2).delay(3, 0.5) is None
    assert ReconnectPolicy(max_attempts=0).delay(1000, 0.5) is not None  # forever
    assert ReconnectPolicy(enabled=False).delay(1, 0.5) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": -1}, "max_attempts"),
        ({"initial_delay": -1.0}, "initial_delay"),
        ({"initial_delay": 5.0, "max_delay": 1.0}, "initial_delay"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier"),
        ({"stable_after": -1.0}, "stable_after"),
    ],
)
def test_bad_reconnect_policies_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReconnectPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sideways"}, "mode"),
        ({"initial_sync": "some"}, "initial_sync"),
        ({"sync_from_timestamp": -1}, "sync_from_timestamp"),
    ],
)
def test_bad_link_configs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinkConfig(**kwargs)  # type: ignore[arg-type]


def test_hello_config_as_the_reference_sends_it() -> None:
    pull = DeltaFilter(authors=("alice",))
    wire = LinkConfig(
        mode="pull",
        initial_sync="from_timestamp",
        sync_from_timestamp=1234,
        pull_filter=pull,
        trust_policy=AuthorTrustPolicy(["alice"]),
        reconnect=ReconnectPolicy(max_attempts=5, initial_delay=1.0, max_delay=30.0),
    ).to_wire()
    assert wire.mode == "pull" and wire.initial_sync == "from_timestamp"
    assert wire.sync_from_timestamp == 1234 and wire.pull_filter == pull
    assert wire.reconnect is not None
    assert (wire.reconnect.initial_delay, wire.reconnect.max_delay) == (1000, 30000)
    assert wire.trust_policy == {"type": "author", "trustedAuthors": ["alice"]}
    assert LinkConfig(initial_sync="full").to_wire().sync_from_timestamp is None


@pytest.mark.parametrize(
    ("remote_mode", "ours"),
    [
        ("push", "pull"),
        ("pull", "push"),
        ("bidirectional", "bidirectional"),
        (None, "bidirectional"),
    ],
)
def test_a_server_mirrors_the_clients_mode(remote_mode: str | None, ours: str) -> None:
    remote = FederationConfig(mode=remote_mode)  # type: ignore[arg-type]
    mirrored = LinkConfig.mirror(remote)
    assert mirrored.mode == ours
    assert mirrored.sends == (ours != "pull") and mirrored.receives == (ours != "push")
    assert LinkConfig.mirror(None).mode == "bidirectional"
