"""A sample flattened into chartable points: one dict of numbers per (kind, subject).

kind "node" (subject: node name), "gpu" (subject: GPU UUID), "user" (subject: labvm.key).
History and charts both work on these, so live and stored series have the same shape.
"""

from __future__ import annotations

from .collector import Sample

SeriesKey = tuple[str, str]  # (kind, subject)


def points_of(sample: Sample) -> dict[SeriesKey, dict[str, float]]:
    out: dict[SeriesKey, dict[str, float]] = {}
    h = sample.host
    out[("node", sample.node)] = {
        "cpu_percent": h.cpu_percent, "mem_used": h.mem_used, "mem_total": h.mem_total,
        "upper_free": h.upper_free, "store_free": h.store_free,
    }
    gpu_util: dict[str, list[float]] = {}
    gpu_mem: dict[str, float] = {}
    for g in sample.gpus:
        out[("gpu", g.uuid)] = {"util": g.util, "mem_used": g.mem_used,
                               "temp_c": g.temp_c, "power_w": g.power_w}
        if g.holder:
            gpu_util.setdefault(g.holder, []).append(g.util)
        for p in g.processes:
            if p.key:
                gpu_mem[p.key] = gpu_mem.get(p.key, 0) + p.used
    for c in sample.containers:
        utils = gpu_util.get(c.key, [])
        out[("user", c.key)] = {
            "cpu_percent": c.cpu_percent, "mem_used": c.mem_used, "pids": c.pids,
            "gpu_util": sum(utils) / len(utils) if utils else 0.0,
            "gpu_mem": gpu_mem.get(c.key, 0.0),
        }
    return out
