"""Prometheus exposition of the latest sample.

GPU figures use the DCGM exporter's metric names and units (FB in MiB, power in W) and
its label names (gpu, UUID, device, modelName, Hostname), plus ``node`` and ``user`` (the
holder of the GPU, empty when free), so existing DCGM dashboards work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from .collector import Sample

MiB = 1024 * 1024
GPU_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname", "node", "user"]
CONTAINER_LABELS = ["node", "user", "server", "key"]

# (name, help, value of a GpuSample)
_GPU_GAUGES = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: g.util),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", lambda g: g.mem_util),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda g: g.mem_used / MiB),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).",
     lambda g: (g.mem_total - g.mem_used) / MiB),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: g.temp_c),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda g: g.power_w),
)

_CONTAINER_GAUGES = (
    ("labvm_container_cpu_percent", "CPU use of the container (100 = one core).",
     lambda c: c.cpu_percent),
    ("labvm_container_memory_used_bytes", "Memory used, without reclaimable page cache.",
     lambda c: c.mem_used),
    ("labvm_container_memory_limit_bytes", "Memory limit (0 = none).", lambda c: c.mem_limit),
    ("labvm_container_io_read_bytes", "Bytes read from block devices since start.",
     lambda c: c.io_read),
    ("labvm_container_io_write_bytes", "Bytes written to block devices since start.",
     lambda c: c.io_write),
    ("labvm_container_pids", "Processes and threads in the container.", lambda c: c.pids),
)

# (name, help, index into Sample.disk's (used, limit)), for every root on the node
_DISK_GAUGES = (
    ("labvm_root_disk_used_bytes", "Bytes in the root's writable layer on this node, "
     "running or not (only on nodes with disk quotas).", 0),
    ("labvm_root_disk_limit_bytes", "The root's disk quota (0 = none).", 1),
)

_NODE_GAUGES = (
    ("labvm_node_cpu_percent", "CPU use of the whole node (0-100).", lambda h: h.cpu_percent),
    ("labvm_node_memory_used_bytes", "Memory in use on the node.", lambda h: h.mem_used),
    ("labvm_node_memory_total_bytes", "Memory of the node.", lambda h: h.mem_total),
    ("labvm_node_upper_disk_free_bytes", "Free space on the disk holding the uppers.",
     lambda h: h.upper_free),
    ("labvm_node_store_free_bytes", "Free space in the layer store.", lambda h: h.store_free),
    ("labvm_node_store_reachable", "1 while the layer store answers this node, else 0.",
     lambda h: 1 if h.store_reachable else 0),
)


class SampleCollector:
    """A prometheus_client collector reading whatever sample ``latest`` returns."""

    def __init__(self, latest: Callable[[], list[Sample]]) -> None:
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        samples = self.latest()  # every node's latest, each with its node label
        if not samples:
            return
        for name, text, value in _GPU_GAUGES:
            fam = GaugeMetricFamily(name, text, labels=GPU_LABELS)
            for s in samples:
                for g in s.gpus:
                    fam.add_metric([str(g.index), g.uuid, f"nvidia{g.index}", g.name, s.node,
                                    s.node, _user_of(g.holder, s)], value(g))
            yield fam
        for name, text, value in _CONTAINER_GAUGES:
            fam = GaugeMetricFamily(name, text, labels=CONTAINER_LABELS)
            for s in samples:
                for c in s.containers:
                    fam.add_metric([s.node, c.user, c.server, c.key], value(c))
            yield fam
        for name, text, i in _DISK_GAUGES:
            fam = GaugeMetricFamily(name, text, labels=CONTAINER_LABELS)
            for s in samples:
                for key, figures in sorted(s.disk.items()):
                    user, _, server = key.partition(".")
                    fam.add_metric([s.node, user, server, key], figures[i])
            yield fam
        for name, text, value in _NODE_GAUGES:
            fam = GaugeMetricFamily(name, text, labels=["node"])
            for s in samples:
                fam.add_metric([s.node], value(s.host))
            yield fam


def _user_of(key: str | None, s: Sample) -> str:
    if not key:
        return ""
    for c in s.containers:
        if c.key == key:
            return c.user
    return key.split(".", 1)[0]  # a key is "<user>" or "<user>.<server>"


def exposition(latest: Callable[[], list[Sample]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SampleCollector(latest))
    return generate_latest(registry)
