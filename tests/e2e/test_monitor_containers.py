"""The collector on real containers: real CPU and memory figures from cgroups, and fake
GPUs whose processes are real container PIDs, mapped back to their users."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from support import fake_nvml

from labvm_spawner.monitor.collector import Collector
from labvm_spawner.node.allocations import GpuAllocator
from labvm_spawner.node.nvml import read_inventory

pytestmark = pytest.mark.e2e


def base_image(client) -> str:
    tags = [t for i in client.images.list("labvm/base") for t in i.tags]
    assert tags, "labvm/base image missing"
    return tags[0]


@pytest.fixture
def boxes(docker_client, labvm_image, tmp_path):
    """Two small labelled containers as the spawner would make them, on a node of our own."""
    node = f"mon-{uuid.uuid4().hex[:8]}"
    made = {}
    for key in ("alice", "bob.train"):
        made[key] = docker_client.containers.run(
            base_image(docker_client), ["sleep", "600"], detach=True, mem_limit="256m",
            nano_cpus=2_000_000_000, name=f"{node}-{key.replace('.', '-')}",
            labels={"labvm.key": key, "labvm.user": key.split(".")[0],
                    "labvm.server": key.partition(".")[2], "labvm.node": node},
        )
    yield node, made
    for c in made.values():
        c.remove(force=True)


def test_real_container_cpu_rises_under_load(boxes, tmp_path, monkeypatch):
    fake_nvml.install(monkeypatch=monkeypatch)
    node, made = boxes
    col = Collector(node_name=node, state_dir=str(tmp_path))
    try:
        col.sample()
        time.sleep(1)
        quiet = {c.key: c for c in col.sample().containers}
        assert set(quiet) == {"alice", "bob.train"}
        assert quiet["alice"].cpu_percent < 20
        assert quiet["alice"].cpu_limit == 2.0 and quiet["alice"].mem_limit == 256 << 20
        assert quiet["alice"].pids >= 1

        made["alice"].exec_run(["sh", "-c", "while :; do :; done"], detach=True)
        made["alice"].exec_run(["sh", "-c", "head -c 100m /dev/zero | tail > /dev/null"],
                               detach=True)
        # The host is shared with other test sessions: give the loop a few tries to show.
        deadline = time.monotonic() + 20
        while True:
            time.sleep(1.5)
            busy = {c.key: c for c in col.sample().containers}
            if busy["alice"].cpu_percent > 50 or time.monotonic() > deadline:
                break
        assert busy["alice"].cpu_percent > 50, busy["alice"]
        assert busy["bob.train"].cpu_percent < 20
        assert busy["alice"].pids > quiet["alice"].pids
        assert busy["alice"].mem_used > 0
    finally:
        col.close()


def test_gpu_processes_of_real_containers_map_to_their_users(boxes, tmp_path, monkeypatch):
    fake = fake_nvml.install(monkeypatch=monkeypatch)
    node, made = boxes
    alloc = GpuAllocator(f"sqlite:///{tmp_path}/labvm.sqlite", node=node)
    gpus = read_inventory()
    alloc.allocate("alice", gpus, 2)
    alloc.allocate("bob.train", gpus, 1)
    # Host PIDs of processes inside each container, as NVML would report them.
    for c in made.values():
        c.reload()  # run() returns the attributes from before the start: no Pid yet
    alice_pid = made["alice"].attrs["State"]["Pid"]
    bob_pid = made["bob.train"].attrs["State"]["Pid"]
    assert alice_pid and bob_pid
    fake.set_processes(0, [(alice_pid, 5 << 30)])
    fake.set_processes(1, [(alice_pid, 1 << 30)])
    fake.set_processes(2, [(bob_pid, 7 << 30), (os.getpid(), 1 << 20)])
    col = Collector(node_name=node, state_dir=str(tmp_path))
    try:
        s = col.sample()
        owners = [[(p.user, p.key) for p in g.processes] for g in s.gpus[:4]]
        assert owners == [[("alice", "alice")], [("alice", "alice")],
                          [("bob", "bob.train"), (None, None)], []]
        assert [g.holder for g in s.gpus[:4]] == ["alice", "alice", "bob.train", None]
        assert s.gpus[2].processes[0].container == made["bob.train"].id[:12]
        fake.clock = lambda: time.time() + 30
        later = col.sample()
        assert [g.util for g in later.gpus] != [g.util for g in s.gpus]
    finally:
        col.close()
        alloc.close()
