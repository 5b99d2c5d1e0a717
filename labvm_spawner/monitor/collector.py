"""One node's sample: GPUs (with their processes mapped to users), containers, the node.

Usable without the hub::

    c = Collector(node_name="n1", state_dir="/var/lib/labvm")
    sample = c.sample()     # call every few seconds; rates come from the previous call
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from .. import db
from ..errors import LabVMError
from ..node.allocations import GpuAllocator
from ..node.quota import Quotas
from ..storage.health import StoreProbe, StoreState
from . import procfs
from .cgroups import CgroupReader, CgroupReading
from .gpus import GpuSampler


@dataclass
class GpuProcess:
    pid: int
    used: int  # bytes of GPU memory
    container: str | None  # short container id
    key: str | None  # labvm.key of the container, None for a process outside LabVM
    user: str | None


@dataclass
class GpuSample:
    index: int
    uuid: str
    name: str
    util: float
    mem_util: float
    mem_used: int
    mem_total: int
    temp_c: float
    power_w: float
    holder: str | None  # labvm.key holding the GPU in the allocation records
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass
class ContainerSample:
    id: str  # short id
    key: str
    user: str
    server: str
    cpu_percent: float  # 100 = one core
    mem_used: int
    mem_limit: int  # 0 = none
    cpu_limit: float  # cores; 0 = none
    io_read: int  # cumulative bytes
    io_write: int
    pids: int


@dataclass
class NodeSample:
    cpu_percent: float  # whole node, 0..100
    cpu_count: int
    mem_used: int
    mem_total: int
    upper_free: int  # the disk holding the uppers (state_dir)
    upper_total: int
    store_free: int  # the layer store
    store_total: int
    store_reachable: bool = True  # False while it does not answer (storage/health.py)
    store_since: float = 0.0  # when it last became reachable or unreachable


@dataclass
class Sample:
    t: float  # unix time
    node: str
    host: NodeSample
    gpus: list[GpuSample]
    containers: list[ContainerSample]
    # key -> (bytes used, quota or 0) of every root whose upper is on this node, running
    # or not; empty where the node has no disk quotas (node/quota.py)
    disk: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        """A sample as a node's agent sent it (``to_dict``); TypeError/KeyError if not one."""
        gpus = [GpuSample(**{**g, "processes": [GpuProcess(**p) for p in g["processes"]]})
                for g in d["gpus"]]
        return cls(t=float(d["t"]), node=str(d["node"]), host=NodeSample(**d["host"]),
                   gpus=gpus, containers=[ContainerSample(**c) for c in d["containers"]],
                   disk={str(k): (int(v[0]), int(v[1])) for k, v in d["disk"].items()})


@dataclass
class _Known:
    id: str
    key: str
    user: str
    server: str


class Collector(LoggingConfigurable):
    """Samples this node. Not thread-safe: one caller (the service's periodic task)."""

    node_name = Unicode("local", help="This node's name, as LabVMSpawner.node_name.").tag(
        config=True)
    state_dir = Unicode(
        "/var/lib/labvm", help="LabVMSpawner.state_dir: its disk (the uppers) is reported."
    ).tag(config=True)
    store_root = Unicode(
        "", help="The layer store root; empty means <state_dir>/store."
    ).tag(config=True)
    db_url = Unicode(
        "", help="LabVM's database (GPU allocations); empty means sqlite:///<state_dir>/"
        "labvm.sqlite. Used to show who holds each GPU."
    ).tag(config=True)
    docker_url = Unicode("", help="Docker engine URL; empty uses the default.").tag(config=True)
    container_refresh_s = Float(
        10.0, help="How often the list of LabVM containers is asked from Docker; between "
        "refreshes only cgroup files are read, which costs far less."
    ).tag(config=True)
    cgroup_root = Unicode("/sys/fs/cgroup", help="Where cgroupfs is mounted.").tag(config=True)
    proc_root = Unicode("/proc", help="Where procfs is mounted.").tag(config=True)

    def __init__(self, store_probe: StoreProbe | None = None, **kwargs: Any) -> None:
        """``store_probe``: one the caller already keeps (a node agent's), so that the
        store is asked once per node."""
        super().__init__(**kwargs)
        self.gpus = GpuSampler()
        self.cgroups = CgroupReader(Path(self.cgroup_root))
        self._docker: docker.DockerClient | None = None
        self._allocator: GpuAllocator | None = None
        self._known: dict[str, _Known] = {}  # full container id -> labels
        self._listed_at = 0.0
        self._prev_cpu: dict[str, tuple[float, int]] = {}  # id -> (monotonic, cpu_ns)
        self._prev_node: procfs.CpuTimes | None = None
        self._store_probe = store_probe
        self.quotas = Quotas(Path(self.state_dir) / "uppers")

    # ---- sources -------------------------------------------------------------

    @property
    def docker(self) -> docker.DockerClient:
        if self._docker is None:
            self._docker = (docker.DockerClient(base_url=self.docker_url) if self.docker_url
                            else docker.from_env())
        return self._docker

    @property
    def allocator(self) -> GpuAllocator:
        if self._allocator is None:
            url = self.db_url or db.default_url(self.state_dir)
            self._allocator = GpuAllocator(url, node=self.node_name)
        return self._allocator

    @property
    def store_path(self) -> str:
        return self.store_root or str(Path(self.state_dir) / "store")

    def store_state(self) -> StoreState:
        """Whether the layer store answers, asked so that a hung one blocks no caller."""
        # A MooseFS store whose master is down would block a plain statvfs, and the
        # admin pages with it.
        if self._store_probe is None:
            self._store_probe = StoreProbe(self.store_path)
        return self._store_probe.check()

    def refresh_containers(self) -> None:
        """Ask Docker for this node's LabVM containers (labels only, no stats)."""
        found = self.docker.api.containers(
            filters={"label": ["labvm.key", f"labvm.node={self.node_name}"]}
        )
        self._known = {
            c["Id"]: _Known(c["Id"], c["Labels"]["labvm.key"], c["Labels"].get("labvm.user", ""),
                            c["Labels"].get("labvm.server", ""))
            for c in found
        }
        self._listed_at = time.monotonic()
        self.cgroups.forget(set(self._known))
        self._prev_cpu = {k: v for k, v in self._prev_cpu.items() if k in self._known}

    def close(self) -> None:
        self.gpus.close()
        if self._allocator is not None:
            self._allocator.close()
        if self._docker is not None:
            self._docker.close()

    # ---- the sample ----------------------------------------------------------

    def sample(self) -> Sample:
        now = time.monotonic()
        if now - self._listed_at >= self.container_refresh_s:
            self.refresh_containers()
        try:
            disk = self.quotas.all_usage()
        except LabVMError as e:
            self.log.warning("reading disk quotas: %s", e)
            disk = {}
        containers = [c for c in map(self._container, self._known.values()) if c is not None]
        return Sample(
            t=time.time(),
            node=self.node_name,
            host=self._node(),
            gpus=self._gpus(),
            containers=containers,
            disk={k: (u.used_bytes, u.limit_bytes or 0) for k, u in disk.items()},
        )

    def _container(self, known: _Known) -> ContainerSample | None:
        reading = self.cgroups.read(known.id)
        if reading is None:  # gone since the last listing
            return None
        return ContainerSample(
            id=known.id[:12], key=known.key, user=known.user, server=known.server,
            cpu_percent=self._cpu_rate(known.id, reading),
            mem_used=reading.mem_used, mem_limit=reading.mem_limit, cpu_limit=reading.cpu_limit,
            io_read=reading.io_read, io_write=reading.io_write, pids=reading.pids,
        )

    def _cpu_rate(self, cid: str, reading: CgroupReading) -> float:
        now = time.monotonic()
        prev = self._prev_cpu.get(cid)
        self._prev_cpu[cid] = (now, reading.cpu_ns)
        if prev is None or now <= prev[0]:
            return 0.0
        return 100.0 * (reading.cpu_ns - prev[1]) / 1e9 / (now - prev[0])

    def _node(self) -> NodeSample:
        proc = Path(self.proc_root)
        times = procfs.read_cpu_times(proc)
        cpu = procfs.cpu_percent(self._prev_node, times)
        self._prev_node = times
        mem_used, mem_total = procfs.read_meminfo(proc)
        upper_free, upper_total = procfs.disk_usage(self.state_dir)
        store = self.store_state()
        return NodeSample(cpu, os.cpu_count() or 1, mem_used, mem_total,
                          upper_free, upper_total, store.free, store.total,
                          store.reachable, store.since)

    def _gpus(self) -> list[GpuSample]:
        readings = self.gpus.read()
        if not readings:
            return []
        holders = {r.uuid: r.owner for r in self.allocator.records()}
        by_id = self._known
        out = []
        for g in readings:
            procs = []
            for pid, used in g.processes:
                cid = procfs.container_of_pid(pid, Path(self.proc_root))
                known = by_id.get(cid) if cid else None
                procs.append(GpuProcess(
                    pid=pid, used=used, container=cid[:12] if cid else None,
                    key=known.key if known else None, user=known.user if known else None,
                ))
            out.append(GpuSample(
                index=g.index, uuid=g.uuid, name=g.name, util=g.util, mem_util=g.mem_util,
                mem_used=g.mem_used, mem_total=g.mem_total, temp_c=g.temp_c,
                power_w=g.power_w, holder=holders.get(g.uuid), processes=procs,
            ))
        return out
