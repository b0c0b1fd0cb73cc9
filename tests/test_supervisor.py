"""``ReconnectSupervisor``: the reconnect schedule of an outgoing link, alone (no sockets, no
clock: ``now`` is given, the jitter source injected)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_adapters._base import REFUSAL
from rhizome_proto import (
    PERMANENT_STATUSES,
    Closed,
    ConnectFailure,
    ErrorCode,
    ErrorReceived,
    LocalProtocolError,
    ReconnectPolicy,
    ReconnectState,
    ReconnectSupervisor,
)
from tests.harness import WALL_START, ConnectionPair, RawServer, feed, make_client


def ceiling_jitter() -> float:
    """The largest jitter: every delay is its ceiling."""
    return 1.0


def fail(sup: ReconnectSupervisor, now: float, **failure: object) -> None:
    """One attempt made at ``now`` that fails at once."""
    assert sup.should_connect(now)
    sup.connecting(now)
    sup.connection_failed(now, **failure)  # type: ignore[arg-type]


def wait(sup: ReconnectSupervisor) -> float:
    """The time the next attempt is due (asserting one is)."""
    due = sup.get_timer()
    assert due is not None
    return due


# ---------------------------------------------------------------------- the schedule


def test_the_first_attempt_is_made_at_once() -> None:
    sup = ReconnectSupervisor()
    assert sup.state is ReconnectState.READY
    assert sup.get_timer() is None and sup.should_connect(0.0)
    sup.connecting(0.0)
    assert sup.state is ReconnectState.CONNECTING and not sup.should_connect(0.0)
    assert sup.attempts == 1 and sup.failures == 0


def test_delays_double_up_to_the_cap_with_the_ceiling_jitter() -> None:
    policy = ReconnectPolicy(initial_delay=1.0, max_delay=10.0)
    sup = ReconnectSupervisor(policy, random=ceiling_jitter)
    now, delays = 0.0, []
    for _ in range(6):
        fail(sup, now, reason="connection refused")
        due = wait(sup)
        delays.append(due - now)
        now = due
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert sup.failures == 6 and sup.attempts == 6 and not sup.gave_up


def test_full_jitter_scales_the_ceiling() -> None:
    draws = iter([0.0, 0.25, 0.5])
    sup = ReconnectSupervisor(ReconnectPolicy(initial_delay=2.0), random=lambda: next(draws))
    now, delays = 0.0, []
    for _ in range(3):
        fail(sup, now)
        due = wait(sup)
        delays.append(due - now)
        now = due
    assert delays == [0.0, 1.0, 4.0]  # ceilings 2, 4, 8


def test_nothing_is_attempted_before_the_timer() -> None:
    sup = ReconnectSupervisor(ReconnectPolicy(initial_delay=4.0), random=ceiling_jitter)
    fail(sup, 10.0)
    assert sup.get_timer() == 14.0
    sup.handle_timer(13.9)
    assert sup.state is ReconnectState.WAITING and not sup.should_connect(13.99)
    assert sup.should_connect(14.0) and sup.get_timer() is None


def test_failures_count_until_max_attempts_then_it_gives_up() -> None:
    sup = ReconnectSupervisor(ReconnectPolicy(max_attempts=2), random=ceiling_jitter)
    fail(sup, 0.0, reason="refused one")
    fail(sup, wait(sup), reason="refused two")
    fail(sup, wait(sup), reason="refused three")
    assert sup.gave_up and not sup.permanent
    assert sup.attempts == 3  # the first connect and 2 retries
    assert sup.get_timer() is None and not sup.should_connect(1e9)
    assert sup.final_reason == "gave up after 3 failed attempt(s); first: refused one"


def test_disabled_reconnection_gives_up_at_the_first_failure() -> None:
    sup = ReconnectSupervisor(ReconnectPolicy(enabled=False))
    fail(sup, 0.0, reason="refused")
    assert sup.gave_up and sup.final_reason == "reconnection is disabled; refused"


def test_unlimited_by_default() -> None:
    sup = ReconnectSupervisor(random=ceiling_jitter)
    now = 0.0
    for _ in range(2_000):
        fail(sup, now)
        now = wait(sup)
    assert sup.failures == 2_000 and sup.delay == 30.0


# ---------------------------------------------------------------------- permanent failures


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 404, "reason": "Not Found: federation is served at /federation"},
        {"status": 401},
        {"status": 403},
        {"code": ErrorCode.PROTOCOL_MISMATCH, "reason": "Unsupported protocol: x"},
        {"code": "UNAUTHORIZED"},  # a code as the wire carries it
        {"self_link": True},
    ],
)
def test_a_permanent_failure_is_not_retried(failure: dict[str, object]) -> None:
    sup = ReconnectSupervisor(random=ceiling_jitter)
    fail(sup, 0.0, **failure)
    assert sup.gave_up and sup.permanent and sup.failures == 1
    assert sup.get_timer() is None and not sup.should_connect(1e9)
    assert sup.final_reason is not None and sup.final_reason.startswith("not retried: ")


def test_the_final_reason_says_what_was_permanent() -> None:
    sup = ReconnectSupervisor()
    fail(sup, 0.0, status=404, reason="Not Found")
    assert sup.final_reason == "not retried: upgrade refused with HTTP 404: Not Found"
    sup = ReconnectSupervisor()
    fail(sup, 0.0, self_link=True)
    assert sup.final_reason == (
        "not retried: the remote system id is our own (a link to ourselves)"
    )


@pytest.mark.parametrize(
    "failure",
    [
        {"reason": "[Errno 111] Connection refused"},
        {"status": 503, "reason": "Too many connections"},
        {"status": 500},
        {"code": ErrorCode.MESSAGE_ERROR},
        {"code": "SOMETHING_NEW"},
    ],
)
def test_a_transient_failure_is_retried(failure: dict[str, object]) -> None:
    sup = ReconnectSupervisor()
    fail(sup, 0.0, **failure)
    assert sup.state is ReconnectState.WAITING and not sup.permanent


def test_a_connection_ended_by_a_permanent_error_is_not_retried() -> None:
    sup = ReconnectSupervisor()
    assert sup.should_connect(0.0)
    sup.connecting(0.0)
    sup.connected(0.5)
    sup.disconnected(100.0, code=ErrorCode.UNAUTHORIZED, reason="revoked")
    assert sup.gave_up and sup.final_reason == "not retried: UNAUTHORIZED: revoked"


def test_a_refused_upgrade_is_classified_by_its_status_not_its_text() -> None:
    pair = ConnectionPair(client_options={"path": "/elsewhere"})
    pair.transfer()
    assert pair.client.reject_status == 404
    sup = ReconnectSupervisor()
    assert sup.should_connect(0.0)
    sup.connecting(0.0)
    sup.connection_failed(1.0, status=pair.client.reject_status, reason="wrong path")
    assert sup.gave_up and sup.permanent


def test_a_full_server_is_tried_again() -> None:
    client = make_client()
    client.start(0.0)
    client.data_to_send()
    assert feed(client, REFUSAL, 0.1) is None  # the adapters' answer beyond max_connections
    assert [type(e) for e in client.events()] == [Closed]
    assert client.reject_status == 503
    sup = ReconnectSupervisor()
    fail(sup, 0.0, status=client.reject_status)
    assert sup.state is ReconnectState.WAITING


def test_a_handshake_refused_with_protocol_mismatch_is_not_retried() -> None:
    client = make_client()
    client.start(0.0)
    raw = RawServer()
    raw.accept(client)
    refusal = {
        "type": "error",
        "timestamp": WALL_START,
        "code": "PROTOCOL_MISMATCH",
        "message": "Unsupported protocol: rhizomedb-federation-v1",
        "fatal": True,
    }
    assert feed(client, raw.send_json(refusal), 0.1) is None
    [error] = client.events()
    assert isinstance(error, ErrorReceived) and error.code is ErrorCode.PROTOCOL_MISMATCH
    sup = ReconnectSupervisor()
    fail(sup, 0.0, code=error.code, reason=error.message)
    assert sup.gave_up and sup.permanent


def test_an_accepted_upgrade_has_no_reject_status() -> None:
    pair = ConnectionPair()
    pair.transfer()
    assert pair.client.is_open and pair.client.reject_status is None


# ---------------------------------------------------------------------- stable connections


def test_a_link_that_drops_at_once_keeps_counting() -> None:
    sup = ReconnectSupervisor(ReconnectPolicy(stable_after=10.0), random=ceiling_jitter)
    now = 0.0
    for expected in (1, 2, 3, 4):
        assert sup.should_connect(now)
        sup.connecting(now)
        sup.connected(now + 0.1)
        sup.disconnected(now + 0.2, reason="closed at once")
        assert sup.failures == expected
        now = wait(sup)
    assert sup.delay == 8.0


def test_a_stable_link_starts_counting_again() -> None:
    sup = ReconnectSupervisor(ReconnectPolicy(stable_after=10.0), random=ceiling_jitter)
    fail(sup, 0.0, reason="first")
    fail(sup, wait(sup), reason="second")
    now = wait(sup)
    assert sup.should_connect(now)
    sup.connecting(now)
    sup.connected(now)
    sup.disconnected(now + 10.0)
    assert sup.failures == 1 and sup.delay == 1.0
    assert sup.first_failure == ConnectFailure()


def test_max_attempts_counts_unstable_connections() -> None:
    sup = ReconnectSupervisor(ReconnectPolicy(max_attempts=1, stable_after=5.0))
    sup.connecting(0.0)
    sup.connected(0.0)
    sup.disconnected(1.0, reason="dropped")
    fail(sup, wait(sup))
    assert sup.gave_up and sup.failures == 2


# ---------------------------------------------------------------------- misuse


def snapshot(sup: ReconnectSupervisor) -> tuple[object, ...]:
    return (sup.state, sup.failures, sup.attempts, sup.get_timer(), sup.last_failure, sup.delay)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.connected(0.0),
        lambda s: s.connection_failed(0.0),
        lambda s: s.disconnected(0.0),
    ],
)
def test_a_call_out_of_turn_raises_and_changes_nothing(call: object) -> None:
    sup = ReconnectSupervisor()
    before = snapshot(sup)
    with pytest.raises(LocalProtocolError):
        call(sup)  # type: ignore[operator]
    assert snapshot(sup) == before


def test_connecting_while_waiting_raises() -> None:
    sup = ReconnectSupervisor(random=ceiling_jitter)
    fail(sup, 0.0)
    before = snapshot(sup)
    with pytest.raises(LocalProtocolError):
        sup.connecting(0.5)
    assert snapshot(sup) == before


def test_reset_after_giving_up_connects_at_once() -> None:
    sup = ReconnectSupervisor()
    fail(sup, 0.0, status=404)
    sup.reset()
    assert sup.should_connect(0.0) and sup.failures == 0 and sup.final_reason is None
    sup.connecting(1.0)
    with pytest.raises(LocalProtocolError):
        sup.reset()
    assert sup.state is ReconnectState.CONNECTING


# ---------------------------------------------------------------------- properties


@dataclass(frozen=True)
class Outcome:
    """One attempt: it fails (``failure``), or connects and stays up ``up_for`` seconds."""

    failure: ConnectFailure | None
    up_for: float = 0.0


failures = st.builds(
    ConnectFailure,
    status=st.none() | st.sampled_from([400, 401, 403, 404, 410, 426, 500, 502, 503]),
    code=st.none() | st.sampled_from([*ErrorCode, "SOMETHING_NEW"]),
    self_link=st.sampled_from([False, False, False, True]),
)
outcomes = st.lists(
    st.builds(Outcome, failure=st.none() | failures, up_for=st.floats(0, 100)), max_size=40
)
policies = st.builds(
    ReconnectPolicy,
    max_attempts=st.integers(0, 6),
    initial_delay=st.floats(0, 5),
    max_delay=st.floats(5, 60),
    backoff_multiplier=st.floats(1, 4),
    stable_after=st.floats(0, 50),
)


def drive(
    policy: ReconnectPolicy, plan: list[Outcome], seed: int
) -> list[tuple[ReconnectState, int, float | None]]:
    """Run ``plan`` through a supervisor seeded with ``seed``, checking the rules at each step;
    return (state, failures, delay) after each outcome."""
    sup = ReconnectSupervisor(policy, random=random.Random(seed).random)
    now, trace = 0.0, []
    for outcome in plan:
        if not sup.should_connect(now):
            assert sup.gave_up  # waiting is over at the due time, so only giving up stops
            assert sup.get_timer() is None and not sup.should_connect(now + 1e6)
            break
        before = sup.failures
        sup.connecting(now)
        if outcome.failure is not None:
            f = outcome.failure
            sup.connection_failed(
                now, status=f.status, code=f.code, self_link=f.self_link, reason=f.reason
            )
            assert sup.failures == before + 1
            permanent = f.permanent
        else:
            sup.connected(now)
            start, now = now, now + outcome.up_for
            sup.disconnected(now)
            stable = now - start >= policy.stable_after
            # the count starts again only after a stable connection
            assert sup.failures == (1 if stable else before + 1)
            permanent = False
        if permanent:
            assert sup.gave_up and sup.permanent
        elif policy.max_attempts and sup.failures > policy.max_attempts:
            assert sup.gave_up and not sup.permanent
        else:
            assert sup.state is ReconnectState.WAITING
            assert sup.delay is not None
            ceiling = min(
                policy.max_delay,
                policy.initial_delay * policy.backoff_multiplier ** (sup.failures - 1),
            )
            assert 0.0 <= sup.delay <= ceiling <= policy.max_delay
            due = wait(sup)
            assert due == now + sup.delay
            if now + sup.delay / 2 < due:
                assert not sup.should_connect(now + sup.delay / 2)
            now = due
        trace.append((sup.state, sup.failures, sup.delay))
    return trace


@given(policy=policies, plan=outcomes, seed=st.integers(0, 2**32))
def test_the_schedule_keeps_every_rule(
    policy: ReconnectPolicy, plan: list[Outcome], seed: int
) -> None:
    drive(policy, plan, seed)


@given(policy=policies, plan=outcomes, seed=st.integers(0, 2**32))
def test_the_schedule_is_deterministic_with_a_seeded_random(
    policy: ReconnectPolicy, plan: list[Outcome], seed: int
) -> None:
    assert drive(policy, plan, seed) == drive(policy, plan, seed)


@given(
    statuses=st.lists(st.sampled_from(sorted(PERMANENT_STATUSES)), min_size=1, max_size=1),
    transient=st.integers(0, 10),
)
def test_a_permanent_failure_after_transient_ones_is_never_retried(
    statuses: list[int], transient: int
) -> None:
    sup = ReconnectSupervisor()
    now = 0.0
    for _ in range(transient):
        fail(sup, now, status=503)
        now = wait(sup)
    fail(sup, now, status=statuses[0])
    assert sup.gave_up and not sup.should_connect(now + 1e9)


@given(attempt=st.integers(1, 5_000), jitter=st.floats(0, 1))
def test_policy_delays_stay_within_zero_and_the_cap(attempt: int, jitter: float) -> None:
    policy = ReconnectPolicy(initial_delay=0.5, max_delay=30.0, backoff_multiplier=3.0)
    delay = policy.delay(attempt, jitter)
    assert delay is not None and 0.0 <= delay <= 30.0
