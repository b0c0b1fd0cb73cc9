"""``ReconnectSupervisor``: when an outgoing link connects again, decided once for every adapter.

Sans-IO like the connection: no clock (``now`` is an argument, monotonic seconds), no sleeping,
no randomness of its own (the jitter source is injected). The adapter drives it like a
connection::

    supervisor = ReconnectSupervisor(link_config.reconnect)
    while not stopping:
        now = clock()
        if not supervisor.should_connect(now):
            if supervisor.gave_up:
                report(supervisor.final_reason)
                break
            sleep(supervisor.get_timer() - now)   # or until stopped
            continue
        supervisor.connecting(now)
        try:
            transport = open_transport()
        except OSError as exc:
            supervisor.connection_failed(clock(), reason=str(exc))
            continue
        run_the_connection()        # on the node's link:connected: supervisor.connected(clock())
        if the_handshake_completed:
            supervisor.disconnected(clock(), code=..., reason=...)
        else:
            supervisor.connection_failed(
                clock(), status=conn.reject_status, code=..., self_link=..., reason=...
            )

What counts:

* An **attempt** is one try to open the link: the transport, the HTTP upgrade and the
  federation handshake, from :meth:`~ReconnectSupervisor.connecting` to
  :meth:`~ReconnectSupervisor.connected` (it succeeded) or
  :meth:`~ReconnectSupervisor.connection_failed`.
* A **failure** is a failed attempt, or a connection that ended before it stayed up
  ``stable_after`` seconds (a link that connects then drops at once does not clear the count).
  A connection that stayed up that long clears the count when it ends; its end is then
  failure 1. After failure ``n`` the supervisor waits a delay drawn from
  ``[0, min(max_delay, initial_delay * backoff_multiplier ** (n - 1))]`` (full jitter), then
  says to connect again; with ``max_attempts`` set it gives up at failure ``max_attempts + 1``
  (so at most ``max_attempts`` retries in a row), and with ``enabled=False`` at the first.
* A **permanent** failure is never retried: the upgrade refused with an HTTP status of
  :data:`PERMANENT_STATUSES` (401, 403, 404, 410: asking again changes nothing), the peer's
  fatal ``error`` with a code of :data:`PERMANENT_CODES` (``PROTOCOL_MISMATCH``,
  ``UNAUTHORIZED``, ``SELF_LINK``), or a remote system id equal to ours (a link to
  ourselves). Everything else
  (refused or lost transport, timeouts, TLS failures, 5xx such as the 503 of a full server, a
  peer that broke the protocol) is retried.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ._config import ReconnectPolicy
from ._errors import ErrorCode, LocalProtocolError

__all__ = [
    "PERMANENT_CODES",
    "PERMANENT_STATUSES",
    "ConnectFailure",
    "ReconnectState",
    "ReconnectSupervisor",
]

#: HTTP statuses of a refused upgrade that retrying cannot change.
PERMANENT_STATUSES: frozenset[int] = frozenset({401, 403, 404, 410})
#: Codes of a peer's ``error`` that retrying cannot change.
PERMANENT_CODES: frozenset[ErrorCode | str] = frozenset(
    {ErrorCode.PROTOCOL_MISMATCH, ErrorCode.UNAUTHORIZED, ErrorCode.SELF_LINK}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectFailure:
    """Why an attempt failed or a connection ended, as structured data (never text to match).

    ``status``: the HTTP status the server refused the upgrade with
    (``FederationConnection.reject_status``). ``code``: the error code that ended it (the
    peer's fatal ``error``, as in ``FederationEvent.code``, or that of the
    ``RemoteProtocolError`` raised). ``self_link``: the remote system id is ours. ``reason``:
    text for people.
    """

    status: int | None = None
    code: ErrorCode | str | None = None
    self_link: bool = False
    reason: str = ""

    @property
    def permanent(self) -> bool:
        """Retrying cannot help (see the module's documentation)."""
        return (
            self.self_link
            or (self.status is not None and self.status in PERMANENT_STATUSES)
            or (self.code is not None and self.code in PERMANENT_CODES)
        )

    def describe(self) -> str:
        """One line saying what happened."""
        if self.self_link:
            what = "the remote system id is our own (a link to ourselves)"
        elif self.status is not None:
            what = f"upgrade refused with HTTP {self.status}"
        elif self.code is not None:
            what = str(self.code)
        else:
            what = ""
        if what and self.reason:
            return f"{what}: {self.reason}"
        return what or self.reason or "failed"


class ReconnectState(Enum):
    """Where an outgoing link's supervisor is."""

    #: connect now (:meth:`ReconnectSupervisor.should_connect` is true)
    READY = "ready"
    #: an attempt is under way
    CONNECTING = "connecting"
    #: the handshake completed
    CONNECTED = "connected"
    #: waiting until :meth:`ReconnectSupervisor.get_timer` before the next attempt
    WAITING = "waiting"
    #: final: no more attempts (:attr:`ReconnectSupervisor.final_reason` says why)
    GAVE_UP = "gave_up"


class ReconnectSupervisor:
    """Decides when an outgoing link connects again (see the module's documentation).

    Parameters:
        policy: the link's :class:`ReconnectPolicy` (``LinkConfig.reconnect``).
        random: the jitter source, a callable returning a float in [0, 1); seed it (for
            instance ``random.Random(seed).random``) to replay a schedule exactly.

    Starts ``READY``: the first attempt is made at once. Calls out of turn (``connected``
    without ``connecting``, anything after giving up but :meth:`reset`) raise
    :class:`LocalProtocolError` and change nothing.
    """

    def __init__(
        self,
        policy: ReconnectPolicy | None = None,
        *,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.policy = policy or ReconnectPolicy()
        self._random = random
        self.state = ReconnectState.READY
        #: failures in a row since the last stable connection (see the module's documentation)
        self.failures = 0
        #: attempts started in all
        self.attempts = 0
        #: the last failure, if any
        self.last_failure: ConnectFailure | None = None
        #: the first failure since the last stable connection, if any
        self.first_failure: ConnectFailure | None = None
        #: the last delay drawn (seconds), if any
        self.delay: float | None = None
        #: why the supervisor gave up, once it has
        self.final_reason: str | None = None
        self._due: float | None = None
        self._connected_at: float | None = None

    # ---------------------------------------------------------------- state

    @property
    def gave_up(self) -> bool:
        return self.state is ReconnectState.GAVE_UP

    @property
    def permanent(self) -> bool:
        """It gave up on a permanent failure (rather than running out of attempts)."""
        return self.gave_up and self.last_failure is not None and self.last_failure.permanent

    def get_timer(self) -> float | None:
        """When the next attempt is due (monotonic seconds) while waiting, else ``None``."""
        return self._due if self.state is ReconnectState.WAITING else None

    def handle_timer(self, now: float) -> None:
        """The wait is over at ``now``: ``WAITING`` becomes ``READY`` (nothing happens before
        the deadline or in any other state)."""
        if self.state is ReconnectState.WAITING and self._due is not None and now >= self._due:
            self.state, self._due = ReconnectState.READY, None

    def should_connect(self, now: float) -> bool:
        """:meth:`handle_timer`, then whether an attempt is to be made now."""
        self.handle_timer(now)
        return self.state is ReconnectState.READY

    # ---------------------------------------------------------------- inputs

    def connecting(self, now: float) -> None:
        """An attempt starts (only when :meth:`should_connect` said so)."""
        self._expect(ReconnectState.READY, "connecting")
        self.state = ReconnectState.CONNECTING
        self.attempts += 1

    def connected(self, now: float) -> None:
        """The attempt succeeded: the federation handshake completed at ``now``."""
        self._expect(ReconnectState.CONNECTING, "connected")
        self.state, self._connected_at = ReconnectState.CONNECTED, now

    def connection_failed(
        self,
        now: float,
        *,
        status: int | None = None,
        code: ErrorCode | str | None = None,
        self_link: bool = False,
        reason: str = "",
    ) -> None:
        """The attempt failed before the handshake completed (see :class:`ConnectFailure` for
        the fields); the next one is scheduled, or the supervisor gives up."""
        self._expect(ReconnectState.CONNECTING, "connection_failed")
        failure = ConnectFailure(status=status, code=code, self_link=self_link, reason=reason)
        self._failed(now, failure)

    def disconnected(
        self,
        now: float,
        *,
        code: ErrorCode | str | None = None,
        self_link: bool = False,
        reason: str = "",
    ) -> None:
        """The connection ended at ``now`` (``code``: the error code that ended it, if any).
        If it stayed up ``stable_after`` seconds the count of failures starts again."""
        self._expect(ReconnectState.CONNECTED, "disconnected")
        assert self._connected_at is not None
        if now - self._connected_at >= self.policy.stable_after:
            self.failures, self.first_failure = 0, None
        self._connected_at = None
        self._failed(now, ConnectFailure(code=code, self_link=self_link, reason=reason))

    def reset(self) -> None:
        """Start afresh and connect at once (the application asked to reconnect now, for
        instance after the supervisor gave up); an attempt under way must have ended."""
        if self.state in (ReconnectState.CONNECTING, ReconnectState.CONNECTED):
            raise LocalProtocolError(
                f"cannot reset while {self.state.value}", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        self.state = ReconnectState.READY
        self.failures, self.first_failure, self.last_failure = 0, None, None
        self.delay = self.final_reason = self._due = None

    # ---------------------------------------------------------------- internals

    def _failed(self, now: float, failure: ConnectFailure) -> None:
        self.failures += 1
        self.last_failure = failure
        if self.first_failure is None:
            self.first_failure = failure
        if failure.permanent:
            self._give_up(f"not retried: {failure.describe()}")
            return
        delay = self.policy.delay(self.failures, self._random())
        if delay is None:
            if not self.policy.enabled:
                self._give_up(f"reconnection is disabled; {failure.describe()}")
            else:
                first = self.first_failure.describe()
                self._give_up(f"gave up after {self.failures} failed attempt(s); first: {first}")
            return
        self.state, self.delay, self._due = ReconnectState.WAITING, delay, now + delay

    def _give_up(self, reason: str) -> None:
        self.state, self.final_reason, self._due = ReconnectState.GAVE_UP, reason, None

    def _expect(self, state: ReconnectState, call: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(
                f"{call}() while {self.state.value} (expected {state.value})",
                code=ErrorCode.UNEXPECTED_MESSAGE,
            )
