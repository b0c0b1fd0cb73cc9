"""Admission of incoming connections: pending (upgrade) slots apart from open links."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rhizome_proto._admission import Admission, AdmissionLimits, Ticket


def test_limits_are_checked() -> None:
    for bad in ({"max_pending": 0}, {"max_links": 0}, {"max_links_per_address": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            AdmissionLimits(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        AdmissionLimits(pending_timeout=0)


def test_a_flood_of_idle_connections_never_keeps_a_real_client_out() -> None:
    """100 idle connections a second from one address, for a minute; a real client (same
    address) connects every 0.37 s and sends its upgrade request 0.3 s later (30 idle arrivals
    meanwhile): it always gets in, and only idle connections are closed."""
    adm = Admission(AdmissionLimits(max_pending=64, pending_timeout=5))
    clients: dict[int, Ticket] = {}  # step at which the client's upgrade arrives -> ticket
    got_in, closed = 0, []
    for step in range(6000):
        now = step / 100
        _, evicted = adm.connected("10.0.0.1", now)
        closed += [evicted, *adm.expired(now)]
        if step % 37 == 0:
            ticket, evicted = adm.connected("10.0.0.1", now)
            closed.append(evicted)
            clients[step + 30] = ticket
        if step in clients:
            ticket = clients.pop(step)
            assert adm.upgrade(ticket) is None
            got_in += 1
            adm.release(ticket)
        assert adm.pending <= 64
    closed = [t for t in closed if t is not None]
    assert got_in == len(range(0, 6000 - 30, 37)) and len(closed) > 5000
    assert adm.evicted + adm.timed_out == len(closed)


def test_open_links_are_limited_in_all_and_per_address() -> None:
    adm = Admission(AdmissionLimits(max_links=3, max_links_per_address=2))
    a1, _ = adm.connected("a", 0)
    a2, _ = adm.connected("a", 0)
    a3, _ = adm.connected("a", 0)
    assert adm.upgrade(a1) is None and adm.upgrade(a2) is None
    assert adm.upgrade(a3) == "too many links from a (max_links_per_address 2)"
    b1, _ = adm.connected("b", 0)
    b2, _ = adm.connected("b", 0)
    assert adm.upgrade(b1) is None
    assert adm.upgrade(b2) == "server full: 3 links open (max_links 3)"
    assert adm.refused == 2 and adm.open == 3 and adm.open_from("a") == 2
    adm.release(a1)
    adm.release(a1)  # again: nothing
    assert adm.upgrade(a3) is None and adm.open_from("a") == 2
    with pytest.raises(ValueError):
        adm.upgrade(a3)


def test_pending_deadlines() -> None:
    adm = Admission(AdmissionLimits(pending_timeout=2))
    assert adm.get_timer() is None
    t1, _ = adm.connected("x", 10)
    t2, _ = adm.connected("x", 11)
    assert adm.get_timer() == 12
    assert adm.expired(11.9) == []
    assert adm.expired(12) == [t1] and t1.released
    assert adm.get_timer() == 13
    assert adm.upgrade(t2) is None
    assert adm.get_timer() is None and adm.expired(100) == [] and adm.timed_out == 1


class AdmissionMachine(RuleBasedStateMachine):
    """Random arrivals, upgrades, closes and deadlines against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = AdmissionLimits(
            max_pending=3, pending_timeout=1.0, max_links=4, max_links_per_address=2
        )
        self.adm = Admission(self.limits)
        self.now = 0.0
        self.pending: list[Ticket] = []
        self.open: list[Ticket] = []

    @rule(address=st.sampled_from("abc"))
    def connect(self, address: str) -> None:
        ticket, evicted = self.adm.connected(address, self.now)
        if len(self.pending) == self.limits.max_pending:
            assert evicted is self.pending.pop(0)
        else:
            assert evicted is None
        self.pending.append(ticket)

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 10))
    def upgrade(self, i: int) -> None:
        ticket = self.pending[i % len(self.pending)]
        same = sum(t.address == ticket.address for t in self.open)
        allowed = len(self.open) < self.limits.max_links and same < 2
        assert (self.adm.upgrade(ticket) is None) == allowed
        if allowed:
            self.pending.remove(ticket)
            self.open.append(ticket)

    @precondition(lambda self: self.pending or self.open)
    @rule(i=st.integers(0, 10))
    def close(self, i: int) -> None:
        both = self.pending + self.open
        ticket = both[i % len(both)]
        self.adm.release(ticket)
        (self.pending if ticket in self.pending else self.open).remove(ticket)

    @rule(dt=st.floats(0, 1.5))
    def tick(self, dt: float) -> None:
        self.now += dt
        due = [t for t in self.pending if t.deadline <= self.now]
        assert self.adm.expired(self.now) == due
        self.pending = [t for t in self.pending if t not in due]

    @invariant()
    def counts_match(self) -> None:
        assert self.adm.pending == len(self.pending) <= self.limits.max_pending
        assert self.adm.open == len(self.open) <= self.limits.max_links
        for address in "abc":
            assert self.adm.open_from(address) == sum(t.address == address for t in self.open)
        deadlines = [t.deadline for t in self.pending]
        assert self.adm.get_timer() == (min(deadlines) if deadlines else None)


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
