"""Node-wide figures from /proc and statvfs, and which container a host PID lives in."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# Docker's cgroup names carry the 64-hex container id: ".../docker/<id>" with the cgroupfs
# driver, ".../docker-<id>.scope" with the systemd driver (v1 and v2 alike).
_CONTAINER_ID = re.compile(r"docker[-/]([0-9a-f]{64})")


@dataclass(frozen=True)
class CpuTimes:
    busy: int  # jiffies spent not idle, all CPUs
    total: int


def read_cpu_times(proc: Path = Path("/proc")) -> CpuTimes:
    fields = [int(x) for x in (proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return CpuTimes(busy=total - idle, total=total)


def cpu_percent(before: CpuTimes | None, after: CpuTimes) -> float:
    """Busy share of the whole node between two readings, 0..100."""
    if before is None or after.total <= before.total:
        return 0.0
    return 100.0 * (after.busy - before.busy) / (after.total - before.total)


def read_meminfo(proc: Path = Path("/proc")) -> tuple[int, int]:
    """(used, total) bytes; used excludes what the kernel can reclaim (MemAvailable)."""
    values: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable"):
            values[name] = int(rest.split()[0]) * 1024
    total = values.get("MemTotal", 0)
    return total - values.get("MemAvailable", total), total


def disk_usage(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(free, total) bytes of the file system holding ``path``; (0, 0) if it is missing."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0, 0
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def container_of_pid(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The Docker container id whose cgroup holds host process ``pid``, if any."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:  # the process has exited, or never existed on this host
        return None
    m = _CONTAINER_ID.search(text)
    return m.group(1) if m else None
