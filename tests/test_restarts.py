"""The monitor service's restarts of servers a node going down stopped: which it starts,
when, with what, and which it gives up on (a stub hub API, a real LabVM database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse

from labvm_spawner.cluster import Cluster, NodeView
from labvm_spawner.monitor.restarts import MAX_ATTEMPTS, restart_interrupted


class StubHub:
    def __init__(self) -> None:
        self.users: dict[str, dict] = {}
        self.started: list[tuple] = []
        self.refuse = False

    async def user(self, name: str) -> dict | None:
        return self.users.get(name)

    async def start_server(self, user: str, server: str = "", options=None) -> None:  # noqa: ANN001
        self.started.append((user, server, options))
        if self.refuse:
            req = HTTPRequest("http://hub/")
            raise HTTPClientError(400, response=HTTPResponse(req, 400, buffer=None))


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    cluster = Cluster(f"sqlite:///{tmp_path}/labvm.sqlite")
    up = {"b": False}

    async def nodes() -> dict[str, NodeView]:
        return {"b": NodeView("b", up["b"], False, {})}

    monkeypatch.setattr(cluster, "nodes", nodes)
    hub = StubHub()
    hub.users = {"alice": {"servers": {"": {"ready": False, "pending": None}}},
                 "bob": {"servers": {"work": {"ready": True, "pending": None}}}}
    yield cluster, hub, up
    cluster.close()


async def test_a_server_starts_again_once_its_node_is_back(world) -> None:
    cluster, hub, up = world
    cluster.request_restart("alice", "alice", "", "b", "node b restarted", {"gpus": 1})
    assert await restart_interrupted(cluster, hub, 3600) == []
    assert hub.started == []  # node b is still down: its upper is there
    up["b"] = True
    [done] = await restart_interrupted(cluster, hub, 3600)
    assert done["key"] == "alice"
    assert hub.started == [("alice", "", {"gpus": 1})]
    # Pending now: not started twice while it starts (the start itself drops the ask).
    hub.users["alice"]["servers"][""]["pending"] = "spawn"
    assert await restart_interrupted(cluster, hub, 3600) == []
    assert len(hub.started) == 1


async def test_running_gone_or_old_asks_start_nothing(world) -> None:
    cluster, hub, up = world
    up["b"] = True
    cluster.request_restart("bob.work", "bob", "work", "b", "node b restarted", {})
    cluster.request_restart("carol", "carol", "", "b", "node b went down", {})  # no such user
    assert await restart_interrupted(cluster, hub, 3600) == []
    assert hub.started == []
    assert [a["key"] for a in cluster.restarts()] == ["bob.work"]  # started by someone
    cluster.drop_restart("bob.work")
    cluster.request_restart("alice", "alice", "", "b", "node b restarted", {})
    assert await restart_interrupted(cluster, hub, 3600, now=cluster.restarts()[0]["t"] + 7200) \
        == []
    assert hub.started == [] and cluster.restarts() == []


async def test_a_server_being_migrated_is_left_to_the_migration(world) -> None:
    cluster, hub, up = world
    up["b"] = True
    cluster.request_restart("alice", "alice", "", "b", "node b went down", {})
    cluster.begin_migration("alice", "alice", "", "b", "a", "boss")
    assert await restart_interrupted(cluster, hub, 3600) == []
    assert hub.started == [] and len(cluster.restarts()) == 1


async def test_a_refused_restart_is_tried_a_few_times_then_dropped(world) -> None:
    cluster, hub, up = world
    up["b"] = True
    hub.refuse = True
    cluster.request_restart("alice", "alice", "", "b", "node b restarted", {})
    for _ in range(MAX_ATTEMPTS + 1):
        await restart_interrupted(cluster, hub, 3600)
    assert len(hub.started) == MAX_ATTEMPTS
    assert cluster.restarts() == []
