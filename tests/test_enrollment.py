"""Which nodes the hub trusts: enrolled with a one-time join token and a certificate,
reached only at the enrolled HTTPS URL, and counted up only on heartbeats signed by
that certificate. Fast: a real database, real certificates, real signatures, the admin
service's real tornado app; no test bed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from support import enrolled_nodes
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from labvm_spawner.cluster import Cluster
from labvm_spawner.errors import LabVMError
from labvm_spawner.monitor import handlers
from labvm_spawner.monitor.service import MonitorService
from labvm_spawner.node import auth, registry
from labvm_spawner.node.client import RemoteNode

INFO = {"gpus": [], "cpus": 8, "mem_bytes": 32 << 30, "cpus_committed": 0,
        "mem_committed": 0, "servers": {}}


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/labvm.sqlite"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    auth.make_key(tmp_path / "node.key")
    return tmp_path / "node.key"


def test_a_join_token_works_once_for_its_node(tmp_path: Path, db: str) -> None:
    c = Cluster(db)
    crt, _ = enrolled_nodes.cert(tmp_path, "a")
    pem = crt.read_text()
    token = c.make_join_token("a", "boss")["token"]
    refusals = [
        (("b", "https://127.0.0.1:8741", pem, token), "not one made for node b"),
        (("a", "http://127.0.0.1:8741", pem, token), "must be https://HOST:PORT"),
        (("a", "https://127.0.0.1:8741/x", pem, token), "must be https://HOST:PORT"),
        (("a", "https://10.9.9.9:8741", pem, token), "not valid for 10.9.9.9"),
        (("a", "https://127.0.0.1:8741", "junk", token), "not a PEM certificate"),
        (("a", "https://127.0.0.1:8741", pem, "labvm-join-guess"), "not one made for"),
    ]
    for args, says in refusals:
        with pytest.raises(LabVMError, match=says):
            c.enroll(*args)
        assert c.enrolled() == {}
    done = c.enroll("a", "https://127.0.0.1:8741", pem, token)
    assert done["fingerprint"] == auth.cert_fingerprint(pem)
    assert c.enrolled()["a"]["url"] == "https://127.0.0.1:8741"
    with pytest.raises(LabVMError, match="used already"):
        c.enroll("a", "https://127.0.0.1:8741", pem, token)


def test_an_expired_token_is_refused(tmp_path: Path, db: str) -> None:
    c = Cluster(db)
    crt, _ = enrolled_nodes.cert(tmp_path, "a")
    made = c.make_join_token("a", "boss", ttl_s=60)
    from sqlalchemy import update

    from labvm_spawner.cluster import JoinToken

    with c.engine.begin() as conn:
        conn.execute(update(JoinToken).values(expires=time.time() - 1))
    with pytest.raises(LabVMError, match="expired"):
        c.enroll("a", "https://127.0.0.1:8741", crt.read_text(), made["token"])
    for bad in ("a b", "", "../x"):
        with pytest.raises(LabVMError, match="invalid node name"):
            c.make_join_token(bad, "boss")


async def test_only_signed_heartbeats_of_enrolled_nodes_count(tmp_path: Path, db: str,
                                                             key_file: Path) -> None:
    reg = tmp_path / "registry"
    _, key_a = enrolled_nodes.enroll(db, reg, "a", INFO)
    enrolled_nodes.enroll(db, reg, "b", INFO)
    c = Cluster(db, str(reg), str(key_file))
    nodes = await c.nodes()
    assert nodes["a"].up and nodes["a"].info.cpus == 8 and c.warnings == []

    # A forged record for a: another URL, its own certificate, more GPUs. Not signed by
    # a's enrolled certificate: ignored, and a counts as down.
    _, other_key = enrolled_nodes.cert(tmp_path / "mallory", "a")
    forged = dict(INFO, gpus=[{"index": 0, "uuid": "GPU-x", "name": "H100", "holder": None}])
    for key in (None, other_key):
        registry.write_record(reg, {"name": "a", "url": "http://10.0.0.66:80", "cert": "x",
                                    "info": forged}, key)
        nodes = await c.nodes()
        assert not nodes["a"].up and nodes["a"].info.gpus == []
        assert any("node a" in w and "not signed" in w for w in c.warnings)
    # The hub still reaches a only where it enrolled.
    assert c.client("a").url == "https://127.0.0.1:1"

    # A replayed old record, properly signed, shows the node down.
    registry.write_record(reg, {"name": "a", "url": "x", "info": INFO}, key_a)
    assert (await c.nodes())["a"].up
    enrolled_nodes.age(reg, "a", 3600, key_a)
    assert not (await c.nodes())["a"].up

    # A record from a node nobody enrolled is ignored and reported.
    _, stranger = enrolled_nodes.cert(tmp_path, "z")
    registry.write_record(reg, {"name": "z", "url": "https://127.0.0.1:2", "info": INFO},
                          stranger)
    nodes = await c.nodes()
    assert "z" not in nodes and any(w.startswith("z: ") for w in c.warnings)
    with pytest.raises(LabVMError, match="unknown node 'z'"):
        c.client("z")

    # Revoked: gone at once, and no client for it.
    c.revoke("b", "boss")
    assert "b" not in await c.nodes()
    with pytest.raises(LabVMError, match="not enrolled, or revoked"):
        c.client("b")
    assert c.enrolled(revoked=True)["b"]["revoked_by"] == "boss"


def test_the_hub_never_calls_a_node_over_plain_http() -> None:
    with pytest.raises(LabVMError, match="not HTTPS"):
        RemoteNode("a", "http://127.0.0.1:8741", "token", "")


def _fake_login(handler: handlers.BaseHandler) -> dict | None:
    header = handler.request.headers.get("Authorization", "")
    return {"token boss": {"name": "boss", "admin": True},
            "token judy": {"name": "judy", "admin": False}}.get(header)


async def test_enrollment_through_the_admin_service(tmp_path: Path, db: str, key_file: Path,
                                                   monkeypatch) -> None:
    monkeypatch.setattr(handlers.BaseHandler, "get_current_user", _fake_login)
    svc = MonitorService()
    svc.initialize([f"--Collector.state_dir={tmp_path / 'state'}",
                    f"--MonitorService.registry_dir={tmp_path / 'registry'}",
                    f"--MonitorService.node_key_file={key_file}",
                    f"--MonitorService.cluster_db_url={db}",
                    "--MonitorService.prefix=/services/labvm-monitor/"])
    sock, port = bind_unused_port()
    server = HTTPServer(svc.make_app())
    server.add_sockets([sock])
    base = f"http://127.0.0.1:{port}/services/labvm-monitor/"

    async def post(path: str, body: dict, who: str = "") -> tuple[int, dict]:
        headers = {"Authorization": f"token {who}"} if who else {}
        r = await AsyncHTTPClient().fetch(base + path, method="POST", body=json.dumps(body),
                                          headers=headers, raise_error=False)
        return r.code, json.loads(r.body or b"{}")

    try:
        assert (await post("api/admin/nodes/join-token", {"node": "a"}, "judy"))[0] == 403
        code, made = await post("api/admin/nodes/join-token", {"node": "a"}, "boss")
        assert code == 200 and made["token"].startswith("labvm-join-")
        pem = enrolled_nodes.cert(tmp_path, "a")[0].read_text()
        ask = {"name": "a", "url": "https://127.0.0.1:8741", "cert": pem, "token": made["token"]}
        code, bad = await post("api/nodes/enroll", dict(ask, url="http://127.0.0.1:8741"))
        assert code == 400 and "https" in bad["message"]
        code, done = await post("api/nodes/enroll", ask)
        assert code == 200 and done["fingerprint"] == auth.cert_fingerprint(pem)
        assert done["token_hash"] == auth.token_hash(
            auth.node_token(auth.load_key(key_file), "a"))
        code, again = await post("api/nodes/enroll", ask)
        assert code == 400 and "used already" in again["message"]
        assert (await post("api/admin/nodes/revoke", {"node": "a"}, "judy"))[0] == 403
        assert (await post("api/admin/nodes/revoke", {"node": "a"}, "boss"))[0] == 200
        assert svc.cluster.enrolled() == {}
    finally:
        server.stop()
        await asyncio.sleep(0)
        svc.cluster.close()
        svc.history.close()


def test_the_hub_side_commands(tmp_path: Path, db: str, capsys) -> None:
    from labvm_spawner import cli

    assert cli.main(["node", "join-token", "a", "--db-url", db]) == 0
    token = capsys.readouterr().out.strip()
    crt = enrolled_nodes.cert(tmp_path, "a")[0].read_text()
    Cluster(db).enroll("a", "https://127.0.0.1:8741", crt, token)
    assert cli.main(["node", "list", "--db-url", db]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("a\thttps://127.0.0.1:8741\tenrolled\t")
    assert cli.main(["node", "revoke", "a", "--db-url", db]) == 0
    assert cli.main(["node", "revoke", "a", "--db-url", db]) == 2  # said why, on stderr
    assert "is not an enrolled node" in capsys.readouterr().err
    assert cli.main(["node", "join-token", "Bad Name", "--db-url", db]) == 2
