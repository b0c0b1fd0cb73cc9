"""Admission: which incoming connections a server takes, decided once for every adapter.

Two kinds of slots, counted apart:

- **pending**: accepted TCP (or TLS) connections still in the WebSocket upgrade. At most
  ``max_pending``, each for at most ``pending_timeout`` seconds. When the pending slots are full,
  a new connection takes the slot of the *oldest* pending one, which is closed: an idle
  connection never completes its upgrade, a real client completes it within a round trip, so a
  flood of idle connections cannot keep a real client out (it would have to open
  ``max_pending`` connections in that round trip).
- **open**: links past the upgrade. At most ``max_links`` in all and ``max_links_per_address``
  from one client address; beyond, the upgrade is refused (HTTP 503), so one address cannot
  take every slot.

Pure and sans-IO like the rest of the core: the adapter reports each connection and passes
``now``; :meth:`get_timer` / :meth:`expired` give the pending connections to close.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

__all__ = ["Admission", "AdmissionLimits", "Ticket"]


@dataclass(frozen=True)
class AdmissionLimits:
    """The server's admission limits (the defaults are documented in the README)."""

    #: connections in the upgrade at once (the oldest is closed to make room for a new one)
    max_pending: int = 64
    #: seconds a connection may take to complete its upgrade
    pending_timeout: float = 5.0
    #: open links in all
    max_links: int = 100
    #: open links from one client address
    max_links_per_address: int = 32

    def __post_init__(self) -> None:
        if min(self.max_pending, self.max_links, self.max_links_per_address) < 1:
            raise ValueError("admission limits must be at least 1")
        if not self.pending_timeout > 0:
            raise ValueError("pending_timeout must be positive")


@dataclass(eq=False)
class Ticket:
    """One admitted connection, from accept to close."""

    address: str
    deadline: float
    open: bool = False
    released: bool = False


class Admission:
    """Counts a server's connections against :class:`AdmissionLimits`."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self._pending: dict[Ticket, None] = {}  # oldest first
        self._open_per_address: Counter[str] = Counter()
        self._open = 0
        #: pending connections closed to make room (counted for the operator)
        self.evicted = 0
        #: pending connections closed at their deadline
        self.timed_out = 0
        #: upgrades refused for want of an open slot
        self.refused = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def open(self) -> int:
        return self._open

    def open_from(self, address: str) -> int:
        return self._open_per_address[address]

    def connected(self, address: str, now: float) -> tuple[Ticket, Ticket | None]:
        """A connection was accepted: its ticket, and the oldest pending one to close when
        the pending slots were full (``None`` otherwise)."""
        evict = None
        if len(self._pending) >= self.limits.max_pending:
            evict = next(iter(self._pending))
            self.release(evict)
            self.evicted += 1
        ticket = Ticket(address, now + self.limits.pending_timeout)
        self._pending[ticket] = None
        return ticket, evict

    def upgrade(self, ticket: Ticket) -> str | None:
        """The connection asks to become a link: ``None`` when it may (it now holds an open
        slot), else why not (answer HTTP 503 and close)."""
        if ticket.released or ticket.open:
            raise ValueError("upgrade of a ticket that is not pending")
        limits = self.limits
        if self._open >= limits.max_links:
            self.refused += 1
            return f"server full: {self._open} links open (max_links {limits.max_links})"
        if self._open_per_address[ticket.address] >= limits.max_links_per_address:
            self.refused += 1
            return (
                f"too many links from {ticket.address} "
                f"(max_links_per_address {limits.max_links_per_address})"
            )
        del self._pending[ticket]
        ticket.open = True
        self._open += 1
        self._open_per_address[ticket.address] += 1
        return None

    def release(self, ticket: Ticket) -> None:
        """The connection ended (at any stage; again is a no-op)."""
        if ticket.released:
            return
        ticket.released = True
        if ticket.open:
            self._open -= 1
            left = self._open_per_address[ticket.address] - 1
            if left:
                self._open_per_address[ticket.address] = left
            else:
                del self._open_per_address[ticket.address]
        else:
            self._pending.pop(ticket, None)

    def get_timer(self) -> float | None:
        """When the oldest pending connection's deadline falls, or ``None``."""
        for ticket in self._pending:
            return ticket.deadline
        return None

    def expired(self, now: float) -> list[Ticket]:
        """Pending connections past their deadline, released: the adapter closes them."""
        out = []
        for ticket in list(self._pending):
            if ticket.deadline > now:
                break  # deadlines grow with arrival: the rest are later
            self.release(ticket)
            out.append(ticket)
        self.timed_out += len(out)
        return out
