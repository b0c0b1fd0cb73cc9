"""User-facing link configuration (Python naming, seconds) and the reconnection schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._filter import DeltaFilter
from ._messages import FederationConfig, InitialSync, Mode, ReconnectConfig
from ._trust import TrustPolicy

__all__ = ["LinkConfig", "ReconnectPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconnectPolicy:
    """Exponential backoff with full jitter for outgoing links (times in seconds), applied by
    :class:`~rhizome_proto.ReconnectSupervisor`.

    The wait before retry ``n`` (the ``n``-th failure in a row) is drawn uniformly from
    ``[0, min(max_delay, initial_delay * backoff_multiplier ** (n - 1))]``. ``max_attempts``:
    the most retries in a row (0: retry forever); a failed *first* connect is retried too,
    unlike the reference. ``enabled=False`` never retries. A connection counts as a success
    (and clears the count of failures) only once it stayed up ``stable_after`` seconds: one
    that connects then drops at once is one more failure.
    """

    enabled: bool = True
    max_attempts: int = 0
    initial_delay: float = 1.0
    max_delay: float = 30.0
    backoff_multiplier: float = 2.0
    stable_after: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 0:
            raise ValueError("max_attempts must be >= 0 (0 = forever)")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError("need 0 <= initial_delay <= max_delay")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be >= 1")
        if self.stable_after < 0:
            raise ValueError("stable_after must be >= 0")

    def delay(self, attempt: int, jitter: float) -> float | None:
        """Seconds to wait before retry number ``attempt`` (1-based), or ``None`` to give up.

        ``jitter`` is a number in [0, 1] from the caller's random source (the core has none);
        the delay is ``jitter`` times the ceiling ``min(max_delay, initial_delay *
        backoff_multiplier ** (attempt - 1))`` (full jitter), so it is within [0, max_delay].
        """
        if not self.enabled or (self.max_attempts and attempt > self.max_attempts):
            return None
        ceiling = self.initial_delay
        if attempt > 1 and ceiling > 0:
            try:
                ceiling *= self.backoff_multiplier ** (attempt - 1)
            except OverflowError:  # far past max_delay
                ceiling = self.max_delay
        return min(ceiling, self.max_delay) * min(max(jitter, 0.0), 1.0)

    def to_wire(self) -> ReconnectConfig:
        """As the reference announces it in ``hello`` (milliseconds)."""
        return ReconnectConfig(
            enabled=self.enabled,
            max_attempts=self.max_attempts,
            initial_delay=round(self.initial_delay * 1000),
            max_delay=round(self.max_delay * 1000),
            backoff_multiplier=self.backoff_multiplier,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig:
    """How one link behaves (the seed's ``FederationConfig``).

    mode: ``"push"`` only sends, ``"pull"`` only receives, ``"bidirectional"`` both.
    initial_sync: ``"full"``, ``"from_timestamp"`` (with ``sync_from_timestamp``, ms) or
        ``"none"``; a client asks for it after the handshake (not in ``push`` mode).
    push_filter: what we send on this link. pull_filter: what we accept (and ask the server
        to sync).
    trust_policy: what this link accepts; ``None`` uses the node's policy.
    """

    mode: Mode = "bidirectional"
    initial_sync: InitialSync = "full"
    sync_from_timestamp: float = 0
    push_filter: DeltaFilter | None = None
    pull_filter: DeltaFilter | None = None
    trust_policy: TrustPolicy | None = None
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)

    def __post_init__(self) -> None:
        if self.mode not in ("push", "pull", "bidirectional"):
            raise ValueError(f"mode must be push, pull or bidirectional, not {self.mode!r}")
        if self.initial_sync not in ("full", "from_timestamp", "none"):
            raise ValueError(
                f"initial_sync must be full, from_timestamp or none, not {self.initial_sync!r}"
            )
        if self.sync_from_timestamp < 0:
            raise ValueError("sync_from_timestamp must be >= 0")

    @property
    def sends(self) -> bool:
        return self.mode != "pull"

    @property
    def receives(self) -> bool:
        return self.mode != "push"

    def to_wire(self) -> FederationConfig:
        """The ``hello`` config announcing this link."""
        return FederationConfig(
            mode=self.mode,
            initial_sync=self.initial_sync,
            sync_from_timestamp=self.sync_from_timestamp
            if self.initial_sync == "from_timestamp"
            else None,
            push_filter=self.push_filter,
            pull_filter=self.pull_filter,
            reconnect=self.reconnect.to_wire(),
            trust_policy=self.trust_policy.to_json() if self.trust_policy else None,
        )

    @staticmethod
    def mirror(remote: FederationConfig | None) -> LinkConfig:
        """A server's view of an incoming link: the client's push is our pull and vice versa."""
        mode = remote.mode if remote and remote.mode else "bidirectional"
        mirrored: Mode = {"push": "pull", "pull": "push"}.get(mode, "bidirectional")  # type: ignore[assignment]
        return LinkConfig(mode=mirrored, initial_sync="none")
