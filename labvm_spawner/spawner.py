"""LabVMSpawner: one persistent root container per user (or named server), with its own GPUs.

The control flow lives here; the container's shape is built by
``containerspec``, the root's layers by ``overlay`` and ``storage``, and GPU
bookkeeping by ``allocations``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import docker
import docker.errors
from jupyterhub.spawner import Spawner
from tornado import web
from traitlets import (
    Bool,
    CaselessStrEnum,
    Dict,
    Float,
    Int,
    List,
    TraitError,
    Unicode,
    default,
    validate,
)

from . import containerspec, form, nvml, overlay
from .allocations import GpuAllocator
from .errors import LabVMError
from .images import prepare_rootfs
from .names import root_key
from .network import ensure_network
from .policy import resolve_policy, validate_config
from .storage import open_store
from .userns import remap_base, require_userns

# One Docker client and one allocator per process, shared by all spawners.
_clients: dict[str, docker.DockerClient] = {}
_networks: dict[tuple[str, str], str] = {}
_allocators: dict[tuple[str, str, bool], GpuAllocator] = {}


class LabVMSpawner(Spawner):
    """Spawn each user's server in a Docker container whose root is a persistent overlay."""

    image = Unicode(
        "labvm/user:latest",
        help="Docker image whose root filesystem is the bottom, shared layer of every root.",
    ).tag(config=True)

    docker_url = Unicode(
        "",
        help="Docker engine URL (e.g. unix:///var/run/docker.sock); empty uses DOCKER_HOST "
        "or the default socket. The socket is never passed into a container.",
    ).tag(config=True)

    state_dir = Unicode(
        "/var/lib/labvm",
        help="Node-local directory for uppers, mount points and the unpacked image layer. "
        "It must be on a local filesystem that supports overlayfs upper directories.",
    ).tag(config=True)

    store_root = Unicode(
        "",
        help="Root of the layer store (a local directory, or a MooseFS mount for several "
        "nodes). Empty means <state_dir>/store.",
    ).tag(config=True)

    image_layer_dir = Unicode(
        "",
        help="Where image root filesystems are unpacked as shared overlay layers. Empty "
        "means <state_dir>/rootfs.",
    ).tag(config=True)

    db_url = Unicode(
        "",
        help="SQLAlchemy URL of LabVM's database (GPU allocations). Empty means "
        "sqlite:///<state_dir>/labvm.sqlite.",
    ).tag(config=True)

    node_name = Unicode(
        "local",
        help="Name of this node in LabVM's records and container names (lower-case letters, "
        "digits, '-', '_' and '.').",
    ).tag(config=True)

    @validate("node_name")
    def _valid_node_name(self, proposal):
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", proposal["value"]):
            raise TraitError(f"node_name {proposal['value']!r} is not a valid LabVM node name")
        return proposal["value"]

    network_name = Unicode(
        "labvm",
        help="Docker bridge network for user containers (created if missing, with "
        "inter-container traffic off).",
    ).tag(config=True)

    dev_root = Unicode(
        "/dev",
        help="Directory holding the host's /dev/nvidiaN and control device nodes.",
    ).tag(config=True)

    nvidia_runtime = CaselessStrEnum(
        ["auto", "on", "off"],
        "auto",
        help="Pass GPUs to Docker as a DeviceRequest by UUID: 'auto' does so when the "
        "engine has the NVIDIA runtime. Device nodes are passed either way.",
    ).tag(config=True)

    gpu_sharing = Bool(
        False,
        help="Allow several users on one GPU. Off: every GPU is held by one server at most.",
    ).tag(config=True)

    policy = Dict(
        {"cpus": 2, "mem": "4G", "pids": 2048, "max_gpus": 1},
        help="Default policy for every user. Keys: cpus, mem, pids, blkio_weight, "
        "io_read_bps, io_write_bps (on the disk of the uppers), max_gpus, gpu_models.",
    ).tag(config=True)

    group_policy = Dict(
        help="Policy overrides per JupyterHub group name; a user in several groups gets "
        "the most generous value of each key.",
    ).tag(config=True)

    admin_policy = Dict(help="Policy overrides for JupyterHub admins.").tag(config=True)

    user_policy = Dict(help="Policy overrides per username, applied last.").tag(config=True)

    userns_remap_user = Unicode(
        "dockremap",
        help="The user whose /etc/subuid range dockerd's userns-remap uses; its first id "
        "is the host uid of every container's root.",
    ).tag(config=True)

    container_uid = Int(1000, help="uid of the user's own account inside the container.").tag(
        config=True
    )

    stop_timeout = Float(
        10, help="Seconds a container gets to stop before it is killed."
    ).tag(config=True)

    capabilities = List(
        list(containerspec.CAPABILITIES),
        help="Linux capabilities of the container's root (all others are dropped).",
    ).tag(config=True)

    secrets_root = Unicode(
        "/run/labvm/secrets",
        help="tmpfs where each server's tokens are handed to its container, so that no "
        "token is written to disk in the container's stored configuration.",
    ).tag(config=True)

    @default("options_form")
    def _options_form_default(self):
        return self._render_options_form

    @default("apply_user_options")
    def _apply_user_options_default(self):
        return _check_user_options

    @default("cmd")
    def _cmd_default(self):
        return ["jupyterhub-singleuser"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # A mistyped policy should stop the hub with a clear message, not one user's start.
        validate_config(self.policy, self.group_policy, self.admin_policy, self.user_policy)
        self.container_id = ""
        self.root_key = ""
        self._events: list[dict] = []
        self._starting = False

    # ---- helpers -----------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        url = self.docker_url
        if url not in _clients:
            _clients[url] = docker.DockerClient(base_url=url) if url else docker.from_env()
        return _clients[url]

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def allocator(self) -> GpuAllocator:
        url = self.db_url or f"sqlite:///{self.state_path / 'labvm.sqlite'}"
        cache_key = (url, self.node_name, self.gpu_sharing)
        if cache_key not in _allocators:
            self.state_path.mkdir(parents=True, exist_ok=True)
            alloc = GpuAllocator(url, node=self.node_name, sharing=self.gpu_sharing)
            # First use in this process (the hub has just started): free what no running
            # container holds, so a crash mid-allocation leaks nothing.
            released = alloc.reconcile(self._live_keys())
            for owner, uuids in released.items():
                self.log.warning("Released %d GPU(s) of %s: no running container", len(uuids),
                                 owner)
            _allocators[cache_key] = alloc
        return _allocators[cache_key]

    def _live_keys(self) -> set[str]:
        running = self.client.containers.list(
            filters={"label": ["labvm.key", f"labvm.node={self.node_name}"]}
        )
        return {c.labels["labvm.key"] for c in running}

    @property
    def container_name(self) -> str:
        # The node is part of the name: engines may be shared (tests, a node's agents).
        return f"labvm-{self.node_name}-{self.root_key or root_key(self.user.name, self.name)}"

    def _resolve_policy(self):
        groups = [g.name for g in getattr(self.user, "groups", [])]
        return resolve_policy(
            self.user.name, groups, bool(getattr(self.user, "admin", False)), self.policy,
            self.group_policy, self.admin_policy, self.user_policy,
        )

    def _gpu_counts(self, sharing: bool) -> tuple[dict[str, int], dict[str, int]]:
        """Free and total GPUs per model on this node, as this server would see them."""
        inventory = nvml.read_inventory()
        own = self.root_key or root_key(self.user.name, self.name)
        busy = {
            r.uuid for r in self.allocator.records()
            if r.owner != own and (r.exclusive or not sharing)
        }
        free: dict[str, int] = {}
        total: dict[str, int] = {}
        for g in inventory:
            total[g.name] = total.get(g.name, 0) + 1
            if g.uuid not in busy:
                free[g.name] = free.get(g.name, 0) + 1
        return free, total

    def _render_options_form(self, spawner=None) -> str:
        limits, gpu_policy = self._resolve_policy()
        free, total = self._gpu_counts(self._sharing(gpu_policy))
        return form.render_form(limits, gpu_policy, free, total)

    def options_from_form(self, formdata):
        return form.parse_form(formdata)

    def _sharing(self, gpu_policy) -> bool:
        return self.gpu_sharing or gpu_policy.sharing

    def _checked_request(self, inventory: list[nvml.Gpu]):
        """Key, limits and GPU request of this start; refusals raise LabVMError."""
        key = root_key(self.user.name, self.name)
        limits, gpu_policy = self._resolve_policy()
        count, model = form.validate_options(
            dict(self.user_options or {}), gpu_policy, sorted({g.name for g in inventory})
        )
        return key, limits, count, model, self._sharing(gpu_policy)

    def _emit(self, progress: int, message: str) -> None:
        self._events.append({"progress": progress, "message": message})
        self.log.info("%s: %s", self._log_name, message)

    # ---- state -------------------------------------------------------------

    def get_state(self):
        state = super().get_state()
        if self.container_id:
            state["container_id"] = self.container_id
        if self.root_key:
            state["root_key"] = self.root_key
        return state

    def load_state(self, state):
        super().load_state(state)
        self.container_id = state.get("container_id", "")
        self.root_key = state.get("root_key", "")

    def clear_state(self):
        super().clear_state()
        self.container_id = ""

    # ---- lifecycle ---------------------------------------------------------

    async def progress(self):
        seen = 0
        while True:
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if not self._starting:
                return
            await asyncio.sleep(0.2)

    async def start(self):
        self._events = []
        self._starting = True
        try:
            return await self._start()
        finally:
            self._starting = False

    async def _start(self):
        # Everything that can be refused is checked before anything is created.
        inventory = await asyncio.to_thread(nvml.read_inventory)
        key, limits, count, model, sharing = self._checked_request(inventory)
        self.root_key = key
        engine = await asyncio.to_thread(require_userns, self.client)
        shift = remap_base(self.userns_remap_user)
        paths = overlay.RootPaths.for_key(self.state_path, key)

        undo: list = []
        try:
            self._emit(10, f"Allocating GPUs ({count} requested)")
            gpus = await asyncio.to_thread(
                self.allocator.allocate, key, inventory, count, model, sharing
            )
            undo.append(lambda: self.allocator.release(key))
            if gpus:
                self._emit(20, "Allocated GPU(s) " + ", ".join(str(g.index) for g in gpus))

            self._emit(30, "Preparing the image layer")
            image_layer = await asyncio.to_thread(
                prepare_rootfs, self.client, self.image,
                Path(self.image_layer_dir or self.state_path / "rootfs"), shift
            )
            store = open_store(self.store_root or self.state_path / "store")
            user_layer = await asyncio.to_thread(store.current_path, key)

            self._emit(50, "Mounting root filesystem")
            await asyncio.to_thread(self._remove_container, self.container_name)
            await asyncio.to_thread(overlay.mount_root, paths, [user_layer, image_layer], shift)
            undo.append(lambda: overlay.unmount_root(paths))

            # One environment, split: tokens go to the tmpfs file, the rest to Docker.
            self.ip = "0.0.0.0"
            self.port = containerspec.SERVER_PORT
            env = self.get_env()
            secrets = {k: env.pop(k) for k in list(env) if _is_secret(k)}
            secrets_dir = await asyncio.to_thread(self._write_secrets, key, shift, secrets)
            undo.append(lambda: shutil.rmtree(secrets_dir, ignore_errors=True))

            self._emit(70, "Starting container")
            spec = await asyncio.to_thread(
                self._server_spec, key, paths, limits, gpus, secrets_dir, env, engine
            )
            container = await asyncio.to_thread(self._create_and_start, spec)
            undo.append(lambda: self._remove_container(container.id))
            self.container_id = container.id
            ip = await self._container_ip(container)
            self._emit(80, "Container running; waiting for Jupyter")
            await self._wait_for_server(container, ip, containerspec.SERVER_PORT)
            self._emit(90, "Jupyter is listening")
            return (ip, containerspec.SERVER_PORT)
        except BaseException:
            for step in reversed(undo):
                try:
                    await asyncio.to_thread(step)
                except Exception:
                    self.log.exception("cleanup after a failed start of %s", key)
            self.container_id = ""
            raise

    def _server_spec(self, key, paths, limits, gpus, secrets_dir, env: dict[str, str],
                     engine: dict) -> containerspec.ServerSpec:
        if (self.docker_url, self.network_name) not in _networks:
            _networks[(self.docker_url, self.network_name)] = ensure_network(
                self.client, self.network_name
            )
        return containerspec.ServerSpec(
            name=self.container_name,
            image=self.image,
            key=key,
            username=self.user.name,
            merged=paths.merged,
            top_dirs=overlay.top_level_dirs(paths.merged, containerspec.EPHEMERAL),
            cmd=self.cmd + self.get_args(),
            env=env,
            limits=limits,
            gpus=gpus,
            device_paths=nvml.device_paths(gpus, self.dev_root) if gpus else [],
            nvidia_runtime=self._use_nvidia_runtime(engine),
            network=self.network_name,
            secrets_dir=secrets_dir,
            io_device=_block_device(paths.upper),
            uid=self.container_uid,
            capabilities=tuple(self.capabilities),
            init_path=shutil.which("docker-init") or shutil.which("tini"),
            labels={"labvm.node": self.node_name, "labvm.server": self.name or ""},
        )

    def _use_nvidia_runtime(self, engine: dict) -> bool:
        if self.nvidia_runtime != "auto":
            return self.nvidia_runtime == "on"
        return "nvidia" in (engine.get("Runtimes") or {})

    def _write_secrets(self, key: str, owner: int, secrets: dict[str, str]) -> Path:
        root = Path(self.secrets_root)
        _ensure_tmpfs(root)
        d = root / key
        d.mkdir(mode=0o500, exist_ok=True)
        env_file = d / "env"
        body = "".join(f"{k}={_shell_quote(v)}\n" for k, v in secrets.items())
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.chown(env_file, owner, owner)
        os.chown(d, owner, owner)
        return d

    def _create_and_start(self, spec: containerspec.ServerSpec):
        container = self.client.containers.create(**containerspec.build(spec))
        try:
            container.start()
        except BaseException:
            container.remove(force=True)
            raise
        return container

    async def _container_ip(self, container) -> str:
        for _ in range(50):
            await asyncio.to_thread(container.reload)
            if container.status == "exited":
                logs = container.logs(tail=20).decode(errors="replace")
                raise LabVMError(f"the container exited at start:\n{logs}")
            nets = container.attrs["NetworkSettings"]["Networks"]
            ip = (nets.get(self.network_name) or {}).get("IPAddress")
            if ip:
                return ip
            await asyncio.sleep(0.1)
        raise LabVMError("the container got no network address")

    async def _wait_for_server(self, container, ip: str, port: int) -> None:
        """Return once the server accepts connections; raise if its container dies first.

        The hub probes a new server with a growing back-off, so a server that comes up
        between two probes waits for the next one; returning only when the port is open
        lets the hub's first probe succeed. A server that cannot start fails here, with
        its log, instead of after the hub's http_timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.http_timeout, 120)
        checked = loop.time()
        while loop.time() < deadline:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 1)
            except (TimeoutError, OSError):
                pass
            else:
                writer.close()
                return
            if loop.time() - checked > 0.5:
                checked = loop.time()
                await asyncio.to_thread(container.reload)
                if container.status != "running":
                    logs = container.logs(tail=30).decode(errors="replace")
                    raise LabVMError(f"the server's container stopped while starting:\n{logs}")
            await asyncio.sleep(0.05)
        # Not our call to give up: the hub's own http_timeout decides.
        self.log.warning("%s: port %s not open yet; leaving it to the hub", self._log_name, port)

    def _remove_container(self, name_or_id: str) -> None:
        try:
            c = self.client.containers.get(name_or_id)
        except docker.errors.NotFound:
            return
        try:
            c.stop(timeout=int(self.stop_timeout))
        except docker.errors.APIError:
            pass
        c.remove(force=True)

    async def poll(self):
        if self._starting:
            return None
        # The hub polls every server it believes running as it starts: the first poll
        # reconciles GPU allocations with the containers that really run.
        await asyncio.to_thread(lambda: self.allocator)
        status = 0
        if self.container_id:
            try:
                c = await asyncio.to_thread(self.client.containers.get, self.container_id)
            except docker.errors.NotFound:
                c = None
            if c is not None and c.status in ("running", "created", "restarting"):
                return None
            if c is not None:
                status = int(c.attrs.get("State", {}).get("ExitCode", 0)) or 0
        # The hub calls stop() only for servers that poll as running, so a server that
        # died on its own is cleaned up here: no container, mount or GPU left held. That
        # includes a start cut short by a hub crash, before its state was saved.
        await self._release_all(self.root_key or root_key(self.user.name, self.name))
        return status

    async def stop(self, now=False):
        await self._release_all(self.root_key or root_key(self.user.name, self.name))

    async def _release_all(self, key: str) -> None:
        paths = overlay.RootPaths.for_key(self.state_path, key)
        await asyncio.to_thread(self._remove_container, self.container_id or self.container_name)
        self.container_id = ""
        await asyncio.to_thread(overlay.unmount_root, paths)
        shutil.rmtree(Path(self.secrets_root) / key, ignore_errors=True)
        released = await asyncio.to_thread(self.allocator.release, key)
        if released:
            self.log.info("Released GPU(s) %s of %s", ", ".join(released), key)


async def _check_user_options(spawner: LabVMSpawner, user_options: dict) -> None:
    """The hub's apply_user_options hook: refuse bad names and options with a 400."""
    inventory = await asyncio.to_thread(nvml.read_inventory)
    try:
        spawner._checked_request(inventory)
    except LabVMError as e:
        raise web.HTTPError(400, str(e)) from e


def _is_secret(name: str) -> bool:
    return any(w in name for w in ("TOKEN", "SECRET", "PASSWORD"))


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _ensure_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not overlay.is_mounted(path):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0711", "labvm-secrets",
                        str(path)], check=True)


def _block_device(path: Path) -> str | None:
    """The block device node holding ``path``, for Docker's per-device IO limits.

    Throttling applies to whole disks, so a partition resolves to its disk.
    """
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sys_dev.exists():
        return None  # not a block device (tmpfs, overlay on a virtual fs)
    target = sys_dev.resolve()
    if (target / "partition").exists():
        target = target.parent
    node = Path("/dev") / target.name
    return str(node) if node.exists() else None
