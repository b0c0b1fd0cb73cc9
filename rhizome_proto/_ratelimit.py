"""Per-link rate limits (``RATE_LIMITED``): a token bucket, pure and sans-IO.

A link may bring ``rate`` units a second on average (a unit is one live delta or one other
message), with bursts of up to ``burst``. Past that the adapter stops reading from the link until
:meth:`TokenBucket.delay` has passed (TCP backpressure slows the peer; other links are read as
usual), and the peer is told once per excursion with a non-fatal ``RATE_LIMITED`` error.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` units a second, ``burst`` at most at once; ``now`` in monotonic seconds."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        if not self.burst >= 1:
            raise ValueError("burst must be at least 1")
        self._tokens = self.burst
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now

    def spend(self, units: float, now: float) -> float:
        """Count ``units`` that arrived at ``now`` (they are never refused: they are already
        here); return how long to stop reading so that the average stays within ``rate``
        (0 when within it)."""
        self._refill(now)
        self._tokens -= units
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def delay(self, now: float) -> float:
        """How long from ``now`` until the debt is paid (0 when none)."""
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
