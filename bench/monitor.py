"""CPU cost of the monitor's collector on a node with 8 (fake) GPUs and 30 real containers.

Thirty small containers (the labvm/base image running ``sleep``) carry the labels the
spawner sets; eight of them hold a fake GPU each (NVML faked at the pynvml boundary, with
those containers' real PIDs as GPU processes). For BENCH_SECONDS of wall time (60 by
default) the collector samples every 5 s, as the service does, feeding the history (one
database write a minute) and rendering /metrics after every sample. Its own process's
CPU time (user + system, all threads) is the cost.

The competitor, in the same run: the same per-container figures from the Docker stats
API (``docker stats``-style, one request per container). A pass over 30 containers can
take longer than 5 s of wall time, so it is measured per pass and scaled to the 12
passes a minute the collector makes: CPU seconds per minute at the same freshness.

The service's side of a cluster, in the same run: every 5 s it takes in the samples of
8 simulated nodes (copies of the real one: 8 GPUs and 30 containers each), as JSON the way
their agents send them, and does what it does with each (parse, history, idle-GPU
bookkeeping) before rendering /metrics for all of them. The HTTPS requests
themselves are not counted.

    .venv/bin/python bench/monitor.py

monitor_cpu_s_per_min=<a node's collector CPU seconds per minute> (goal: < 1); last line:
monitor_cluster_cpu_s_per_min=<the service's CPU seconds per minute for 8 nodes> (goal < 2).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import docker  # noqa: E402
from support import fake_nvml  # noqa: E402

from labvm_spawner.monitor.collector import Collector, Sample  # noqa: E402
from labvm_spawner.monitor.history import History, RecentSamples  # noqa: E402
from labvm_spawner.monitor.metrics import exposition  # noqa: E402
from labvm_spawner.monitor.reclaim import IdleReclaim  # noqa: E402
from labvm_spawner.node.allocations import GpuAllocator  # noqa: E402
from labvm_spawner.node.nvml import read_inventory  # noqa: E402

CONTAINERS = 30
INTERVAL_S = 5.0
SECONDS = float(os.environ.get("BENCH_SECONDS", "60"))
COMPETITOR_PASSES = int(os.environ.get("BENCH_COMPETITOR_PASSES", "2"))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def start_containers(client: docker.DockerClient, node: str) -> list:
    image = next(t for i in client.images.list("labvm/base") for t in i.tags)

    def run(i: int):
        key = f"bench{i}"
        return client.containers.run(
            image, ["sleep", "3600"], detach=True, name=f"{node}-{key}", mem_limit="64m",
            labels={"labvm.key": key, "labvm.user": key, "labvm.server": "",
                    "labvm.node": node},
        )

    with ThreadPoolExecutor(8) as pool:
        boxes = list(pool.map(run, range(CONTAINERS)))
    for b in boxes:
        b.reload()
    return boxes


def paced(seconds: float, step) -> float:  # type: ignore[no-untyped-def]
    """Call ``step`` every INTERVAL_S for ``seconds``; returns the CPU seconds it used."""
    cpu0 = cpu_seconds()
    end = time.monotonic() + seconds
    nxt = time.monotonic()
    while nxt < end:
        step()
        nxt += INTERVAL_S
        time.sleep(max(0.0, nxt - time.monotonic()))
    return cpu_seconds() - cpu0


def main() -> None:
    client = docker.from_env()
    node = f"bench-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="labvm-bench-monitor-"))
    fake = fake_nvml.install()
    boxes = start_containers(client, node)
    try:
        alloc = GpuAllocator(f"sqlite:///{tmp}/labvm.sqlite", node=node)
        gpus = read_inventory()
        for i in range(len(gpus)):
            alloc.allocate(f"bench{i}", gpus, 1)
            fake.set_processes(i, [(boxes[i].attrs["State"]["Pid"], (i + 1) << 30)])
        collector = Collector(node_name=node, state_dir=str(tmp))
        history = History(f"sqlite:///{tmp}/monitor.sqlite", step_s=60)
        recent = RecentSamples(360)

        def monitor_step() -> None:
            s = collector.sample()
            recent.add(s)
            history.add(s)
            exposition(lambda: [recent.latest()])

        monitor_step()  # warm: imports, first Docker listing, NVML init
        s = recent.latest()
        assert len(s.containers) == CONTAINERS and len(s.gpus) == 8, s
        assert all(g.processes[0].user == f"bench{g.index}" for g in s.gpus)
        ours = paced(SECONDS, monitor_step) * 60 / SECONDS
        print(f"collector: {len(s.gpus)} GPUs, {len(s.containers)} containers, every "
              f"{INTERVAL_S:g} s for {SECONDS:g} s: {ours:.3f} CPU s/min")

        def docker_stats_step() -> None:
            for b in client.containers.list(filters={"label": f"labvm.node={node}"}):
                b.stats(stream=False, one_shot=True)

        docker_stats_step()
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        for _ in range(COMPETITOR_PASSES):
            docker_stats_step()
        per_pass = (cpu_seconds() - cpu0) / COMPETITOR_PASSES
        wall = (time.monotonic() - wall0) / COMPETITOR_PASSES
        theirs = per_pass * 60 / INTERVAL_S
        print(f"docker stats API (competitor): {per_pass:.3f} CPU s and {wall:.1f} s wall per "
              f"pass; at one pass per {INTERVAL_S:g} s: {theirs:.3f} CPU s/min in this "
              "process (dockerd's own work not counted)")
        print(f"collector/competitor CPU ratio={ours / theirs:.3f}")
        cluster = cluster_cost(collector.sample(), tmp)
        history.close()
        collector.close()
        alloc.close()
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda b: b.remove(force=True), boxes))
        fake.uninstall()
    print(f"monitor_cpu_s_per_min={ours:.3f}")
    print(f"monitor_cluster_cpu_s_per_min={cluster:.3f}")  # only reached when the run completed


NODES = 8


def cluster_cost(real: Sample, tmp: Path) -> float:
    """The service's CPU seconds per minute for NODES agents' samples every INTERVAL_S."""
    wires = []
    for n in range(NODES):
        d = real.to_dict()
        d["node"] = f"node{n}"
        for g in d["gpus"]:
            g["uuid"] = f"GPU-node{n}-{g['index']}"
        wires.append(json.dumps(d))
    histories = {f"node{n}": History(f"sqlite:///{tmp}/cluster.sqlite", step_s=60)
                 for n in range(NODES)}
    reclaims = {name: IdleReclaim(idle_hours=12) for name in histories}
    latest: dict[str, Sample] = {}

    def service_step() -> None:
        for wire in wires:
            s = Sample.from_dict(json.loads(wire))
            s.t = time.time()
            latest[s.node] = s
            histories[s.node].add(s)
            reclaims[s.node].decide(s)
        exposition(lambda: list(latest.values()))

    service_step()
    cost = paced(SECONDS, service_step) * 60 / SECONDS
    print(f"service, {NODES} nodes x {len(real.gpus)} GPUs x {len(real.containers)} "
          f"containers every {INTERVAL_S:g} s: {cost:.3f} CPU s/min")
    for h in histories.values():
        h.close()
    return cost


if __name__ == "__main__":
    main()
