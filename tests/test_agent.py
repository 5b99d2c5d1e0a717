"""The node agent's HTTP routes (``node.agent.make_app``) against a stub engine: every
route's token check, and the validation in front of ``NodeOps``. Fast: the real
tornado app on a free port, no Docker. TLS and the real engine are tested on the
multi-node test bed."""

from __future__ import annotations

import asyncio
import copy
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from labvm_spawner.errors import LabVMError
from labvm_spawner.node import auth
from labvm_spawner.node.agent import make_app
from labvm_spawner.node.allocations import GpuUnavailable

TOKEN = auth.node_token(b"k" * 32, "n1")
OTHER = auth.node_token(b"k" * 32, "n2")
REQUEST = {"key": "alice", "username": "alice", "server": "", "image": "labvm/user:1",
           "cmd": ["jupyterhub-singleuser"], "env": {}, "secrets": {},
           "limits": {"cpus": 1, "mem_bytes": 1 << 30, "pids": 100, "blkio_weight": None,
                      "io_read_bps": None, "io_write_bps": None, "disk_bytes": None,
                      "store_bytes": None}}


class StubOps:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail: Exception | None = None

    def _call(self, *what: object) -> dict:
        self.calls.append(what)
        if self.fail:
            raise self.fail
        return {"ok": True, "what": what[0]}

    def info(self) -> dict:
        return self._call("info")

    def status(self, key: str) -> dict:
        return self._call("status", key)

    def start(self, req) -> dict:  # noqa: ANN001
        return self._call("start", req.key)

    def stop(self, key: str) -> dict:
        return self._call("stop", key)

    def sync(self, key: str) -> dict:
        return self._call("sync", key)

    def discard(self, key: str) -> dict:
        return self._call("discard", key)

    def sample(self) -> dict:
        return self._call("sample")

    def set_ssh_keys(self, key: str, keys: list[str]) -> dict:
        return self._call("set_ssh_keys", key, len(keys))

    def notice(self, key: str, name: str, text: str | None) -> dict:
        return self._call("notice", key, name)

    def restore_aside(self, aside_id: str) -> dict:
        return self._call("restore_aside", aside_id)

    def delete_aside(self, aside_id: str) -> dict:
        return self._call("delete_aside", aside_id)

    def ssh_address(self, key: str) -> str:
        self.calls.append(("ssh_address", key))
        raise LabVMError(f"{key} is not running on node n1")


@pytest.fixture
async def agent():
    ops = StubOps()
    pool = ThreadPoolExecutor(2)
    sock, port = bind_unused_port()
    server = HTTPServer(make_app(ops, auth.token_hash(TOKEN), pool))
    server.add_sockets([sock])
    base = f"http://127.0.0.1:{port}"

    async def call(method: str, path: str, body: object = None, token: str | None = TOKEN,
                   scheme: str = "Bearer") -> HTTPResponse:
        headers = {"Authorization": f"{scheme} {token}"} if token else {}
        payload = None if method == "GET" else (
            body if isinstance(body, bytes) else json.dumps(body if body is not None else {}))
        return await AsyncHTTPClient().fetch(base + path, method=method, body=payload,
                                             headers=headers, raise_error=False)

    yield ops, call
    server.stop()
    await asyncio.sleep(0)
    pool.shutdown()


ROUTES = [("GET", "/v1/info", "info"), ("GET", "/v1/servers/alice", "status"),
          ("POST", "/v1/servers/alice/start", "start"), ("POST", "/v1/servers/alice/stop", "stop"),
          ("POST", "/v1/servers/alice.work/sync", "sync"),
          ("POST", "/v1/servers/alice/discard", "discard"), ("GET", "/v1/sample", "sample"),
          ("POST", "/v1/asides/alice-1796143930/restore", "restore_aside"),
          ("POST", "/v1/asides/alice.work-1796143930/delete", "delete_aside")]


@pytest.mark.parametrize("method,path,op", ROUTES)
async def test_every_route_needs_this_nodes_token(agent, method, path, op) -> None:
    ops, call = agent
    for token, scheme in ((None, "Bearer"), ("nope", "Bearer"), (OTHER, "Bearer"),
                          (TOKEN, "token")):
        r = await call(method, path, REQUEST, token=token, scheme=scheme)
        assert r.code == 401, (token, scheme, r.code)
    assert ops.calls == []
    r = await call(method, path, REQUEST)
    assert r.code == 200, r.body
    assert [c[0] for c in ops.calls] == [op]


async def test_start_bodies_are_checked_before_the_engine_sees_them(agent) -> None:
    ops, call = agent
    bad = {
        "not JSON": b"{",
        "another key": dict(REQUEST, key="bob"),
        "a user not the key's": dict(REQUEST, username="bob"),
        "unknown fields": dict(REQUEST, privileged=True),
        "a bad image": dict(REQUEST, image="x y"),
        "bad limits": dict(REQUEST, limits=dict(REQUEST["limits"], cpus=-1)),
        "not an object": ["x"],
    }
    for what, body in bad.items():
        r = await call("POST", "/v1/servers/alice/start", body)
        assert r.code == 400, (what, r.code, r.body)
        assert json.loads(r.body)["error"], what
    assert ops.calls == []
    assert (await call("POST", "/v1/servers/alice/start", copy.deepcopy(REQUEST))).code == 200
    assert ops.calls == [("start", "alice")]


async def test_keys_that_are_no_keys_never_reach_the_engine(agent) -> None:
    ops, call = agent
    for path in ("/v1/servers/Alice", "/v1/servers/..%2fetc/stop", "/v1/servers/a.b.c",
                 "/v1/servers/alice/rm", "/v1/servers/alice%0a/stop"):
        r = await call("POST" if path.count("/") > 3 else "GET", path)
        assert r.code == 404, (path, r.code)
    assert ops.calls == []


async def test_engine_refusals_are_400_and_409_with_their_words(agent) -> None:
    ops, call = agent
    ops.fail = LabVMError("the image 'x' is not one node n1 built")
    r = await call("POST", "/v1/servers/alice/stop")
    assert r.code == 400 and json.loads(r.body)["error"] == ops.fail.args[0]
    ops.fail = GpuUnavailable("1 GPU requested but none is free on node n1")
    r = await call("POST", "/v1/servers/alice/start", REQUEST)
    assert r.code == 409 and "none is free" in json.loads(r.body)["error"]


KEY_LINE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK9VD8fCDBHhi8U3VQmpC+9BmCB52MYvxaUxkQ77VfpY"
            " me@x")


async def test_key_and_notice_bodies_are_checked_before_the_engine_sees_them(agent) -> None:
    ops, call = agent
    for body in ({"keys": [KEY_LINE + "\nssh-ed25519 AAAA evil"]}, {"keys": "x"},
                 {"keys": [f'command="sh" {KEY_LINE}']}, {"keys": [], "more": 1}, ["x"]):
        r = await call("POST", "/v1/servers/alice/ssh-keys", body)
        assert r.code == 400, (body, r.body)
    for body in ({"name": "x"}, {"name": 1, "text": None}, {"name": "n", "text": 5},
                 {"name": "n", "text": "x" * 9000}):
        r = await call("POST", "/v1/servers/alice/notice", body)
        assert r.code == 400, (body, r.body)
    assert ops.calls == []
    assert (await call("POST", "/v1/servers/alice/ssh-keys", {"keys": [KEY_LINE]})).code == 200
    r = await call("POST", "/v1/servers/alice/notice", {"name": "LABVM-X.txt", "text": None})
    assert r.code == 200
    assert ops.calls == [("set_ssh_keys", "alice", 1), ("notice", "alice", "LABVM-X.txt")]
    for path in ("/v1/asides/../restore", "/v1/asides/alice-1/restore",
                 "/v1/asides/alice-1796143930/chmod"):
        assert (await call("POST", path)).code == 404, path


async def test_the_ssh_tunnel_needs_the_token_and_a_running_server(agent) -> None:
    ops, call = agent
    assert (await call("GET", "/v1/servers/alice/ssh", token=None)).code == 401
    assert (await call("GET", "/v1/servers/alice/ssh", token=OTHER)).code == 401
    assert ops.calls == []
    r = await call("GET", "/v1/servers/alice/ssh")
    assert r.code == 404 and "not running" in json.loads(r.body)["error"]
