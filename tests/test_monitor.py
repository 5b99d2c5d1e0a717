"""Fast tests of the monitor's parts: cgroup and /proc parsing, the collector on fake
NVML and a fake cgroup tree, history, Prometheus names and the idle-reclaim policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import fake_nvml

from labvm_spawner.monitor import procfs
from labvm_spawner.monitor.cgroups import CgroupReader
from labvm_spawner.monitor.collector import (
    Collector,
    ContainerSample,
    GpuSample,
    NodeSample,
    Sample,
    _Known,
)
from labvm_spawner.monitor.history import History, RecentSamples
from labvm_spawner.monitor.metrics import exposition
from labvm_spawner.monitor.reclaim import IdleReclaim
from labvm_spawner.node.allocations import GpuAllocator
from labvm_spawner.node.nvml import read_inventory

IDS = {"alice": "a" * 64, "bob.train": "b" * 64}


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_v1(root: Path, cid: str, cpu_ns: int, mem: int = 300 << 20) -> None:
    write(root / "cpuacct/docker" / cid / "cpuacct.usage", f"{cpu_ns}\n")
    write(root / "cpu/docker" / cid / "cpu.cfs_quota_us", "200000\n")
    write(root / "cpu/docker" / cid / "cpu.cfs_period_us", "100000\n")
    write(root / "memory/docker" / cid / "memory.usage_in_bytes", f"{mem}\n")
    write(root / "memory/docker" / cid / "memory.limit_in_bytes", f"{1 << 30}\n")
    write(root / "memory/docker" / cid / "memory.stat", f"total_inactive_file {100 << 20}\n")
    write(root / "blkio/docker" / cid / "blkio.throttle.io_service_bytes",
          "8:0 Read 4096\n8:0 Write 8192\n8:16 Write 100\nTotal 12388\n")
    write(root / "pids/docker" / cid / "pids.current", "7\n")


def fake_proc(root: Path, pids: dict[int, str | None]) -> None:
    write(root / "stat", "cpu  100 0 100 800 0 0 0 0 0 0\n")
    write(root / "meminfo", "MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 400 kB\n")
    for pid, cid in pids.items():
        line = f"4:cpuacct:/docker/{cid}\n" if cid else "4:cpuacct:/user.slice\n"
        write(root / str(pid) / "cgroup", f"12:pids:/\n{line}")


def test_cgroup_v1_reading(tmp_path):
    fake_v1(tmp_path, "c" * 64, 5_000_000_000)
    r = CgroupReader(tmp_path).read("c" * 64)
    assert r.cpu_ns == 5_000_000_000
    assert r.mem_used == 200 << 20 and r.mem_limit == 1 << 30  # page cache not counted
    assert (r.io_read, r.io_write, r.pids, r.cpu_limit) == (4096, 8292, 7, 2.0)
    assert CgroupReader(tmp_path).read("d" * 64) is None


def test_cgroup_v2_reading(tmp_path):
    write(tmp_path / "cgroup.controllers", "cpu memory io pids\n")
    d = tmp_path / "system.slice" / f"docker-{'c' * 64}.scope"
    write(d / "cpu.stat", "usage_usec 2500000\nuser_usec 2000000\n")
    write(d / "cpu.max", "150000 100000\n")
    write(d / "memory.current", f"{500 << 20}\n")
    write(d / "memory.max", "max\n")
    write(d / "memory.stat", f"inactive_file {100 << 20}\n")
    write(d / "io.stat", "8:0 rbytes=10 wbytes=20 rios=1 wios=2\n8:16 rbytes=1 wbytes=2\n")
    write(d / "pids.current", "3\n")
    r = CgroupReader(tmp_path).read("c" * 64)
    assert (r.cpu_ns, r.mem_used, r.mem_limit) == (2_500_000_000, 400 << 20, 0)
    assert (r.io_read, r.io_write, r.pids, r.cpu_limit) == (11, 22, 3, 1.5)


def test_pid_to_container_and_node_figures(tmp_path):
    fake_proc(tmp_path, {10: "e" * 64, 11: None})
    write(tmp_path / "12" / "cgroup",
          f"0::/system.slice/docker-{'f' * 64}.scope\n")  # v2, systemd driver
    assert procfs.container_of_pid(10, tmp_path) == "e" * 64
    assert procfs.container_of_pid(11, tmp_path) is None
    assert procfs.container_of_pid(12, tmp_path) == "f" * 64
    assert procfs.container_of_pid(99, tmp_path) is None  # exited
    assert procfs.read_meminfo(tmp_path) == (600 * 1024, 1000 * 1024)
    before = procfs.read_cpu_times(tmp_path)
    write(tmp_path / "stat", "cpu  150 0 150 900 0 0 0 0 0 0\n")
    assert procfs.cpu_percent(before, procfs.read_cpu_times(tmp_path)) == 50.0


@pytest.fixture
def collector(tmp_path, monkeypatch):
    """A collector on fake NVML, a fake cgroup tree and /proc, and a real allocations DB."""
    fake = fake_nvml.install(monkeypatch=monkeypatch)
    fake.clock = lambda: 1000.0
    cg, proc, state = tmp_path / "cg", tmp_path / "proc", tmp_path / "state"
    for cid in IDS.values():
        fake_v1(cg, cid, 0)
    fake_proc(proc, {4242: IDS["alice"], 4343: IDS["bob.train"], 4444: None})
    alloc = GpuAllocator(f"sqlite:///{state}/labvm.sqlite", node="n1")
    gpus = read_inventory()
    alloc.allocate("alice", gpus, 2)
    alloc.allocate("bob.train", gpus, 1)
    c = Collector(node_name="n1", state_dir=str(state), cgroup_root=str(cg),
                  proc_root=str(proc), container_refresh_s=1e9)
    c._known = {cid: _Known(cid, key, key.split(".")[0], key.partition(".")[2])
                for key, cid in IDS.items()}
    c._listed_at = 1e18  # no Docker listing: the containers are the fake ones above
    yield c, fake, cg
    c.close()
    alloc.close()


def test_collector_maps_gpu_processes_to_users(collector):
    c, fake, _ = collector
    fake.set_processes(0, [(4242, 2 << 30), (4444, 1 << 30)])
    fake.set_processes(2, [(4343, 3 << 30)])
    s = c.sample()
    assert [g.holder for g in s.gpus[:4]] == ["alice", "alice", "bob.train", None]
    g0, g2 = s.gpus[0], s.gpus[2]
    assert [(p.pid, p.user, p.key) for p in g0.processes] == \
        [(4242, "alice", "alice"), (4444, None, None)]
    assert [(p.pid, p.user, p.key, p.used) for p in g2.processes] == \
        [(4343, "bob", "bob.train", 3 << 30)]
    assert g0.processes[0].container == IDS["alice"][:12]
    assert g0.mem_used >= 3 << 30 and g0.mem_total >= g0.mem_used


def test_collector_values_change_over_time(collector):
    c, fake, cg = collector
    first = c.sample()
    fake.clock = lambda: 1010.0
    fake_v1(cg, IDS["alice"], 2_000_000_000)  # alice burns CPU between the samples
    second = c.sample()
    assert [g.util for g in first.gpus] != [g.util for g in second.gpus]
    assert [g.temp_c for g in first.gpus] != [g.temp_c for g in second.gpus]
    alice = {x.key: x for x in second.containers}["alice"]
    bob = {x.key: x for x in second.containers}["bob.train"]
    assert alice.cpu_percent > 100 and bob.cpu_percent == 0  # >1 core: the test is fast
    assert (alice.pids, alice.cpu_limit, alice.mem_limit) == (7, 2.0, 1 << 30)


def test_no_driver_means_no_gpus(tmp_path, monkeypatch):
    fake_nvml.install("nvml_no_driver.json", monkeypatch=monkeypatch)
    c = Collector(node_name="n1", state_dir=str(tmp_path), container_refresh_s=1e9)
    c._listed_at = 1e18
    assert c.sample().gpus == []
    c.close()


def make_sample(t: float, util: float, cpu: float, holder: str | None = "alice") -> Sample:
    host = NodeSample(10.0, 4, 1 << 30, 4 << 30, 5 << 30, 10 << 30, 6 << 30, 10 << 30)
    gpu = GpuSample(0, "GPU-x", "NVIDIA A100", util, 1.0, 1 << 30, 4 << 30, 40.0, 100.0,
                    holder)
    box = ContainerSample("abc", "alice", "alice", "", cpu, 1 << 20, 0, 1.0, 0, 0, 3)
    return Sample(t, "n1", host, [gpu], [box])


def test_history_downsamples_and_survives_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path}/monitor.sqlite"
    h = History(url, step_s=60)
    for t, util in [(120, 10), (130, 30), (170, 50), (185, 90)]:
        h.add(make_sample(t, util, cpu=util * 2))
    h.close()  # flushes the open step too
    h2 = History(url, step_s=60)
    pts = h2.series("gpu", "GPU-x", since=0)
    assert [(t, v["util"]) for t, v in pts] == [(120.0, 30.0), (180.0, 90.0)]
    assert h2.series("user", "alice", since=0)[0][1]["gpu_util"] == 30.0
    assert h2.nodes() == ["n1"]
    # Recent, finer samples come after the last stored step.
    recent = RecentSamples(10)
    recent.add(make_sample(250, 70, 1))
    assert [t for t, _ in h2.series("gpu", "GPU-x", 0, recent)] == [120.0, 180.0, 250.0]
    # Recent samples of several nodes: each node's series has its own points only.
    other = make_sample(260, 20, 1)
    other.node = "n2"
    pts = h2.series("node", "n2", 0, [*recent, other])
    assert [t for t, _ in pts] == [260.0]
    assert [t for t, _ in h2.series("node", "n1", 0, [other, *recent])] == [120.0, 180.0, 250.0]
    # Points older than the retention go; seven days are kept.
    h2.retention_s = 8 * 86400
    assert h2.prune(now=180 + 8 * 86400 + 1) == 2 * 3  # node, gpu, user rows of 2 steps
    h2.close()


def test_drain_flag_is_stored_in_the_cluster_db(tmp_path):
    from labvm_spawner.cluster import Cluster

    url = f"sqlite:///{tmp_path}/labvm.sqlite"
    c = Cluster(url)
    c.set_drained("n1", True, "root")
    assert Cluster(url).drained() == {"n1"}  # what the hub's placement reads
    c.set_drained("n1", False, "root")
    assert c.drained() == set()


def test_user_view_shows_node_and_last_sync(tmp_path):
    import json

    from labvm_spawner.monitor.state import user_view

    store = tmp_path / "store"
    (store / "alice").mkdir(parents=True)
    (store / "alice" / "synced.json").write_text(json.dumps({"t": 1700000000.5, "node": "n2"}))
    user = {"name": "alice", "servers": {"": {"ready": True}, "work": {}}}
    view = user_view(user, None, str(store), {}, {"alice": "n2", "alice.work": "n1"})
    main, work = view["roots"]
    assert (main["key"], main["node"], main["last_synced"], main["last_synced_node"]) == \
        ("alice", "n2", 1700000000.5, "n2")
    assert main["last_sync"] == "2023-11-14T22:13:20+00:00"
    assert (work["key"], work["node"], work["last_sync"], work["last_synced"]) == \
        ("alice.work", "n1", "never", None)
    # Without placements (the old one-node view) the node comes from the sample only.
    assert user_view(user, None, str(store), {})["roots"][0]["node"] == ""
    assert main["last_sync_errors"] == 0


def test_user_view_asks_nothing_of_a_store_that_does_not_answer():
    from labvm_spawner.monitor.state import user_view

    user = {"name": "alice", "servers": {"": {"ready": True}}}
    [root] = user_view(user, None, None, {}, {"alice": "n2"})["roots"]
    assert (root["key"], root["node"], root["running"]) == ("alice", "n2", True)
    assert root["versions"] == [] and root["last_synced"] is None
    assert root["last_sync"].startswith("unknown: the layer store does not answer")


def test_user_view_shows_sync_errors(tmp_path):
    import json

    from labvm_spawner.monitor.state import user_view

    store = tmp_path / "store"
    (store / "bob").mkdir(parents=True)
    user = {"name": "bob", "servers": {"": {"ready": True}}}
    for errors, shown in ((3, 3), (-1, 0), ("many", 0)):
        (store / "bob" / "synced.json").write_text(
            json.dumps({"t": 1700000000, "node": "n1", "errors": errors}))
        assert user_view(user, None, str(store), {})["roots"][0]["last_sync_errors"] == shown


def test_cluster_node_view_counts_gpus_by_model():
    from labvm_spawner.cluster import NodeView
    from labvm_spawner.monitor.state import cluster_node_view

    gpus = [{"index": 0, "uuid": "a", "name": "A100", "memory_total": 1, "holder": "bob"},
            {"index": 1, "uuid": "b", "name": "A100", "memory_total": 1, "holder": None},
            {"index": 2, "uuid": "c", "name": "H100", "memory_total": 1, "holder": None}]
    info = {"gpus": gpus, "cpus": 32, "mem_bytes": 64 << 30, "cpus_committed": 4.5,
            "mem_committed": 8 << 30, "servers": {"bob": {"running": True}}}
    v = cluster_node_view(NodeView("n1", False, True, info, 42.0))
    assert v["gpus"] == [{"model": "A100", "total": 2, "free": 1},
                         {"model": "H100", "total": 1, "free": 1}]
    assert (v["gpus_total"], v["gpus_free"], v["servers"]) == (3, 2, 1)
    assert (v["up"], v["drained"], v["age_s"], v["cpus_committed"]) == (False, True, 42.0, 4.5)
    assert cluster_node_view(NodeView("n2", True, False))["gpus"] == []


def test_metrics_use_dcgm_names_and_labels(collector):
    c, fake, _ = collector
    fake.set_processes(0, [(4242, 2 << 30)])
    s = c.sample()
    text = exposition(lambda: [s]).decode()
    for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
                 "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE",
                 "labvm_container_cpu_percent", "labvm_node_store_free_bytes"):
        assert f"# TYPE {name} gauge" in text
    line = next(x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_GPU_UTIL{")
                and 'gpu="0"' in x)
    assert f'UUID="{s.gpus[0].uuid}"' in line and 'modelName="NVIDIA A100-SXM4-80GB"' in line
    assert 'user="alice"' in line and 'node="n1"' in line
    free = next(x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_GPU_UTIL{")
                and 'gpu="7"' in x)
    assert 'user=""' in free
    assert exposition(lambda: []) == b""


def test_idle_reclaim_warns_then_stops_and_forgives_busy_gpus():
    policy = IdleReclaim(idle_hours=2, warn_hours=0.5, idle_util_percent=5)
    h = 3600
    assert policy.decide(make_sample(0, util=1, cpu=0)) == []
    assert policy.decide(make_sample(1.4 * h, util=1, cpu=0)) == []
    [warn] = policy.decide(make_sample(1.6 * h, util=2, cpu=0))
    assert (warn.action, warn.key, warn.stop_at) == ("warn", "alice", 2 * h)
    assert policy.decide(make_sample(1.7 * h, util=2, cpu=0)) == []  # warned once
    [clear] = policy.decide(make_sample(1.8 * h, util=80, cpu=0))  # busy again
    assert clear.action == "clear"
    assert policy.decide(make_sample(2.5 * h, util=0, cpu=0)) == []  # the clock restarted
    [warn2] = policy.decide(make_sample(4.1 * h, util=0, cpu=0))
    [stop] = policy.decide(make_sample(4.5 * h, util=0, cpu=0))
    assert (warn2.action, stop.action, stop.user, stop.server) == ("warn", "stop", "alice", "")
    # Servers without GPUs, and a policy that is off, never reclaim.
    assert policy.decide(make_sample(99 * h, util=0, cpu=0, holder=None)) == []
    assert IdleReclaim().decide(make_sample(99 * h, util=0, cpu=0)) == []


def test_hub_registration_is_one_admin_and_user_service():
    from labvm_spawner.monitor.service import hub_service

    service, roles = hub_service(port=8123, args=["--Collector.node_name=n1"])
    assert service["command"][-3:] == ["-m", "labvm_spawner.monitor", "--Collector.node_name=n1"]
    assert service["url"] == "http://127.0.0.1:8123"
    assert service["oauth_no_confirm"] and service["display"]
    own, users = roles
    assert own["services"] == ["labvm-monitor"]
    assert "admin:users" not in own["scopes"] and "admin:servers" in own["scopes"]
    assert users == {"name": "user",
                     "scopes": ["self", "access:services!service=labvm-monitor"]}


def test_cli_registers_serve_and_sample():
    import argparse

    from labvm_spawner.cli.monitor import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="monitor_command", required=True))
    args = parser.parse_args(["serve", "--set", "Collector.node_name=n1", "--set",
                              "IdleReclaim.idle_hours=12"])
    assert args.set == ["Collector.node_name=n1", "IdleReclaim.idle_hours=12"]
    args = parser.parse_args(["sample", "--node", "n2", "--wait", "0"])
    assert (args.node, args.wait) == ("n2", 0.0)
