"""Helpers shared by the benchmarks (tree building, timing, CPU, MooseFS)."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def make_files(root: Path, names: list[str], payload: bytes) -> None:
    """Create small files at the relative ``names`` (directories as needed)."""
    made: set[str] = set()
    for rel in names:
        d = os.path.dirname(rel)
        if d and d not in made:
            os.makedirs(root / d, exist_ok=True)
            made.add(d)
        fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload + rel.encode())
        os.close(fd)


def file_names(n: int, per_dir: int, prefix: str) -> list[str]:
    return [f"{prefix}{i // per_dir:05d}/f{i % per_dir:04d}" for i in range(n)]


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(round_no: int, runs: dict[str, Callable[[], object]],
              times: dict[str, list[float]]) -> dict[str, float]:
    """Time each of ``runs`` once, in an order that flips every round; record into ``times``.

    Flipping the order spreads warm caches and background load evenly over us and the
    competitor; flushing dirty pages first keeps one from paying for the other's writeback.
    """
    order = list(runs.items())
    if round_no % 2:
        order.reverse()
    took = {}
    for label, fn in order:
        os.sync()
        took[label] = timed(fn)
        times.setdefault(label, []).append(took[label])
    return took


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def moosefs_up() -> Path | None:
    """Mount point of the test MooseFS (started by scripts/moosefs.sh), or None."""
    state = os.environ.get("LABVM_MFS_DIR", "/var/lib/labvm/mfs-test")
    res = subprocess.run([str(REPO / "scripts" / "moosefs.sh"), "up", state],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(f"moosefs unavailable: {res.stderr.strip()[-300:]}")
        return None
    return Path(res.stdout.strip().splitlines()[-1])
