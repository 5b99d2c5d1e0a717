"""LabVMSpawner's control flow against a stub node, in milliseconds: start, progress, the
split of tokens from the environment, refusals before any node call, poll's clean-up,
stop, state. The node engine and the real cluster of nodes are tested elsewhere."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jupyterhub.objects import Hub
from tornado import web

from labvm_spawner import spawner as spawner_module
from labvm_spawner.cluster import Cluster, NodeView
from labvm_spawner.errors import LabVMError
from labvm_spawner.node.client import NodeRefused, NodeUnreachable
from labvm_spawner.node.protocol import StartRequest, StartResult, Status
from labvm_spawner.spawner import LabVMSpawner

A100 = "NVIDIA A100-SXM4-80GB"


class StubNode:
    """What a node client answers; every call is recorded."""

    remote = True

    def __init__(self, name: str = "n1") -> None:
        self.name = name
        self.calls: list[tuple] = []
        self.state = "running"
        self.exit_code: int | None = None
        self.interrupted: float | None = None
        self.fail: Exception | None = None
        self.live_gpus: list[dict] | None = None  # what info() says now, if not the heartbeat

    async def info(self) -> dict:
        self.calls.append(("info",))
        return {"gpus": self.live_gpus or [], "cpus": 8, "mem_bytes": 64 << 30}

    async def start(self, req: StartRequest, emit=None) -> StartResult:  # noqa: ANN001
        self.calls.append(("start", req))
        if emit:
            emit(70, "Starting container")
        if self.fail:
            raise self.fail
        return StartResult("10.0.0.5", 8888, "c0ffee", self.name, [0])

    async def status(self, key: str) -> Status:
        self.calls.append(("status", key))
        if self.fail:
            raise self.fail
        return Status(self.state, self.exit_code, interrupted=self.interrupted)

    async def stop(self, key: str) -> dict:
        self.calls.append(("stop", key))
        return {"synced": True, "last_synced": 1.0}


class FakeUser:
    def __init__(self, name: str = "alice", admin: bool = False) -> None:
        self.name, self.admin, self.groups = name, admin, []
        self.url = f"/user/{name}/"
        self.id = 1


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    """A spawner whose cluster has one node, n1 (2 A100s, one held by someone else)."""
    cluster = Cluster(f"sqlite:///{tmp_path}/labvm.sqlite")
    node = StubNode()
    up = {"n1": True}

    async def nodes() -> dict[str, NodeView]:
        gpus = [{"index": 0, "uuid": "GPU-0", "name": A100, "holder": None},
                {"index": 1, "uuid": "GPU-1", "name": A100, "holder": "zed"}]
        return {"n1": NodeView("n1", up["n1"], False, {"gpus": gpus, "cpus": 8,
                                                       "mem_bytes": 64 << 30})}

    def client(name: str):  # noqa: ANN202
        if name != "n1":
            raise LabVMError(f"unknown node {name!r}")
        return node

    monkeypatch.setattr(cluster, "nodes", nodes)
    monkeypatch.setattr(cluster, "client", client)

    def make(name: str = "alice", options: dict | None = None, server: str = "") -> LabVMSpawner:
        s = LabVMSpawner(user=FakeUser(name), hub=Hub(ip="127.0.0.1", port=8081),
                         orm_spawner=SimpleNamespace(name=server, display_name=server, server=None),
                         api_token="secret-token", oauth_client_id=f"jupyterhub-user-{name}",
                         local_node=False, state_dir=str(tmp_path / "state"),
                         policy={"cpus": 2, "mem": "4G", "pids": 512, "max_gpus": 1})
        s.user_options = options or {}
        monkeypatch.setitem(spawner_module._clusters, (
            f"sqlite:///{tmp_path / 'state' / 'labvm.sqlite'}", "", False, "local"), cluster)
        return s

    yield {"make": make, "node": node, "cluster": cluster, "up": up}
    cluster.close()


async def test_start_sends_a_checked_request_and_keeps_tokens_out_of_the_env(world) -> None:
    s = world["make"](options={"gpus": 1})
    ip, port = await s.start()
    assert (ip, port) == ("10.0.0.5", 8888)
    (kind, req), = world["node"].calls
    assert kind == "start"
    assert (req.key, req.username, req.server, req.image) == (
        "alice", "alice", "", "labvm/user:latest")
    assert (req.gpus, req.model, req.sharing) == (1, None, False)
    assert req.limits == {"cpus": 2.0, "mem_bytes": 4 << 30, "pids": 512, "blkio_weight": None,
                          "io_read_bps": None, "io_write_bps": None, "disk_bytes": None,
                      "store_bytes": None}
    assert req.secrets["JUPYTERHUB_API_TOKEN"] == "secret-token"
    assert not any("TOKEN" in k for k in req.env), "a token would land in Docker's config"
    assert req.cmd[0] == "jupyterhub-singleuser"
    req.checked_limits()  # what the node will check passes
    assert s.container_id == "c0ffee" and s.node == "n1" and s.root_key == "alice"
    assert world["cluster"].placement("alice") == "n1"
    events = [e async for e in s.progress()]
    assert events == [{"progress": 70, "message": "Starting container"}]


@pytest.mark.parametrize("options,says", [
    ({"gpus": 2}, "at most 1 GPU; 2 requested"),  # the policy allows one
    ({"gpus": "many"}, "GPU count must be a whole number"),
    ({"gpu_model": "H100"}, "H100"),
])
async def test_bad_options_are_refused_before_any_node_call(world, options, says) -> None:
    s = world["make"](options=options)
    with pytest.raises(web.HTTPError) as e:
        await spawner_module._check_user_options(s, options)
    assert e.value.status_code == 400 and says in e.value.log_message
    with pytest.raises(LabVMError, match=says):
        await s.start()
    assert world["node"].calls == []
    assert world["cluster"].placement("alice") is None


async def test_a_bad_server_name_is_refused(world) -> None:
    s = world["make"](server="../x")
    with pytest.raises(LabVMError, match="server name"):
        await s.start()
    assert world["node"].calls == []


async def test_the_nodes_refusal_reaches_the_user_in_its_words(world) -> None:
    world["node"].fail = NodeRefused("node n1: the image 'x' is not one node n1 built", 400)
    s = world["make"]()
    with pytest.raises(LabVMError, match="is not one node n1 built"):
        await s.start()


async def test_an_unreachable_node_says_try_again(world) -> None:
    world["node"].fail = NodeUnreachable("node n1 did not answer")
    s = world["make"]()
    with pytest.raises(LabVMError, match="did not answer; try again soon"):
        await s.start()


async def test_poll_cleans_up_a_server_that_died(world) -> None:
    s = world["make"]()
    await s.start()
    node = world["node"]
    assert await s.poll() is None
    node.state, node.exit_code = "exited", 3
    assert await s.poll() == 3
    assert node.calls[-1] == ("stop", "alice") and s.container_id == ""


async def test_poll_of_a_down_node_counts_the_server_stopped(world) -> None:
    s = world["make"]()
    await s.start()
    world["node"].fail = NodeUnreachable("no answer")
    assert await s.poll() is None  # a blip: the node still heartbeats
    world["up"]["n1"] = False
    assert await s.poll() == 1


async def test_a_server_its_node_restart_stopped_is_asked_back_only_with_the_setting(
        world) -> None:
    s = world["make"](options={"gpus": 1})
    await s.start()
    node = world["node"]
    node.state, node.exit_code = "exited", 0  # its user shut it down: never restarted
    assert await s.poll() == 0
    s.restart_interrupted = True
    assert await s.poll() == 0
    assert world["cluster"].restarts() == []
    node.state, node.interrupted = "missing", 1000.0
    s.restart_interrupted = False
    assert await s.poll() == 0
    assert world["cluster"].restarts() == []
    s.restart_interrupted = True
    assert await s.poll() == 0
    [ask] = world["cluster"].restarts()
    assert {k: ask[k] for k in ("key", "user", "server", "node", "reason", "options")} == {
        "key": "alice", "user": "alice", "server": "", "node": "n1",
        "reason": "node n1 restarted", "options": {"gpus": 1}}
    # The start that follows (whoever makes it) ends the ask.
    node.state, node.interrupted = "running", None
    await s.start()
    assert world["cluster"].restarts() == []


async def test_a_server_on_a_node_that_went_down_is_asked_back(world) -> None:
    s = world["make"](server="work")
    s.restart_interrupted = True
    await s.start()
    world["node"].fail = NodeUnreachable("no answer")
    world["up"]["n1"] = False
    assert await s.poll() == 1
    [ask] = world["cluster"].restarts()
    assert (ask["key"], ask["server"], ask["reason"]) == ("alice.work", "work",
                                                          "node n1 went down")
    # Stopped on purpose after all (the node is back, the server polls running): no restart.
    world["node"].fail, world["up"]["n1"] = None, True
    await s.start()
    world["cluster"].request_restart("alice.work", "alice", "work", "n1", "test", {})
    await s.stop()
    assert world["cluster"].restarts() == []


async def test_stop_and_state(world) -> None:
    s = world["make"](server="work")
    await s.start()
    state = s.get_state()
    assert (state["container_id"], state["root_key"], state["node"]) == (
        "c0ffee", "alice.work", "n1")
    again = world["make"](server="work")
    again.load_state(state)
    await again.stop()
    assert world["node"].calls[-1] == ("stop", "alice.work") and again.container_id == ""


async def test_a_root_stays_on_its_node(world) -> None:
    world["cluster"].set_placement("alice", "n9")
    s = world["make"]()
    with pytest.raises(LabVMError, match="on node n9, which is down"):
        await s.start()
    assert [c for c in world["node"].calls if c[0] == "start"] == []


async def test_a_lagging_heartbeat_is_checked_with_the_node(world) -> None:
    # The heartbeat still shows zed's GPU; the node itself knows zed just stopped.
    world["node"].live_gpus = [{"index": i, "uuid": f"GPU-{i}", "name": A100, "holder": None}
                               for i in range(2)]
    s = world["make"](options={"gpus": 1})
    s.policy = {"cpus": 2, "mem": "4G", "pids": 512, "max_gpus": 2}
    s.user_options = {"gpus": 2}
    await s.start()
    assert [c[0] for c in world["node"].calls] == ["info", "start"]


def test_progress_stops_when_start_is_done(world) -> None:
    s = world["make"]()

    async def run() -> list[dict[str, Any]]:
        task = asyncio.ensure_future(s.start())
        await asyncio.sleep(0)  # the hub asks for progress once the start is under way
        events = [e async for e in s.progress()]
        await task
        return events

    assert [e["progress"] for e in asyncio.run(run())] == [70]


async def test_refusals_reach_the_user_as_http_errors_with_our_words(world) -> None:
    # JupyterHub's form handler shows an HTTPError's message; anything else is "HTTP 500".
    cases = [(NodeUnreachable("node n1 did not answer"), 503, "try again soon"),
             (NodeRefused("node n1: 1 GPU requested but none is free on node n1", 409), 409,
              "none is free")]
    for error, status, says in cases:
        world["node"].fail = error
        with pytest.raises(web.HTTPError) as e:
            await world["make"]().start()
        assert e.value.status_code == status
        assert says in e.value.jupyterhub_message and "Internal" not in str(e.value)
    world["node"].fail = None
    world["cluster"].set_placement("alice", "n9")
    with pytest.raises(web.HTTPError) as e:
        await world["make"]().start()
    assert e.value.status_code == 400 and "n9, which is down" in e.value.jupyterhub_message


async def test_limits_are_capped_to_the_node(world) -> None:
    # The admin policy asks for more than node n1 has: 64 GiB and 8 CPUs.
    s = world["make"]()
    s.policy = {"cpus": 16, "mem": "96G", "pids": 512, "max_gpus": 1}
    html = await s._render_options_form()
    assert "64 GiB" in html and "not the 96 GiB of your policy" in html
    assert "CPUs are 8, not the 16" in html
    await s.start()
    req = world["node"].calls[-1][1]
    assert (req.limits["mem_bytes"], req.limits["cpus"]) == (64 << 30, 8.0)
    assert any("not the 96 GiB" in e["message"] for e in s._events)
