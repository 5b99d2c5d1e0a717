"""Failed-login limits per source address and per user, over a sliding window."""

from __future__ import annotations

import time
from collections import defaultdict, deque


class Throttle:
    """At most ``max_failures`` failed logins per source and per user in ``window_s``;
    past that, every login from that source (or as that user) is refused until the
    oldest failure leaves the window."""

    def __init__(self, max_per_source: int = 10, max_per_user: int = 20,
                 window_s: float = 300.0, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.max_per_source = max_per_source
        self.max_per_user = max_per_user
        self.window_s = window_s
        self._clock = clock
        self._source: dict[str, deque[float]] = defaultdict(deque)
        self._user: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, table: dict[str, deque[float]], name: str) -> int:
        q = table.get(name)
        if q is None:
            return 0
        cut = self._clock() - self.window_s
        while q and q[0] < cut:
            q.popleft()
        if not q:
            del table[name]
            return 0
        return len(q)

    def blocked(self, source: str, user: str | None = None) -> str | None:
        """Why a login from ``source`` as ``user`` is refused now, or None."""
        if self._recent(self._source, source) >= self.max_per_source:
            return f"too many failed logins from {source}"
        if user is not None and self._recent(self._user, user) >= self.max_per_user:
            return f"too many failed logins as {user}"
        return None

    def failed(self, source: str, user: str | None) -> None:
        now = self._clock()
        self._source[source].append(now)
        if user is not None:
            self._user[user].append(now)
        # Bound memory under a spray of sources: forget the oldest ones.
        for table in (self._source, self._user):
            if len(table) > 10_000:
                for name in list(table)[:1000]:
                    del table[name]
