"""A hub with the monitor service: its URL, tokens of logged-in users, polling its API."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import requests

SERVICE = "/services/labvm-monitor/"
PORT = 21000


class Monitor:
    """The hub, its service's URL, and who is who."""

    def __init__(self, hub, procs_file: Path, metrics_token: str) -> None:
        self.hub = hub
        self.procs_file = procs_file
        self.metrics_token = metrics_token
        self.url = hub.url + SERVICE
        self.tokens: dict[str, str] = {}

    def token(self, user: str) -> str:
        if user not in self.tokens:
            self.tokens[user] = login_token(self.hub, user)
        return self.tokens[user]

    def get(self, path: str, user: str | None = "boss",
            headers: dict[str, str] | None = None) -> requests.Response:
        if user:
            headers = {"Authorization": f"token {self.token(user)}"}
        return requests.get(self.url + path, headers=headers or {}, timeout=30,
                            allow_redirects=False)

    def post(self, path: str, body: dict, user: str = "boss") -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=30,
                             headers={"Authorization": f"token {self.token(user)}"})

    def gpu_processes(self, by_index: dict[int, list[tuple[int, int]]]) -> None:
        self.procs_file.write_text(json.dumps({str(i): p for i, p in by_index.items()}))

    def wait(self, what, timeout: float = 30, path: str = "api/admin/state",
             user: str = "boss"):
        """Poll ``path`` until ``what(json)`` is truthy; returns the last JSON."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(path, user)
            data = r.json() if r.ok else None
            if data is not None and what(data):
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: condition not met in {timeout} s: "
                                     f"{r.status_code} {json.dumps(data)[:3000]}")
            time.sleep(0.5)


def login_token(hub, name: str) -> str:
    """A token the user gets by logging in (the test service may not mint one for an admin,
    nor for anyone allowed to access the monitor service, which it cannot access)."""
    s = requests.Session()
    s.get(f"{hub.url}/hub/login", timeout=30)
    r = s.post(f"{hub.url}/hub/login", timeout=30, data={
        "username": name, "password": hub.password, "_xsrf": s.cookies.get("_xsrf")})
    assert r.ok, r.text
    r = s.post(f"{hub.url}/hub/api/users/{name}/tokens", json={"expires_in": 3600},
               headers={"X-XSRFToken": s.cookies.get("_xsrf", path="/hub/")}, timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()["token"]


def start_monitor(hub_factory, tmp_path: Path, idle_s: float = 0, port: int = PORT,
                  env: dict[str, str] | None = None, upperfs: str | None = None) -> Monitor:
    procs = tmp_path / "gpu-processes.json"
    procs.write_text("{}")
    token = secrets.token_hex(16)
    hub = hub_factory(port=port, env={
        "LABVM_TEST_MONITOR": "1", "LABVM_TEST_MONITOR_PROCS": str(procs),
        "LABVM_TEST_METRICS_TOKEN": token, "LABVM_TEST_MONITOR_IDLE_S": str(idle_s),
        **(env or {}),
    }, upperfs=upperfs)
    mon = Monitor(hub, procs, token)
    deadline = time.monotonic() + 30
    while mon.get("metrics", None, headers={"Authorization": f"Bearer {token}"}).status_code \
            != 200:
        assert time.monotonic() < deadline, f"monitor service not up:\n{hub.log_tail()}"
        time.sleep(0.5)
    return mon


def root_of(state: dict, key: str) -> dict:
    for u in state["users"]:
        for r in u["roots"]:
            if r["key"] == key:
                return r
    raise KeyError(key)
