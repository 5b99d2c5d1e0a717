"""Per-container CPU, memory, block IO and pid counts read straight from cgroupfs.

Reading a few small files per container is far cheaper than the Docker stats API
(which streams and blocks for a second per container). Both cgroup v1 (one tree per
controller) and v2 (one unified tree) are supported, with either cgroup driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class CgroupReading:
    cpu_ns: int  # cumulative CPU time
    mem_used: int
    mem_limit: int  # 0 = unlimited
    io_read: int  # cumulative bytes
    io_write: int
    pids: int
    cpu_limit: float  # cores; 0 = unlimited


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    if text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        return 0


def _read_kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


class CgroupReader:
    """Finds each container's cgroup directories once, then reads them cheaply."""

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self.root = Path(root)
        self.v2 = (self.root / "cgroup.controllers").exists()
        self._dirs: dict[str, Path | None] = {}

    def _candidates(self, base: Path, cid: str) -> list[Path]:
        return [base / "docker" / cid, base / "system.slice" / f"docker-{cid}.scope"]

    def _find(self, controller: str, cid: str) -> Path | None:
        """The container's directory under ``controller`` (v1) or the unified tree (v2)."""
        cache_key = f"{controller}/{cid}"
        if cache_key not in self._dirs:
            base = self.root if self.v2 else self.root / controller
            self._dirs[cache_key] = next(
                (p for p in self._candidates(base, cid) if p.is_dir()), None
            )
        return self._dirs[cache_key]

    def forget(self, keep: set[str]) -> None:
        """Drop cached paths of containers no longer present."""
        self._dirs = {k: v for k, v in self._dirs.items() if k.split("/", 1)[1] in keep}

    def read(self, cid: str) -> CgroupReading | None:
        return self._read_v2(cid) if self.v2 else self._read_v1(cid)

    def _read_v1(self, cid: str) -> CgroupReading | None:
        cpu = self._find("cpuacct", cid)
        if cpu is None:
            return None
        mem = self._find("memory", cid)
        blk = self._find("blkio", cid)
        pids = self._find("pids", cid)
        mem_used = mem_limit = 0
        if mem is not None:
            stat = _read_kv(mem / "memory.stat")
            # Like `docker stats`: page cache the kernel can drop is not counted as used.
            mem_used = max(0, _read_int(mem / "memory.usage_in_bytes")
                           - stat.get("total_inactive_file", 0))
            mem_limit = _read_int(mem / "memory.limit_in_bytes")
            if mem_limit >= _UNLIMITED:
                mem_limit = 0
        io_read = io_write = 0
        if blk is not None:
            io_read, io_write = _blkio_v1(blk / "blkio.throttle.io_service_bytes")
        return CgroupReading(
            cpu_ns=_read_int(cpu / "cpuacct.usage"),
            mem_used=mem_used,
            mem_limit=mem_limit,
            io_read=io_read,
            io_write=io_write,
            pids=_read_int(pids / "pids.current") if pids is not None else 0,
            cpu_limit=_cpu_limit_v1(self._find("cpu", cid)),
        )

    def _read_v2(self, cid: str) -> CgroupReading | None:
        d = self._find("", cid)
        if d is None:
            return None
        cpu = _read_kv(d / "cpu.stat")
        stat = _read_kv(d / "memory.stat")
        io_read = io_write = 0
        try:
            io_lines = (d / "io.stat").read_text().splitlines()
        except OSError:
            io_lines = []
        for line in io_lines:
            for field in line.split()[1:]:
                name, _, value = field.partition("=")
                if name == "rbytes":
                    io_read += int(value)
                elif name == "wbytes":
                    io_write += int(value)
        return CgroupReading(
            cpu_ns=cpu.get("usage_usec", 0) * 1000,
            mem_used=max(0, _read_int(d / "memory.current") - stat.get("inactive_file", 0)),
            mem_limit=_read_int(d / "memory.max"),
            io_read=io_read,
            io_write=io_write,
            pids=_read_int(d / "pids.current"),
            cpu_limit=_cpu_limit_v2(d / "cpu.max"),
        )


def _blkio_v1(path: Path) -> tuple[int, int]:
    read = write = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            read += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            write += int(parts[2])
    return read, write


def _cpu_limit_v1(d: Path | None) -> float:
    if d is None:
        return 0.0
    quota, period = _read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us")
    return quota / period if quota > 0 and period > 0 else 0.0


def _cpu_limit_v2(path: Path) -> float:
    try:
        quota, period = path.read_text().split()
    except (OSError, ValueError):
        return 0.0
    return int(quota) / int(period) if quota != "max" and int(period) > 0 else 0.0
