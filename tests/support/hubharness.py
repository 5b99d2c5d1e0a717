"""A real JupyterHub (with configurable-http-proxy) for end-to-end tests, driven by its REST API."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
JUPYTERHUB = Path(sys.executable).parent / "jupyterhub"


class HubError(AssertionError):
    pass


class Hub:
    """One hub process; ``restart`` keeps its database, like an admin restarting it."""

    def __init__(self, hub_dir: Path, state_dir: Path, dev_dir: Path, port: int = 18000,
                 env: dict[str, str] | None = None,
                 config: Path = REPO / "tests" / "hub_config.py") -> None:
        self.hub_dir = hub_dir
        self.config = config
        self.poll_interval = 0.5
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.token = secrets.token_hex(24)
        self.password = secrets.token_hex(12)
        self.env = {
            **os.environ,
            "LABVM_TEST_PORT": str(port),
            "LABVM_TEST_HUB_DIR": str(hub_dir),
            "LABVM_TEST_STATE": str(state_dir),
            "LABVM_TEST_DEV": str(dev_dir),
            "LABVM_TEST_API_TOKEN": self.token,
            "LABVM_TEST_PASSWORD": self.password,
            "LABVM_STATE_DIR": str(state_dir),
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.jupyterhub = JUPYTERHUB  # another install's, for the wheel test
        self.log_path = hub_dir / "hub.log"

    # ---- process -----------------------------------------------------------

    def start(self) -> None:
        self.hub_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [str(self.jupyterhub), "-f", str(self.config)],
            cwd=self.hub_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HubError(f"hub exited at start:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/hub/api/", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise HubError(f"hub did not answer in 60 s:\n{self.log_tail()}")

    def stop(self, kill: bool = False) -> None:
        """Stop the hub (and its proxy). Containers stay: cleanup_servers is off."""
        if not self.proc:
            return
        sig = signal.SIGKILL if kill else signal.SIGTERM
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        # A killed hub leaves its proxy behind; it is ours to end.
        pid_file = self.hub_dir / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
            pid_file.unlink(missing_ok=True)

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return ""

    # ---- REST API ----------------------------------------------------------

    def api(self, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
        headers = {"Authorization": f"token {token or self.token}"}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers,
                                timeout=60, **kw)

    def create_user(self, name: str, groups: list[str] | None = None) -> requests.Response:
        r = self.api("POST", f"/users/{name}")
        for g in groups or []:
            self.api("POST", f"/groups/{g}")  # 409 when it exists already
            added = self.api("POST", f"/groups/{g}/users", json={"users": [name]})
            assert added.ok, added.text
        return r

    def user_token(self, name: str) -> str:
        r = self.api("POST", f"/users/{name}/tokens", json={"note": "test", "expires_in": 3600})
        assert r.status_code in (200, 201), r.text
        return r.json()["token"]

    def server_path(self, name: str, server: str = "") -> str:
        return f"/users/{name}/servers/{server}" if server else f"/users/{name}/server"

    def spawn(self, name: str, options: dict | None = None, server: str = "",
              timeout: float = 180) -> dict:
        """Start a server and wait until the hub says it is ready; returns the user model.

        A refused or failed start raises HubError with the hub's message.
        """
        r = self.api("POST", self.server_path(name, server), json=options or {})
        if r.status_code not in (201, 202):
            raise HubError(f"{r.status_code}: {_message(r)}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{name}").json()
            srv = model.get("servers", {}).get(server)
            if srv and srv.get("ready"):
                return model
            if not srv or (not srv.get("pending") and not srv.get("ready")):
                raise HubError(f"start failed: {self.spawn_failure(name, server)}")
            time.sleep(self.poll_interval)
        raise HubError(f"server of {name} not ready in {timeout} s:\n{self.log_tail()}")

    def spawn_followed(self, name: str, server: str = "", timeout: float = 300) -> None:
        """Start a server and follow its progress stream until the hub says it is ready,
        as the spawn page in a browser does: one open request, no polling.

        A refused or failed start raises HubError with the hub's message.
        """
        r = self.api("POST", self.server_path(name, server), json={})
        if r.status_code not in (201, 202):
            raise HubError(f"{r.status_code}: {_message(r)}")
        path = self.server_path(name, server) + "/progress"
        with requests.get(f"{self.url}/hub/api{path}", stream=True, timeout=timeout,
                          headers={"Authorization": f"token {self.token}"}) as stream:
            for line in stream.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("ready"):
                    return
                if event.get("failed"):
                    raise HubError(f"start failed: {event.get('message', '')}")
        raise HubError(f"the progress stream of {name} ended before the server was ready:\n"
                       f"{self.log_tail()}")

    def spawn_failure(self, name: str, server: str = "") -> str:
        """The hub's message for a failed spawn, as the user's progress stream shows it."""
        path = f"/users/{name}/servers/{server}/progress" if server else \
            f"/users/{name}/server/progress"
        try:
            r = self.api("GET", path, stream=True)
            text = r.text
        except requests.RequestException as e:
            text = str(e)
        return text + "\n--- hub log ---\n" + self.log_tail(30)

    def unspawn(self, name: str, server: str = "", timeout: float = 60) -> None:
        r = self.api("DELETE", self.server_path(name, server))
        assert r.status_code in (202, 204), r.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{name}").json()
            if server not in model.get("servers", {}):
                return
            time.sleep(self.poll_interval)
        raise HubError(f"server of {name} did not stop in {timeout} s")

    def login(self, name: str) -> requests.Session:
        """A browser-like session logged in as ``name`` (DummyAuthenticator's password)."""
        s = requests.Session()
        s.get(f"{self.url}/hub/login", timeout=30)
        r = s.post(f"{self.url}/hub/login", timeout=60, allow_redirects=True, data={
            "username": name, "password": self.password, "_xsrf": s.cookies.get("_xsrf", ""),
        })
        assert r.ok and "/hub/login" not in r.url, (r.status_code, r.url)
        return s

    def server_get(self, name: str, path: str, token: str | None = None,
                   server: str = "") -> requests.Response:
        """A request to the user's own Jupyter server, through the proxy."""
        prefix = f"/user/{name}/{server}/" if server else f"/user/{name}/"
        return requests.get(f"{self.url}{prefix}{path.lstrip('/')}",
                            headers={"Authorization": f"token {token or self.token}"},
                            timeout=30)

    def server_put(self, name: str, path: str, json: dict, token: str | None = None
                   ) -> requests.Response:
        return requests.put(f"{self.url}/user/{name}/{path.lstrip('/')}", json=json,
                            headers={"Authorization": f"token {token or self.token}"},
                            timeout=30)


def node_hub(base: Path, node: str, image: str, rootfs: Path, port: int,
             config: Path = REPO / "tests" / "hub_config.py",
             env: dict[str, str] | None = None) -> Hub:
    """A hub (not started) for a fresh node whose state lives under ``base``.

    ``node`` names the node in LabVM's records and containers; ``image`` is the exact
    image tag to run, and ``rootfs`` where its unpacked layer is shared between nodes.
    """
    state = base / "state"
    state.mkdir(parents=True)
    return Hub(base / "hub", state, Path("/dev"), port=port, config=config, env={
        "LABVM_TEST_NODE": node,
        "LABVM_TEST_ROOTFS": str(rootfs),
        "LABVM_TEST_IMAGE": image,
        **(env or {}),
    })


def _message(r: requests.Response) -> str:
    try:
        return r.json().get("message", r.text)
    except ValueError:
        return r.text
