"""Migration refusals, the admin API over them and ``labvm migrate``: fast, no hub, no
Docker. The cluster is real (a tmp SQLite database and a tmp registry of heartbeat
records); the hub is a small stub; the HTTP tests run the service's real tornado app
with the hub login replaced by a token -> user table."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from support import enrolled_nodes
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from labvm_spawner import cli
from labvm_spawner.cli import migrate as migrate_cli
from labvm_spawner.cluster import Cluster
from labvm_spawner.migration import MigrationRefused, Migrator
from labvm_spawner.monitor import handlers
from labvm_spawner.monitor.service import MonitorService


def gpus(model: str, holders: list[str | None]) -> list[dict[str, Any]]:
    return [{"index": i, "uuid": f"GPU-{model}-{i}", "name": model, "memory_total": 80 << 30,
             "holder": h} for i, h in enumerate(holders)]


def add_node(reg: Path, name: str, gpu_list: list[dict] | None = None,
             up: bool = True) -> None:
    """An enrolled node with a signed heartbeat (an hour old unless ``up``)."""
    info = {"gpus": gpu_list or [], "cpus": 16, "mem_bytes": 64 << 30, "cpus_committed": 0,
            "mem_committed": 0, "servers": {}}
    enrolled_nodes.enroll(f"sqlite:///{reg.parent}/labvm.sqlite", reg, name, info, up)


class StubHub:
    """The hub's REST calls a migration makes; stop/start only record themselves."""

    def __init__(self, users: dict[str, dict[str, Any]]) -> None:
        self.models = users
        self.calls: list[tuple] = []

    async def users(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(u) for u in self.models.values()]

    async def user(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.models.get(name))

    async def stop_server(self, user: str, server: str = "") -> None:
        self.calls.append(("stop", user, server))

    async def start_server(self, user: str, server: str = "",
                           options: dict[str, Any] | None = None) -> None:
        self.calls.append(("start", user, server))


def hub_users() -> dict[str, dict[str, Any]]:
    return {
        # alice runs her default server on n1, holding two of its A100s
        "alice": {"name": "alice", "admin": False,
                  "servers": {"": {"ready": True, "user_options": {"gpus": 2}}}},
        # bob has never started a server: no placement
        "bob": {"name": "bob", "admin": False, "servers": {}},
        # carol's stopped server lives on n4, which is down
        "carol": {"name": "carol", "admin": False, "servers": {}},
        # dave's stopped server lives on n1 (up)
        "dave": {"name": "dave", "admin": False, "servers": {}},
        "boss": {"name": "boss", "admin": True, "servers": {}},
    }


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    """n1 (alice's, 2 of 4 A100s held by her), n2 (2 free A100s), n3 (1 free A100),
    n4 (down), n5 (drained)."""
    r = tmp_path / "registry"
    add_node(r, "n1", gpus("A100", ["alice", "alice", None, None]))
    add_node(r, "n2", gpus("A100", [None, None]))
    add_node(r, "n3", gpus("A100", [None, "zed"]))
    add_node(r, "n4", gpus("A100", [None]), up=False)
    add_node(r, "n5", gpus("A100", [None, None]))
    return r


def place(cluster: Cluster) -> None:
    cluster.set_placement("alice", "n1")
    cluster.set_placement("carol", "n4")
    cluster.set_placement("dave", "n1")
    cluster.set_drained("n5", True, "boss")


@pytest.fixture
def cluster(tmp_path: Path, reg: Path):
    c = Cluster(f"sqlite:///{tmp_path}/labvm.sqlite", str(reg), "", local=None)
    place(c)
    yield c
    c.close()


def snapshot(cluster: Cluster) -> tuple:
    """Everything a refused migration must leave as it was."""
    return (cluster.placements(), cluster.pins(), cluster.drained(),
            [(m["id"], m["state"]) for m in cluster.migrations()])


REFUSALS = [
    ("nobody", "", "n2", "there is no user 'nobody'"),
    ("Bad!", "", "n2", "cannot be used"),
    ("alice", "nope", "n2", "alice has no server named 'nope'"),
    ("alice", "", "n9", r"there is no node 'n9' \(nodes: n1, n2, n3, n4, n5\)"),
    ("alice", "", "n4", "node n4 is down"),
    ("alice", "", "n5", "node n5 is drained"),
    ("alice", "", "n1", "alice is already on node n1"),
    ("bob", "", "n2", "bob has no root on any node yet; pin bob to n2 instead"),
    ("alice", "", "n3", "node n3 has 1 free A100 GPU"),
]


@pytest.mark.parametrize("user,server,node,message", REFUSALS,
                         ids=["unknown-user", "bad-username", "unknown-server",
                              "unknown-node", "down-node", "drained-node", "same-node",
                              "no-placement", "target-lacks-gpus"])
async def test_refusals_change_nothing(cluster, user, server, node, message):
    hub = StubHub(hub_users())
    migrator = Migrator(cluster, hub)
    before = snapshot(cluster)
    with pytest.raises(MigrationRefused, match=message):
        await migrator.check(user, server, node)
    with pytest.raises(MigrationRefused, match=message):
        await migrator.start(user, server, node, "boss")
    assert snapshot(cluster) == before
    assert hub.calls == [] and migrator.tasks == {}


async def test_a_busy_server_is_refused(cluster):
    users = hub_users()
    users["alice"]["servers"][""] = {"ready": False, "pending": "spawn"}
    migrator = Migrator(cluster, StubHub(users))
    before = snapshot(cluster)
    with pytest.raises(MigrationRefused, match=r"busy \(spawn\)"):
        await migrator.start("alice", "", "n2", "boss")
    assert snapshot(cluster) == before


async def test_a_second_migration_of_the_same_root_is_refused(cluster):
    hub = StubHub(hub_users())
    migrator = Migrator(cluster, hub)
    assert (await migrator.check("alice", "", "n2"))["source"] == "n1"  # fine on its own
    first = cluster.begin_migration("alice", "alice", "", "n1", "n2", "boss")
    before = snapshot(cluster)
    for call in (migrator.check("alice", "", "n2"), migrator.start("alice", "", "n2", "boss")):
        with pytest.raises(MigrationRefused, match="alice is already being migrated"):
            await call
    assert snapshot(cluster) == before
    assert cluster.active_migration("alice")["id"] == first and hub.calls == []


async def test_check_plans_without_changing_anything(cluster):
    migrator = Migrator(cluster, StubHub(hub_users()))
    before = snapshot(cluster)
    plan = await migrator.check("alice", "", "n2")
    assert plan == {"key": "alice", "source": "n1", "source_up": True, "state": "running",
                    "options": {"gpus": 2}}
    assert snapshot(cluster) == before


async def test_evacuating_a_stopped_root_from_a_down_node(cluster):
    hub = StubHub(hub_users())
    migrator = Migrator(cluster, hub)
    mid = await migrator.start("carol", "", "n2", "boss")
    m = await migrator.wait(mid)
    assert (m["state"], m["source"], m["target"], m["by"]) == ("done", "n4", "n2", "boss")
    assert m["downtime_s"] is None  # nothing was running
    assert cluster.placement("carol") == "n2" and cluster.active_migration("carol") is None
    assert hub.calls == []


async def test_an_unreachable_source_fails_the_migration_and_frees_the_root(cluster):
    # No node key file: the up source cannot be asked to sync. The migration must end
    # failed, with the root where it was and no lock left behind.
    migrator = Migrator(cluster, StubHub(hub_users()))
    mid = await migrator.start("dave", "", "n2", "boss")
    m = await migrator.wait(mid)
    assert m["state"] == "failed" and "no node key file" in m["error"]
    assert cluster.placement("dave") == "n1" and cluster.active_migration("dave") is None


# ---- the admin API -----------------------------------------------------------------

TOKENS = {"boss-token": {"name": "boss", "admin": True},
          "alice-token": {"name": "alice", "admin": False}}


def fake_login(handler: handlers.BaseHandler) -> dict[str, Any] | None:
    # Stands in for HubOAuth's token check: the admin gate after it is the real one.
    header = handler.request.headers.get("Authorization", "")
    return TOKENS.get(header.removeprefix("token "))


@pytest.fixture
async def api(tmp_path: Path, reg: Path, monkeypatch):
    """The service's app on a free port, with the stub hub; yields (service, base URL)."""
    monkeypatch.setattr(handlers.BaseHandler, "get_current_user", fake_login)
    svc = MonitorService()
    svc.initialize([f"--Collector.state_dir={tmp_path / 'state'}",
                    f"--MonitorService.registry_dir={reg}",
                    f"--MonitorService.cluster_db_url=sqlite:///{tmp_path}/labvm.sqlite",
                    "--MonitorService.prefix=/services/labvm-monitor/"])
    place(svc.cluster)
    svc.hub = StubHub(hub_users())
    svc.migrator = Migrator(svc.cluster, svc.hub)
    sock, port = bind_unused_port()
    server = HTTPServer(svc.make_app())
    server.add_sockets([sock])
    yield svc, f"http://127.0.0.1:{port}/services/labvm-monitor/"
    server.stop()
    await server.close_all_connections()
    svc.cluster.close()
    svc.history.close()


async def fetch(url: str, method: str = "GET", body: Any = None,
                token: str = "boss-token") -> HTTPResponse:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    return await AsyncHTTPClient().fetch(
        url, method=method, body=data, raise_error=False, follow_redirects=False,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"})


async def test_non_admins_are_refused_and_nothing_changes(api):
    svc, url = api
    before = snapshot(svc.cluster)
    for path, body in (("api/admin/migrate", {"user": "dave", "node": "n2"}),
                       ("api/admin/pin", {"user": "alice", "node": "n2"}),
                       ("api/admin/drain", {"node": "n1", "drained": True})):
        r = await fetch(url + path, "POST", body, token="alice-token")
        assert r.code == 403, path
        assert json.loads(r.body)["error"] == "admins only"
    for path in ("api/admin/migrations", "api/admin/migrations/1", "api/admin/state"):
        assert (await fetch(url + path, token="alice-token")).code == 403, path
    # No login at all: a POST is refused outright.
    assert (await fetch(url + "api/admin/migrate", "POST", {}, token="none")).code == 403
    assert snapshot(svc.cluster) == before and svc.hub.calls == []


async def test_migrate_refusals_and_bad_input_are_400(api):
    svc, url = api
    before = snapshot(svc.cluster)
    r = await fetch(url + "api/admin/migrate", "POST", {"user": "alice", "node": "n4"})
    assert r.code == 400 and json.loads(r.body)["error"] == "node n4 is down"
    r = await fetch(url + "api/admin/migrate", "POST", {"user": "a%s", "node": "n2"})
    assert r.code == 400 and "'a%s' cannot be used" in json.loads(r.body)["error"]
    for body in ({"user": "alice"}, {"node": "n2"}, {"user": 3, "node": "n2"},
                 {"user": "alice", "node": "n2", "server": 5}, "not json", "[1]"):
        r = await fetch(url + "api/admin/migrate", "POST", body)
        assert r.code == 400, body
        assert json.loads(r.body)["error"]
    assert snapshot(svc.cluster) == before


async def test_migrate_through_the_api(api):
    svc, url = api
    r = await fetch(url + "api/admin/migrate", "POST", {"user": "carol", "node": "n2"})
    assert r.code == 202, r.body
    mid = json.loads(r.body)["id"]
    await svc.migrator.wait(mid)
    m = json.loads((await fetch(url + f"api/admin/migrations/{mid}")).body)
    assert (m["id"], m["key"], m["state"], m["target"], m["by"]) == \
        (mid, "carol", "done", "n2", "boss")
    listed = json.loads((await fetch(url + "api/admin/migrations")).body)["migrations"]
    assert [x["id"] for x in listed] == [mid]
    assert (await fetch(url + "api/admin/migrations/999")).code == 404
    # Moving it again to where it is now is refused.
    r = await fetch(url + "api/admin/migrate", "POST", {"user": "carol", "node": "n2"})
    assert json.loads(r.body)["error"] == "carol is already on node n2"


async def test_pin_and_drain(api):
    svc, url = api
    r = await fetch(url + "api/admin/pin", "POST", {"user": "bob", "node": "n9"})
    assert r.code == 400 and "there is no node 'n9'" in json.loads(r.body)["error"]
    for body in ({"user": "bob", "node": 3}, {"user": "Bad!", "node": "n2"}, {"node": "n2"}):
        assert (await fetch(url + "api/admin/pin", "POST", body)).code == 400, body
    assert svc.cluster.pins() == {}
    r = await fetch(url + "api/admin/pin", "POST", {"user": "bob", "node": "n2"})
    assert (r.code, json.loads(r.body)) == (200, {"user": "bob", "node": "n2"})
    assert svc.cluster.pins() == {"bob": "n2"}
    r = await fetch(url + "api/admin/pin", "POST", {"user": "bob", "node": None})
    assert r.code == 200 and svc.cluster.pins() == {}

    r = await fetch(url + "api/admin/drain", "POST", {"node": "n2", "drained": True})
    assert json.loads(r.body) == {"node": "n2", "drained": True}
    assert svc.cluster.drained() == {"n2", "n5"}  # the table the hub's placement reads
    r = await fetch(url + "api/admin/drain", "POST", {"node": "n5", "drained": False})
    assert svc.cluster.drained() == {"n2"}
    assert (await fetch(url + "api/admin/drain", "POST", {"node": "../x"})).code == 400


async def test_admin_state_shows_the_cluster(api):
    svc, url = api
    svc.cluster.set_pin("bob", "n3")
    store = Path(svc.store_root)
    (store / "alice").mkdir(parents=True)
    (store / "alice" / "synced.json").write_text(json.dumps({"t": 1700000000, "node": "n1"}))
    state = json.loads((await fetch(url + "api/admin/state")).body)
    nodes = {n["name"]: n for n in state["cluster_nodes"]}
    assert list(nodes) == ["n1", "n2", "n3", "n4", "n5"]
    assert nodes["n1"]["gpus"] == [{"model": "A100", "total": 4, "free": 2}]
    assert nodes["n1"]["up"] and not nodes["n4"]["up"] and nodes["n4"]["age_s"] > 3000
    assert nodes["n5"]["drained"] and not nodes["n1"]["drained"]
    assert state["placements"] == {"alice": "n1", "carol": "n4", "dave": "n1"}
    assert state["pins"] == {"bob": "n3"} and state["migrations"] == []
    assert state["nodes"][0]["name"] == "local"  # this service's own, sampled node
    roots = {r["key"]: r for u in state["users"] for r in u["roots"]}
    assert (roots["alice"]["node"], roots["alice"]["last_synced"]) == ("n1", 1700000000.0)
    assert roots["alice"]["last_sync"] == "2023-11-14T22:13:20+00:00"


# ---- labvm migrate -------------------------------------------------------------------

async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, ["migrate", *argv])


async def test_cli_migrates_and_follows(api, capsys):
    svc, url = api
    assert await run_cli("carol", "n2", "--url", url, "--token", "boss-token") == 0
    out = capsys.readouterr().out
    assert "migration 1 accepted" in out and "migration 1 done: carol is on node n2" in out
    assert svc.cluster.placement("carol") == "n2"


async def test_cli_refusals(api, capsys, monkeypatch):
    svc, url = api
    assert await run_cli("alice", "n4", "--url", url, "--token", "boss-token") == 1
    assert "node n4 is down" in capsys.readouterr().err
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "alice-token")
    monkeypatch.setenv("LABVM_ADMIN_URL", url.rstrip("/"))
    assert await run_cli("dave", "n2") == 1
    assert "admins only" in capsys.readouterr().err
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN")
    assert await run_cli("dave", "n2") == 2
    assert "no hub API token" in capsys.readouterr().err
    assert svc.cluster.placement("dave") == "n1" and svc.cluster.migrations() == []


def test_cli_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["migrate", "alice"])
    assert e.value.code == 2
    args = cli.build_parser().parse_args(["migrate", "alice", "n2", "--server", "work",
                                          "--no-wait"])
    assert (args.user, args.node, args.server, args.no_wait, args.func) == \
        ("alice", "n2", "work", True, migrate_cli.run)
