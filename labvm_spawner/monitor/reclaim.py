"""Idle GPU reclaim: stop a server whose GPUs have been idle too long, warning its user first.

The policy only decides; the service carries the decisions out (a notice file in the
user's home, the warning on their page, and a stop through the hub API). A stop keeps
the user's files: LabVMSpawner.stop leaves the upper in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from traitlets import Float
from traitlets.config import LoggingConfigurable

from .collector import Sample


@dataclass(frozen=True)
class Decision:
    action: str  # "warn", "clear" (busy again after a warning) or "stop"
    key: str
    user: str
    server: str
    idle_since: float
    stop_at: float


class IdleReclaim(LoggingConfigurable):
    idle_hours = Float(
        0.0, help="Stop a server whose GPUs have all been idle this many hours; 0 turns "
        "reclaim off. Servers without GPUs are never reclaimed."
    ).tag(config=True)
    warn_hours = Float(
        1.0, help="Warn the user this many hours before the stop."
    ).tag(config=True)
    idle_util_percent = Float(
        5.0, help="A GPU counts as idle while its utilisation is below this."
    ).tag(config=True)

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        # key -> when its GPUs became idle. In memory: a service restart only delays a stop.
        self.idle_since: dict[str, float] = {}
        self.warned: dict[str, Decision] = {}

    def decide(self, sample: Sample) -> list[Decision]:
        if self.idle_hours <= 0:
            return []
        util: dict[str, float] = {}
        for g in sample.gpus:
            if g.holder:
                util[g.holder] = max(util.get(g.holder, 0.0), g.util)
        decisions: list[Decision] = []
        running = {c.key: c for c in sample.containers}
        for key in list(self.idle_since):
            if key not in util or key not in running:  # stopped, or no longer holds GPUs
                self.idle_since.pop(key)
                self.warned.pop(key, None)
        for key, peak in util.items():
            c = running.get(key)
            if c is None:
                continue
            if peak >= self.idle_util_percent:
                self.idle_since.pop(key, None)
                old = self.warned.pop(key, None)
                if old is not None:
                    decisions.append(Decision("clear", key, c.user, c.server, 0.0, 0.0))
                continue
            since = self.idle_since.setdefault(key, sample.t)
            stop_at = since + self.idle_hours * 3600
            if sample.t >= stop_at:
                decisions.append(Decision("stop", key, c.user, c.server, since, stop_at))
                self.idle_since.pop(key)
                self.warned.pop(key, None)
            elif sample.t >= stop_at - self.warn_hours * 3600 and key not in self.warned:
                d = Decision("warn", key, c.user, c.server, since, stop_at)
                self.warned[key] = d
                decisions.append(d)
        return decisions
