"""Recent samples in memory, and a downsampled history in a database that survives restarts.

Every ``step_s`` seconds the points of the samples in that step are averaged and written
as one row per series; rows older than ``retention_days`` are deleted.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator

from sqlalchemy import Integer, String, Text, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .. import db
from .collector import Sample
from .points import SeriesKey, points_of


class _Base(DeclarativeBase):
    pass


class HistoryPoint(_Base):
    __tablename__ = "labvm_monitor_points"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(255), index=True)
    t: Mapped[int] = mapped_column(Integer, index=True)  # start of the step, unix seconds
    values: Mapped[str] = mapped_column(Text)  # JSON object of averaged numbers


class RecentSamples:
    """The last ``size`` samples, newest last."""

    def __init__(self, size: int) -> None:
        self.samples: deque[Sample] = deque(maxlen=max(1, size))

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


class History:
    def __init__(self, db_url: str, step_s: int = 60, retention_days: float = 8) -> None:
        self.engine = db.engine(db_url)
        _Base.metadata.create_all(self.engine)
        self.step_s = int(step_s)
        self.retention_s = retention_days * 86400
        self._bucket: int | None = None
        self._node = ""
        self._sums: dict[SeriesKey, dict[str, float]] = {}
        self._counts: dict[SeriesKey, int] = {}
        self._pruned_at = 0.0

    def close(self) -> None:
        self.flush()
        self.engine.dispose()

    # ---- writing -------------------------------------------------------------

    def add(self, sample: Sample) -> None:
        bucket = int(sample.t // self.step_s * self.step_s)
        if self._bucket is not None and bucket != self._bucket:
            self.flush()
        self._bucket, self._node = bucket, sample.node
        for key, values in points_of(sample).items():
            sums = self._sums.setdefault(key, {})
            for name, v in values.items():
                sums[name] = sums.get(name, 0.0) + float(v)
            self._counts[key] = self._counts.get(key, 0) + 1
        if time.time() - self._pruned_at > 3600:
            self.prune()

    def flush(self) -> None:
        """Write the averages of the current step (also called at shutdown)."""
        if self._bucket is None or not self._sums:
            return
        rows = [
            HistoryPoint(node=self._node, kind=kind, subject=subject, t=self._bucket,
                         values=json.dumps({k: v / self._counts[(kind, subject)]
                                            for k, v in sums.items()}))
            for (kind, subject), sums in self._sums.items()
        ]
        with Session(self.engine) as s, s.begin():
            s.add_all(rows)
        self._sums.clear()
        self._counts.clear()
        self._bucket = None

    def prune(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        self._pruned_at = now
        with Session(self.engine) as s, s.begin():
            result = s.execute(delete(HistoryPoint).where(HistoryPoint.t < now - self.retention_s))
        return result.rowcount or 0

    # ---- reading -------------------------------------------------------------

    def series(self, kind: str, subject: str, since: float,
               recent: Iterable[Sample] | None = None) -> list[tuple[float, dict[str, float]]]:
        """Stored points from ``since`` on, then the finer recent ones after the last stored.

        ``recent``: the samples kept in memory, of one node or of several."""
        with Session(self.engine) as s:
            rows = s.execute(
                select(HistoryPoint.t, HistoryPoint.values)
                .where(HistoryPoint.kind == kind, HistoryPoint.subject == subject,
                       HistoryPoint.t >= since)
                .order_by(HistoryPoint.t)
            ).all()
        out = [(float(t), json.loads(v)) for t, v in rows]
        last = out[-1][0] + self.step_s if out else since
        for sample in sorted(recent or (), key=lambda x: x.t):
            if sample.t >= last:
                values = points_of(sample).get((kind, subject))
                if values is not None:
                    out.append((sample.t, values))
        return out

    def nodes(self) -> list[str]:
        with Session(self.engine) as s:
            return sorted(s.scalars(select(HistoryPoint.node).distinct()))
