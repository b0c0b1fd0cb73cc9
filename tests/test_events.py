"""Typed node events: ``EventType`` members work wherever the seed's strings did (handlers'
type filters, comparisons), and ``FederationEvent`` carries the error code as a value."""

from __future__ import annotations

import logging

from rhizome_adapters._base import EventHandlers
from rhizome_proto import ErrorCode, EventType, FederationEvent


def test_handlers_subscribed_with_members_or_strings_get_the_same_events() -> None:
    handlers = EventHandlers(logging.getLogger("test"))
    by_member: list[FederationEvent] = []
    by_string: list[FederationEvent] = []
    handlers.subscribe(by_member.append, (EventType.LINK_ERROR, EventType.SYNC_COMPLETED))
    handlers.subscribe(by_string.append, ("link:error", "sync:completed"))
    assert handlers.wants("link:error") and handlers.wants(EventType.SYNC_COMPLETED)
    assert not handlers.wants(EventType.DELTA_RECEIVED)
    error = FederationEvent(
        type=EventType.LINK_ERROR, link_id="l", reason="SYNC_ERROR: busy", code=ErrorCode.SYNC_ERROR
    )
    for event in (
        error,
        FederationEvent(type=EventType.LINK_CONNECTED, link_id="l"),
        FederationEvent(type=EventType.SYNC_COMPLETED, link_id="l", count=3),
    ):
        handlers.call(event)
    assert by_member == by_string
    assert [e.type for e in by_member] == [EventType.LINK_ERROR, EventType.SYNC_COMPLETED]
    assert by_member[0].code is ErrorCode.SYNC_ERROR and not by_member[0].fatal


def test_an_event_made_with_a_string_still_compares_equal() -> None:
    old_style = FederationEvent(type="link:connected", link_id="l")  # type: ignore[arg-type]
    assert old_style == FederationEvent(type=EventType.LINK_CONNECTED, link_id="l")
    assert old_style.type == EventType.LINK_CONNECTED
