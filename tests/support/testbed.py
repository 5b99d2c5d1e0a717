"""A two-node LabVM test bed on this machine, for the multi-node tests and benchmark.

Each node is a network namespace with its own address, its own dockerd (started by
``scripts/testbed.sh`` with nsenter --net), its own local disk directory and its
own ``labvm-node`` agent. The layer store and the node registry live on a real
MooseFS (``scripts/moosefs.sh``); the hub runs in the root namespace. NVML is faked
at the pynvml boundary inside each agent: node a has GPUs 0-1 of the DGX fixture,
node b GPUs 2-3.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker

from labvm_spawner.storage.mounts import CACHED_MOUNT_OPTIONS

from .hubharness import Hub

REPO = Path(__file__).resolve().parents[2]
TESTBED_SH = REPO / "scripts" / "testbed.sh"
FIXTURES = REPO / "tests" / "fixtures"
NODE_STATE = Path("/var/lib/labvm-testbed")
NODE_RUN = Path("/run/labvm-testbed")
HUB_IP = "10.78.0.1"
NODE_IP = {"a": "10.78.0.11", "b": "10.78.0.12"}
AGENT_PORT = 8741
MFS_MASTER = "10.77.0.1"  # scripts/moosefs.sh
MFS_NET = "10.77.0.0/24"
MFS_PASSWORD = Path(os.environ.get("LABVM_MFS_DIR", "/var/lib/labvm/mfs-test")) / "mfs.password"
GPUS = {"a": [0, 1], "b": [2, 3]}

# The agent's NVML is faked; its GPU processes come from a file a test may write.
_SHIM = """
import sys
sys.path.insert(0, {tests!r})
from support import fake_nvml
fake_nvml.install_with_process_file({procs!r}, {fixture!r})
from labvm_spawner.cli.node import main
main(sys.argv[1:])
"""


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)


class Testbed:
    """Nodes a and b, their agents, and a store and registry on MooseFS."""

    def __init__(self, mfs_dir: Path, image: str, work: Path, down_after_s: float = 6,
                 hub_port: int = 22000) -> None:
        self.image = image
        self.work = work
        self.root = mfs_dir / f"testbed-{uuid.uuid4().hex[:8]}"
        self.store = self.root / "store"
        self.registry = self.root / "registry"
        self.key_file = work / "node.key"
        self.down_after_s = down_after_s
        self.agents: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.crash_at: dict[str, str] = {}
        self.hub_port = hub_port  # the hub's public port; its API is the next but one

    # ---- nodes -------------------------------------------------------------

    def sock(self, n: str) -> str:
        return f"unix://{NODE_RUN / n / 'docker.sock'}"

    def docker(self, n: str) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.sock(n), timeout=120)

    def state(self, n: str) -> Path:
        return NODE_STATE / n / "labvm"

    def up(self) -> None:
        from labvm_spawner.node import auth

        self.work.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True)
        self.registry.mkdir()
        r = _run("bash", str(TESTBED_SH), "up", "a", "b", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"testbed.sh up failed:\n{r.stdout}\n{r.stderr}")
        auth.make_key(self.key_file)
        key = auth.load_key(self.key_file)
        for n in NODE_IP:
            self.clean_node(n)  # what a killed earlier bed left
            self.mount_store(n)
            self.load_image(n)
            (self.work / f"{n}.token-hash").write_text(
                auth.token_hash(auth.node_token(key, n)) + "\n")
            devices = json.loads((FIXTURES / "nvml_dgx_a100.json").read_text())
            devices["devices"] = [devices["devices"][i] for i in GPUS[n]]
            (self.work / f"{n}-nvml.json").write_text(json.dumps(devices))
            # Each node's uppers on their own btrfs with quotas, as setup.sh makes them.
            r = _run(str(REPO / "scripts" / "upperfs.sh"), "up", str(self.state(n)), "2G")
            if r.returncode != 0:
                raise RuntimeError(f"upperfs.sh up failed for node {n}:\n{r.stderr}")
            self.start_agent(n)
        for n in NODE_IP:
            self.wait_up(n)

    def node_path(self, n: str, path: Path, cached: bool = False) -> Path:
        """Where node n sees ``path`` of the shared MooseFS (through its own mount, or
        its cached read-only one)."""
        return self.node_mnt(n, cached) / path.relative_to(_mount_point(self.root))

    def node_mnt(self, n: str, cached: bool = False) -> Path:
        return NODE_STATE / n / ("mfs-cached" if cached else "mfs")

    def mount_store(self, n: str) -> None:
        """Each node mounts MooseFS itself, from its own namespace: the MooseFS tools
        (mfsmakesnapshot) reach the master through their mount's local proxy. A second,
        read-only mount with long caches is what its roots read layers through."""
        for cached, opts in ((False, "nosuid,nodev,mfsattrcacheto=0,mfsentrycacheto=0,"
                              "mfsdirentrycacheto=0"), (True, CACHED_MOUNT_OPTIONS)):
            mnt = self.node_mnt(n, cached)
            mnt.mkdir(parents=True, exist_ok=True)
            if os.path.ismount(mnt):
                continue
            with open(MFS_PASSWORD) as password:  # -p: from stdin, never in a command line
                r = _run("nsenter", f"--net=/var/run/netns/labvm-{n}", "mfsmount", str(mnt),
                         "-H", MFS_MASTER, "-p", "-o", opts, stdin=password, timeout=60)
            if r.returncode != 0 or not os.path.ismount(mnt):
                raise RuntimeError(f"node {n} could not mount MooseFS at {mnt}: {r.stderr}")

    def load_image(self, n: str) -> None:
        """Copy the user image into the node's engine (no registry here): save | load."""
        host = docker.from_env()
        want = host.images.get(self.image).id
        node = self.docker(n)
        try:
            if node.images.get(self.image).id == want:
                return
        except docker.errors.ImageNotFound:
            pass
        save = subprocess.Popen(["docker", "save", self.image], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "-H", self.sock(n), "load"], stdin=save.stdout,
                              capture_output=True, text=True)
        save.wait()
        if save.returncode or load.returncode:
            raise RuntimeError(f"loading {self.image} into node {n} failed: {load.stderr}")

    def agent_log(self, n: str) -> Path:
        return self.work / f"agent-{n}.log"

    def start_agent(self, n: str, crash_at: str = "") -> None:
        env = dict(os.environ, LABVM_NODE_DOWN_AFTER_S=str(self.down_after_s))
        env.pop("LABVM_CRASH_AT", None)
        if crash_at:
            env["LABVM_CRASH_AT"] = crash_at
        shim = _SHIM.format(tests=str(REPO / "tests"), fixture=str(self.work / f"{n}-nvml.json"),
                            procs=str(self.gpu_processes_file(n)))
        args = [
            "--name", n, "--listen", f"{NODE_IP[n]}:{AGENT_PORT}",
            "--url", f"https://{NODE_IP[n]}:{AGENT_PORT}",
            "--token-hash-file", str(self.work / f"{n}.token-hash"),
            "--registry-dir", str(self.node_path(n, self.registry)), "--heartbeat", "1",
            "--docker-url", self.sock(n), "--state-dir", str(self.state(n)),
            "--store-root", str(self.node_path(n, self.store)), "--publish-ip", NODE_IP[n],
            "--cached-store-root", str(self.node_path(n, self.store, cached=True)),
            "--secrets-root", str(NODE_RUN / n / "secrets"), "--sync-interval", "2",
            "--housekeeping-interval", "0.01",  # a round every 36 s: the tests see one
            "--hub-api", f"{HUB_IP}:{self.hub_port + 2}", "--cluster-net", MFS_NET,
        ]
        log = open(self.agent_log(n), "a")
        self.started[n] = time.time()
        self.agents[n] = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/labvm-{n}", sys.executable, "-c", shim, *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def gpu_processes_file(self, n: str) -> Path:
        return self.work / f"{n}-gpu-processes.json"

    def records(self) -> dict[str, dict]:
        from labvm_spawner.node import registry

        return registry.read_records(self.registry, self.down_after_s)

    def wait_up(self, n: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.records().get(n)
            # A heartbeat of the agent started last (it listens before its first one).
            if rec and rec["up"] and rec["t"] > self.started.get(n, 0):
                return
            proc = self.agents.get(n)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"agent {n} exited:\n{self.agent_log(n).read_text()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"agent {n} did not register:\n{self.agent_log(n).read_text()[-3000:]}")

    def wait_down(self, n: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.records().get(n)
            if rec and not rec["up"]:
                return
            time.sleep(0.3)
        raise RuntimeError(f"node {n} still counts as up")

    def kill_agent(self, n: str, sig: int = signal.SIGKILL) -> None:
        proc = self.agents.pop(n, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def agent_died(self, n: str, timeout: float = 60) -> bool:
        proc = self.agents.get(n)
        if proc is None:
            return True
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self.agents.pop(n, None)
        return True

    def kill_dockerd(self, n: str) -> None:
        """Node n's engine dies and its containers with it, as in a crash or a power cut.

        (With live-restore, a dockerd dying alone would leave them running.)"""
        try:
            ids = [c.id for c in self.docker(n).containers.list(all=True)]
        except docker.errors.DockerException:
            ids = []
        pid = int((NODE_RUN / n / "dockerd.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        # The containers' processes, then the shims that held them.
        cgroups = tuple(f"/docker/{i}" for i in ids)
        for _ in range(50):
            victims = [p for p in _pids() if _in_cgroups(p, cgroups)
                       or f"-address {NODE_RUN / n}/exec/" in _cmdline(p)]
            if not victims:
                return
            for p in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.1)
        raise RuntimeError(f"processes of node {n}'s containers outlived SIGKILL")

    def restart_dockerd(self, n: str) -> None:
        """Stop node n's dockerd as a package upgrade does (SIGTERM), and start it again."""
        pid = int((NODE_RUN / n / "dockerd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 60):
            raise RuntimeError(f"dockerd of node {n} did not stop")
        self.start_dockerd(n)

    def start_dockerd(self, n: str) -> None:
        r = _run("bash", str(TESTBED_SH), "up", n, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"restarting dockerd of {n} failed:\n{r.stderr}")

    def power_cut(self, n: str) -> None:
        """What a reboot leaves of node n: no agent, no engine, no container, no mount of
        a root or of the secrets tmpfs. Its local disk (the uppers) stays."""
        from labvm_spawner.node.overlay import mount_points

        self.kill_agent(n)
        self.kill_dockerd(n)
        for mp in sorted(mount_points(), key=len, reverse=True):
            if (mp.startswith(f"{self.state(n)}/mnt/") or mp.startswith(f"{NODE_RUN / n}/secrets")
                    or mp.startswith(f"{NODE_STATE / n}/docker/")):
                _run("umount", "-l", mp)

    def node_of(self, key: str) -> str | None:
        """The node whose engine runs this root's container (asserting there is one at most)."""
        found = []
        for n in NODE_IP:
            running = self.docker(n).containers.list(filters={"label": f"labvm.key={key}"})
            found += [n] * len(running)
        assert len(found) <= 1, found
        return found[0] if found else None

    def wait_synced(self, key: str, after: float, timeout: float = 30) -> None:
        path = self.store / key / "synced.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if json.loads(path.read_text())["t"] > after:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"{key} not synced since {after}")

    def hub(self, base: Path, port: int, env: dict[str, str] | None = None) -> Hub:
        """A hub (not started) with no node of its own, using nodes a and b once they
        enrolled (``enroll``). Its public URL is on the test bed's bridge, where the
        nodes reach it too."""
        state = base / "state"
        state.mkdir(parents=True)
        (base / "monitor-procs.json").write_text("{}")
        hub = Hub(base / "hub", state, Path("/dev"), port=port, env={
            "LABVM_TEST_NODE": "hub",
            "LABVM_TEST_ROOTFS": str(base / "rootfs"),
            "LABVM_TEST_IMAGE": self.image,
            "LABVM_TEST_TESTBED": "1",
            "LABVM_TEST_REGISTRY": str(self.registry),
            "LABVM_TEST_STORE": str(self.store),
            "LABVM_TEST_NODE_KEY": str(self.key_file),
            "LABVM_TEST_HUB_IP": HUB_IP,
            "LABVM_NODE_DOWN_AFTER_S": str(self.down_after_s),
            "LABVM_TEST_MONITOR": "1",
            "LABVM_TEST_MONITOR_PROCS": str(base / "monitor-procs.json"),
            "LABVM_TEST_METRICS_TOKEN": uuid.uuid4().hex,
            **(env or {}),
        })
        hub.url = f"http://{HUB_IP}:{port}"
        return hub

    def enroll(self, hub: Hub, nodes: tuple[str, ...] = tuple(NODE_IP)) -> None:
        """Enroll nodes with the running hub as an admin would: a join token made on the
        hub (``labvm node join-token``), presented by ``labvm-node join`` on the node."""
        db = f"sqlite:///{hub.env['LABVM_TEST_STATE']}/labvm.sqlite"
        for n in nodes:
            r = _run(sys.executable, "-m", "labvm_spawner.cli", "node", "join-token", n,
                     "--db-url", db, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"join-token for {n} failed: {r.stderr}")
            token_file = self.work / f"{n}.join-token"
            token_file.write_text(r.stdout.strip() + "\n")
            token_file.chmod(0o600)
            r = _run("nsenter", f"--net=/var/run/netns/labvm-{n}", sys.executable, "-m",
                     "labvm_spawner.cli.node", "join", "--name", n,
                     "--url", f"https://{NODE_IP[n]}:{AGENT_PORT}", "--hub-url", hub.url,
                     "--token-file", str(token_file),
                     "--token-hash-file", str(self.work / f"{n}.token-hash"),
                     "--state-dir", str(self.state(n)), timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"node {n} could not join:\n{r.stdout}\n{r.stderr}\n"
                                   f"{hub.log_tail()}")

    # ---- teardown ------------------------------------------------------------

    def clean_node(self, n: str) -> None:
        """Remove every LabVM container, mount and local directory of node n."""
        try:
            client = self.docker(n)
            for c in client.containers.list(all=True, filters={"label": "labvm.key"}):
                c.remove(force=True)
        except docker.errors.DockerException:
            pass
        from labvm_spawner.node.overlay import mount_points

        state = self.state(n)
        for mp in sorted(mount_points(), key=len, reverse=True):
            if mp.startswith(f"{state}/mnt/") or mp.startswith(f"{NODE_RUN / n}/secrets"):
                _run("umount", "-l", mp)
        for cached in (True, False):
            if os.path.ismount(self.node_mnt(n, cached)):
                _run("umount", "-l", str(self.node_mnt(n, cached)))
        if os.path.ismount(state / "uppers"):  # its btrfs goes too: the next bed starts empty
            _run("umount", "-l", str(state / "uppers"))
        for sub in ("uppers", "uppers.img", "mnt", "labvm.sqlite", "tls", "leases",
                    "interrupted.json"):
            p = state / sub
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def down(self) -> None:
        for n in list(self.agents):
            self.kill_agent(n, signal.SIGTERM)
        for n in NODE_IP:
            self.clean_node(n)  # the unpacked image layers stay: a cache by image id
        _run("bash", str(TESTBED_SH), "down", timeout=300)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_testbed(mfs_dir: Path, image: str, name: str, hub_port: int) -> Iterator[Testbed]:
    """A test bed that is up for the ``with`` block, and gone after it."""
    from .components import TEST_ROOT

    tb = Testbed(mfs_dir, image, TEST_ROOT / f"{name}-{int(time.time())}", hub_port=hub_port)
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


@contextlib.contextmanager
def enrolled_hub(tb: Testbed, port: int, env: dict[str, str] | None = None) -> Iterator[Hub]:
    """The test bed's hub, started with nodes a and b enrolled; every server it started is
    stopped after the ``with`` block."""
    h = tb.hub(tb.work / "hubbase", port, env=env)
    h.start()
    try:
        tb.enroll(h)
        yield h
    finally:
        for user in h.api("GET", "/users").json():
            for name in list(user.get("servers", {})):
                h.api("DELETE", h.server_path(user["name"], name))
        time.sleep(3)
        h.stop()


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _in_cgroups(pid: int, cgroups: tuple[str, ...]) -> bool:
    if not cgroups:
        return False
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    return any(line.endswith(cgroups) for line in lines)


def _mount_point(path: Path) -> Path:
    p = path
    while not os.path.ismount(p):
        p = p.parent
    return p
