"""What one node does: its Docker engine, its uppers and overlay mounts, its GPUs.

``NodeOps`` is the node agent's whole engine. The ``labvm-node`` service serves it
over HTTPS (``agent``); the one-node default calls it inside the hub process
(``client.LocalNode``). Both go through these same methods, which are blocking
and take and return plain JSON-able values.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import docker
import docker.errors

from .. import db
from ..errors import LabVMError, StoreUnreachable
from ..images import USER_IMAGE
from ..ssh.keys import check_lines
from ..storage import open_store
from ..storage.crash import crashpoint
from ..storage.health import StoreProbe
from . import asides, containerspec, housekeeping, netpolicy, nvml, overlay
from .allocations import GpuAllocator
from .exitwatch import exit_watch
from .interrupted import Interrupted
from .network import ensure_network
from .protocol import SERVER_PORT, Emit, Limits, NodeConfig, StartRequest
from .quota import NO_QUOTA_FS
from .rootfs import prepare_rootfs
from .secrets import Secrets
from .syncing import Syncing
from .upkeep import Upkeep
from .uppers import Uppers
from .userns import remap_base, require_userns

log = logging.getLogger("labvm.node")


# Threads for the node's blocking calls. A start holds one until Jupyter answers, or while
# it waits for a start slot (concurrent_starts); on asyncio's default pool (CPUs + 4) the
# waiting starts would make every status poll and sync wait too.
OP_THREADS = 64
SYNC_BACKOFF_MAX_S = 300.0  # the longest wait after failed background syncs of a root


class NodeOps:
    """The node's engine; thread-safe, one instance per node process."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state = Path(config.state_dir)
        self.client = (docker.DockerClient(base_url=config.docker_url) if config.docker_url
                       else docker.from_env())
        self.store = open_store(config.store_root or self.state / "store")
        self.cached_store_root = (Path(config.cached_store_root) if config.cached_store_root
                                  else None)
        # Users' trees hold setuid files and whatever else they made, owned by the userns
        # range: no host account but root may enter them. Overlay reads its layers and
        # dockerd binds the root's directories as root, so nothing needs more.
        for d in (self.state, self.store.root,
                  Path(config.image_layer_dir or self.state / "rootfs")):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        url = config.db_url or db.default_url(self.state)
        self.allocator = GpuAllocator(url, node=config.name, sharing=config.gpu_sharing)
        self._lock = threading.Lock()  # guards _key_locks and _start_queue only
        self._key_locks: dict[str, threading.Lock] = {}
        self.uppers = Uppers(self.state, self.store, config.name)
        self.syncing = Syncing(self.store, self.uppers)
        self.secrets = Secrets(config.secrets_root)
        self.interrupted = Interrupted(self.state)
        self._aside_sizes: dict[str, int | None] = {}
        self._collector = None
        self._sample_lock = threading.Lock()
        self.housekept: dict | None = housekeeping.load(self.state)
        # The first round comes one interval after the last one (or soon after start).
        every = config.housekeeping_interval_h * 3600
        self._housekeeping_t = ((self.housekept or {}).get("t") or
                                time.time() - every + min(60.0, every))
        self.upkeep = Upkeep()
        self.pool = ThreadPoolExecutor(max_workers=OP_THREADS, thread_name_prefix="labvm-node")
        self.store_probe = StoreProbe(self.store.root)
        slots = config.concurrent_starts or os.cpu_count() or 1
        self._start_slots = threading.BoundedSemaphore(slots)
        self._start_queue = 0  # starts waiting for a slot (under _lock)
        self._container_limits: dict[str, tuple[float, int]] = {}  # by container id
        self._sync_backoff: dict[str, tuple[int, float]] = {}  # key -> (failures, retry at)
        ensure_network(self.client, config.network_name)
        self.policy = netpolicy.node_policy(self.client, config.network_name, config.hub_api,
                                            config.cluster_nets, config.allow_nets)
        netpolicy.install(self.policy, owner=config.name)
        self.reconcile()

    def reconcile(self) -> None:
        """Free what no running container uses: GPUs, root mounts, secrets.

        Runs when the node (agent or hub) starts, so one killed mid-start or mid-stop
        leaks nothing.
        """
        # A container made but never started: its start was killed while it waited for a
        # boot slot. Left alone, its status would read as a start still under way.
        for c in self.client.containers.list(all=True, filters={
                "status": "created", "label": ["labvm.key", f"labvm.node={self.config.name}"]}):
            log.warning("removing the container of %s: its start was cut short",
                        c.labels["labvm.key"])
            c.remove(force=True)
        live = self.live_keys()
        released = self.allocator.reconcile(live)
        for owner, uuids in released.items():
            log.warning("released %d GPU(s) of %s: no running container", len(uuids), owner)
        mnt = self.state / "mnt"
        if mnt.is_dir():
            for p in mnt.iterdir():
                if p.name not in live and overlay.is_mounted(p):
                    log.warning("unmounting the root of %s: no running container", p.name)
                    overlay.unmount_root(self.paths(p.name))
                    self.secrets.remove(p.name)
        leases = self.state / "leases"
        if leases.is_dir():
            for f in leases.glob("*.json"):
                if f.stem not in live:
                    # Running when this node went down: the hub must not take it for a
                    # server its user stopped (see ``interrupted``).
                    log.warning("the server of %s was running when this node went down",
                                f.stem)
                    self.interrupted.add(f.stem)
                    self._release(f.stem)

    # ---- helpers ---------------------------------------------------------------

    def key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def container_name(self, key: str) -> str:
        # The node is part of the name: engines may be shared (tests).
        return f"labvm-{self.config.name}-{key}"

    def paths(self, key: str) -> overlay.RootPaths:
        return self.uppers.paths(key)

    def _container(self, key: str):
        try:
            return self.client.containers.get(self.container_name(key))
        except docker.errors.NotFound:
            return None

    def _running(self) -> list[dict]:
        """The running containers of this node as the engine lists them (Id, Labels):
        no inspect per container, since heartbeats and syncs ask while servers start."""
        return self.client.api.containers(
            filters={"label": ["labvm.key", f"labvm.node={self.config.name}"]})

    def live_keys(self) -> set[str]:
        return {c["Labels"]["labvm.key"] for c in self._running()}

    def _limits_of(self, container_id: str) -> tuple[float, int]:
        """CPUs and memory bytes of a container, inspected once: LabVM never changes them."""
        got = self._container_limits.get(container_id)
        if got is None:
            try:
                hc = self.client.api.inspect_container(container_id).get("HostConfig") or {}
            except docker.errors.NotFound:
                return 0.0, 0
            got = ((hc.get("NanoCpus") or 0) / 1e9, hc.get("Memory") or 0)
            self._container_limits[container_id] = got
        return got

    # ---- inventory --------------------------------------------------------------

    def info(self) -> dict:
        """GPUs (with their holders), CPU and memory committed, and each server's sync."""
        inventory = nvml.read_inventory()
        holders = {r.uuid: r.owner for r in self.allocator.records()}
        cpus = mem = 0.0
        servers: dict[str, dict] = {}
        running = self._running()
        for c in running:
            c_cpus, c_mem = self._limits_of(c["Id"])
            cpus += c_cpus
            mem += c_mem
            servers[c["Labels"]["labvm.key"]] = {"running": True}
        live = {c["Id"] for c in running}
        self._container_limits = {k: v for k, v in self._container_limits.items() if k in live}
        for key in servers:
            servers[key]["last_synced"] = self._last_synced(key)
        return {
            "name": self.config.name,
            "gpus": [dict(asdict(g), holder=holders.get(g.uuid)) for g in inventory],
            "cpus": os.cpu_count() or 1,
            "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "cpus_committed": cpus,
            "mem_committed": int(mem),
            "servers": servers,
            "asides": self.asides(),
            "housekeeping": self.housekept or {},
            "store": self.store_probe.state.to_json(),
        }

    # ---- start ------------------------------------------------------------------

    def start(self, req: StartRequest, emit: Emit | None = None) -> dict:
        """Start the server of ``req.key``; on any failure nothing it made is left."""
        emit = emit or (lambda p, m: log.info("%s: %s", req.key, m))
        with self.key_lock(req.key):
            try:
                return self._start(req, emit)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise LabVMError(
                    f"The disk that holds users' files on node {self.config.name} is full "
                    f"({self.uppers.quotas.uppers}), so no server can start there now. Running "
                    "servers keep their files; an admin must free room.") from e

    @contextlib.contextmanager
    def _start_slot(self, emit: Emit) -> Iterator[None]:
        """One of ``concurrent_starts`` slots, held from the container's start until Jupyter
        answers: that part is CPU-bound, so ten at once on a small node finish later than
        the same ten a few at a time. What comes before (GPUs, mounts, the container's
        creation) waits mostly on disks and dockerd, so the starts that wait for a slot do
        it meanwhile and are ready to run the moment one is free."""
        if not self._start_slots.acquire(blocking=False):
            with self._lock:
                self._start_queue += 1
                ahead = self._start_queue
            emit(75, f"Waiting for other starts on node {self.config.name} to finish "
                    f"({ahead} waiting)")
            try:
                self._start_slots.acquire()
            finally:
                with self._lock:
                    self._start_queue -= 1
        try:
            yield
        finally:
            self._start_slots.release()

    def check_start(self, req: StartRequest, inventory: list) -> Limits:
        """Refuse, before anything is made, a request this node must not run: a bad field,
        an image it neither built nor was told to allow, or more than it has."""
        limits = req.checked_limits()
        if not self.image_allowed(req.image):
            raise LabVMError(f"the image {req.image!r} is not one node {self.config.name} built "
                             "(labvm image build) or allows (--allow-image)")
        cpus = os.cpu_count() or 1
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if limits.cpus > cpus:
            raise LabVMError(f"{limits.cpus:g} CPUs asked; node {self.config.name} has {cpus}")
        if limits.mem_bytes > mem:
            raise LabVMError(f"{limits.mem_bytes >> 20} MiB of memory asked; node "
                             f"{self.config.name} has {mem >> 20} MiB")
        if limits.disk_bytes is not None and not self.uppers.quotas.enabled():
            raise LabVMError(f"node {self.config.name} cannot enforce a disk quota: its "
                             f"uppers ({self.uppers.quotas.uppers}) {NO_QUOTA_FS}")
        if req.gpus > len(inventory):
            raise LabVMError(f"{req.gpus} GPU(s) asked; node {self.config.name} has "
                             f"{len(inventory)}")
        return limits

    def require_store(self) -> None:
        """Refuse at once, rather than hang, while the layer store does not answer."""
        store = self.store_probe.check()
        if not store.reachable:
            raise StoreUnreachable(
                f"LabVM's layer store does not answer node {self.config.name} "
                f"({store.error}), so no server can start there now. Running servers go "
                "on working; try again in a few minutes."
            )

    def image_allowed(self, image: str) -> bool:
        if image in self.config.allowed_images:
            return True
        try:
            tags = self.client.images.get(image).tags
        except docker.errors.ImageNotFound:
            return False
        # The images `labvm image build` makes (or the test bed loads): labvm/user:<hash>.
        return any(t.startswith(f"{USER_IMAGE.split(':')[0]}:") for t in tags)

    def _start(self, req: StartRequest, emit: Emit) -> dict:
        cfg = self.config
        key = req.key
        inventory = nvml.read_inventory()
        limits = self.check_start(req, inventory)
        self.require_store()
        engine = require_userns(self.client)
        shift = remap_base(cfg.userns_remap_user)
        paths = self.paths(key)
        undo: list[Callable[[], object]] = []
        try:
            emit(10, f"Allocating GPUs on node {cfg.name} ({req.gpus} requested)")
            gpus = self.allocator.allocate(key, inventory, req.gpus, req.model, req.sharing)
            undo.append(lambda: self.allocator.release(key))
            if gpus:
                emit(20, "Allocated GPU(s) " + ", ".join(str(g.index) for g in gpus))

            emit(30, "Preparing the image layer")
            image_layer = prepare_rootfs(
                self.client, req.image,
                Path(cfg.image_layer_dir or self.state / "rootfs"), shift,
            )
            self._remove_container(key)
            took_over = self.uppers.own(key, emit)
            crashpoint("node.start.owned")
            # Before the mount: the container never writes a byte that is not charged.
            quota = self.uppers.quotas.apply(key, limits.disk_bytes)
            self.store.set_quota(key, limits.store_bytes)
            if quota is not None and quota.limit_bytes is not None:
                emit(45, f"Disk quota {quota.limit_bytes >> 20} MiB, "
                         f"{quota.used_bytes >> 20} MiB used")
            layers = [overlay.through_cache(p, self.store.root, self.cached_store_root)
                      for p in self.store.layers(key)]
            # Before the mount: nothing may prune the versions this root stands on.
            self._lease(key, self.store.current_version(key))
            undo.append(lambda: self._release(key))

            emit(50, f"Mounting root filesystem ({len(layers)} stored layer(s))")
            overlay.mount_root(paths, [*layers, image_layer], shift)
            undo.append(lambda: overlay.unmount_root(paths))
            self.uppers.mark_dirty(key)
            crashpoint("node.start.mounted")

            secrets_dir = self.secrets.write(key, shift, req.secrets, req.ssh_keys)
            undo.append(lambda: self.secrets.remove(key))

            emit(70, "Starting container")
            spec = self._server_spec(req, paths, limits, gpus, secrets_dir, engine)
            container = self.client.containers.create(**containerspec.build(spec))
            undo.append(lambda: self._remove_container(key))
            with self._start_slot(emit):
                container.start()
                ip, port = self._address(container)
                emit(80, "Container running; waiting for Jupyter")
                self._wait_for_server(container, req.timeout_s)
            emit(90, "Jupyter is listening")
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:
                    log.exception("cleanup after a failed start of %s", key)
            raise
        self.interrupted.clear(key)
        self.syncing.start(key)
        if took_over and self.store.pending(key):
            self._merge_later(key)
        else:
            self.upkeep.run(f"trash-{key}", lambda: self.store.empty_trash(key))
        return {"ip": ip, "port": port, "container_id": container.id, "node": cfg.name,
                "gpus": [g.index for g in gpus]}

    def _server_spec(self, req: StartRequest, paths, limits, gpus, secrets_dir,
                     engine: dict) -> containerspec.ServerSpec:
        cfg = self.config
        runtime = (cfg.nvidia_runtime == "on" if cfg.nvidia_runtime != "auto"
                   else "nvidia" in (engine.get("Runtimes") or {}))
        return containerspec.ServerSpec(
            name=self.container_name(req.key),
            image=req.image,
            key=req.key,
            username=req.username,
            merged=paths.merged,
            top_dirs=overlay.top_level_dirs(paths.merged, containerspec.EPHEMERAL),
            cmd=list(req.cmd),
            env=dict(req.env),
            limits=limits,
            gpus=gpus,
            device_paths=nvml.device_paths(gpus, cfg.dev_root) if gpus else [],
            nvidia_runtime=runtime,
            network=cfg.network_name,
            secrets_dir=secrets_dir,
            io_device=_block_device(paths.upper),
            uid=cfg.container_uid,
            capabilities=tuple(cfg.capabilities),
            init_path=shutil.which("docker-init") or shutil.which("tini"),
            labels={"labvm.node": cfg.name, "labvm.server": req.server},
            publish_ip=cfg.publish_ip or None,
        )

    def _address(self, container) -> tuple[str, int]:
        """Where the hub reaches Jupyter: the published node port, or the bridge IP."""
        for _ in range(100):
            container.reload()
            if container.status == "exited":
                logs = container.logs(tail=20).decode(errors="replace")
                raise LabVMError(f"the container exited at start:\n{logs}")
            net = container.attrs["NetworkSettings"]
            if self.config.publish_ip:
                bound = (net.get("Ports") or {}).get(f"{SERVER_PORT}/tcp")
                if bound:
                    return self.config.publish_ip, int(bound[0]["HostPort"])
            else:
                ip = (net["Networks"].get(self.config.network_name) or {}).get("IPAddress")
                if ip:
                    return ip, SERVER_PORT
            time.sleep(0.1)
        raise LabVMError("the container got no network address")

    def _wait_for_server(self, container, timeout_s: float) -> None:
        """Return once Jupyter accepts connections; raise if the container dies first.

        Probed on the container's own bridge address, from this node. Whether the
        container still runs is read from its init process (``exitwatch``), not by asking
        dockerd twice a second; where that process is not ours to see, dockerd is asked.
        """
        ip = container.attrs["NetworkSettings"]["Networks"][self.config.network_name][
            "IPAddress"]
        deadline = time.monotonic() + min(timeout_s, 120)
        exited = exit_watch(container.attrs["State"].get("Pid") or 0)
        # dockerd is still asked now and then: a PID that another namespace gave us would
        # be some other process.
        ask_every = 0.5 if exited is None else 10.0
        checked = time.monotonic()
        try:
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((ip, SERVER_PORT), timeout=1).close()
                    return
                except OSError:
                    pass
                if (time.monotonic() - checked > ask_every
                        or (exited is not None and exited.exited())):
                    checked = time.monotonic()
                    container.reload()
                    if container.status != "running":
                        logs = container.logs(tail=30).decode(errors="replace")
                        raise LabVMError(
                            f"the server's container stopped while starting:\n{logs}")
                time.sleep(0.05)
        finally:
            if exited is not None:
                exited.close()
        # Not our call to give up: the hub's own http_timeout decides.
        log.warning("%s: Jupyter not listening yet; leaving it to the hub", container.name)

    # ---- status, stop ---------------------------------------------------------------

    def status(self, key: str) -> dict:
        c = self._container(key)
        state = "missing"
        code = None
        if c is not None:
            running = c.status in ("running", "created", "restarting")
            state = "running" if running else "exited"
            code = None if running else int(c.attrs.get("State", {}).get("ExitCode", 0) or 0)
        return {"state": state, "exit_code": code, "last_synced": self._last_synced(key),
                "synced_clean": self.uppers.is_clean(key),
                "interrupted": self.interrupted.get(key) if state != "running" else None}

    def stop(self, key: str) -> dict:
        """Stop and remove the container, sync the upper one last time, free everything.

        The upper stays on this node for a fast restart; its final sync is marked
        clean so that a node taking the key over knows nothing is only here.
        """
        with self.key_lock(key):
            self._remove_container(key)
            synced = False
            # While the store does not answer, a stop must not hang on it: the upper
            # (marked dirty) keeps every change for the next start or sync here.
            reachable = self.store_probe.check().reachable
            if not reachable:
                log.warning("%s: the layer store does not answer; stopped without the final "
                            "sync, the upper here keeps every change", key)
            try:
                synced = reachable and self.syncing.sync(key, final=True)
            except Exception:
                log.exception("%s: the final sync failed; the upper stays here", key)
            crashpoint("node.stop.synced")
            paths = self.paths(key)
            overlay.unmount_root(paths)
            if reachable:
                self._release(key)  # else the lease runs out by itself (lease_grace)
            self.secrets.remove(key)
            self.interrupted.clear(key)
            released = self.allocator.release(key)
            if released:
                log.info("released GPU(s) %s of %s", ", ".join(released), key)
            return {"synced": synced, "last_synced": self._last_synced(key)}

    def set_ssh_keys(self, key: str, ssh_keys: list[str]) -> dict:
        """Give a running server its user's current SSH keys (the sshd reads them)."""
        return {"key": key, "running": self.secrets.set_keys(key, check_lines(ssh_keys)),
                "keys": len(ssh_keys)}

    def ssh_address(self, key: str) -> str:
        """Where this node reaches the sshd of ``key``'s container: its bridge address."""
        c = self._container(key)
        if c is None or c.status != "running":
            raise LabVMError(f"{key} is not running on node {self.config.name}")
        ip = (c.attrs["NetworkSettings"]["Networks"].get(self.config.network_name) or {}).get(
            "IPAddress")
        if not ip:
            raise LabVMError(f"{key} has no address on node {self.config.name}")
        return ip

    def set_quota(self, key: str, disk_bytes: int | None) -> dict:
        """Change the disk quota of ``key``'s upper here, live; below its usage: refused."""
        with self.key_lock(key):
            u = self.uppers.quotas.change(key, disk_bytes)
            log.info("%s: disk quota now %s", key,
                     "none" if u.limit_bytes is None else f"{u.limit_bytes >> 20} MiB")
            return {"used_bytes": u.used_bytes, "limit_bytes": u.limit_bytes}

    def discard(self, key: str) -> dict:
        """Drop this node's copy of a key that another node now owns (after a migration)."""
        with self.key_lock(key):
            if self._container(key) is not None or overlay.is_mounted(self.paths(key).merged):
                raise LabVMError(f"{key} is still running on node {self.config.name}")
            if self.uppers.is_live(key):
                raise LabVMError(f"{key}'s live upper is on node {self.config.name}")
            self.uppers.set_aside(key)
            return {"discarded": True}

    def _remove_container(self, key: str) -> None:
        c = self._container(key)
        if c is None:
            return
        try:
            c.stop(timeout=int(self.config.stop_timeout))
        except docker.errors.APIError:
            pass
        c.remove(force=True)

    # ---- background sync -----------------------------------------------------------

    def sync(self, key: str) -> dict:
        """Sync the key's upper to the store now (while it runs, or after it stopped)."""
        crashpoint("node.sync")
        with self.key_lock(key):
            ok = self.syncing.sync(key, final=self._container(key) is None)
        return {"synced": ok, "last_synced": self._last_synced(key)}

    def _last_synced(self, key: str) -> float | None:
        """When ``key`` last synced; None while the store does not answer (the record is
        on the store, and a call there would hang until it is back)."""
        return self.syncing.last_synced(key) if self.store_probe.state.reachable else None

    def sync_running(self) -> None:
        """One round of background sync over every running server of this node (and a
        check that the container network policy is still in place)."""
        try:
            if not netpolicy.installed(self.policy.bridge):
                log.warning("the container network policy was missing; installing it again")
                netpolicy.install(self.policy, owner=self.config.name)
        except LabVMError:
            log.exception("cannot check the container network policy")
        was = self.store_probe.state
        store = self.store_probe.check()
        if not store.reachable:
            # Every call on a MooseFS mount blocks while its master is down: no sync may
            # start then (it would hold the user's lock). The uppers keep every change.
            if was.reachable:
                log.warning("the layer store does not answer (%s); syncs wait for it",
                            store.error)
            return
        if not was.reachable:
            log.warning("the layer store answers again after %.0f s; syncs resume",
                        time.time() - was.since)
        self.renew_leases()
        if time.time() - self._housekeeping_t >= self.config.housekeeping_interval_h * 3600:
            self._housekeeping_t = time.time()
            self.upkeep.run("housekeeping", self.housekeep)
        try:
            asides.expire(self.state, self.config.aside_max_age_days)
        except OSError:
            log.exception("cannot remove old set-aside uppers")
        now = time.time()
        for key in sorted(self.live_keys()):
            failures, retry_at = self._sync_backoff.get(key, (0, 0.0))
            if now < retry_at:
                continue
            lock = self.key_lock(key)
            if not lock.acquire(blocking=False):
                continue  # a start, stop or explicit sync is busy with it
            try:
                owner = self.store.owner(key)
                if owner is not None and owner[0] != self.config.name:
                    # Fenced: another node took this root over (an evacuation while we
                    # were unreachable). This copy must not run on, nor sync.
                    log.warning("%s: now owned by node %s; stopping the stale copy here",
                                key, owner[0])
                    self._remove_container(key)
                    self.syncing.drop(key)
                    overlay.unmount_root(self.paths(key))
                    self._release(key)
                    self.allocator.release(key)
                    continue
                self.syncing.sync(key, final=False)
                self._sync_backoff.pop(key, None)
            except Exception:
                # Back off (one interval, then two, four...) so that a root whose sync
                # keeps failing does not take every round from the others.
                failures += 1
                wait = min(self.config.sync_interval_s * 2 ** (failures - 1), SYNC_BACKOFF_MAX_S)
                self._sync_backoff[key] = (failures, time.time() + wait)
                log.exception("%s: background sync failed (%d in a row); next try in %.0f s",
                              key, failures, wait)
            finally:
                lock.release()

    # ---- this node's own usage sample (the admin service pulls it) ---------------------

    def sample(self) -> dict:
        """GPUs (with each process's user), containers and the node itself, now."""
        with self._sample_lock:
            if self._collector is None:
                # Only an agent samples itself; the hub's own node is the service's.
                from ..monitor.collector import Collector

                cfg = self.config
                self._collector = Collector(node_name=cfg.name, state_dir=cfg.state_dir,
                                            store_root=cfg.store_root, db_url=cfg.db_url,
                                            docker_url=cfg.docker_url,
                                            store_probe=self.store_probe)
            return self._collector.sample().to_dict()

    def notice(self, key: str, name: str, text: str | None) -> dict:
        """Leave (or with None remove) one of the admin service's notices in the home of
        ``key``'s user (its idle-GPU and disk-quota warnings)."""
        from ..monitor import notice

        if name not in notice.NAMES:
            raise LabVMError(f"no such notice {name[:60]!r}")
        if text is None:
            notice.drop(self.client, key, self.config.name, name)
            return {"done": True}
        return {"done": notice.put(self.client, key, self.config.name, name, text)}

    # ---- housekeeping (housekeeping.py) ---------------------------------------------

    def housekeep(self) -> dict:
        """One round of image prune, fsck and version prune; kept for the admin pages."""
        # Every image this node's engine still has may be started at any moment (a start
        # finds its tree unpacked and mounts it): only trees of images gone from the
        # engine are pruned. `labvm image prune --keep` is the manual, stricter one.
        try:
            keep = {i.id for i in self.client.images.list()}
        except docker.errors.DockerException as e:
            log.warning("housekeeping: cannot list images (%s); no image tree pruned", e)
            keep = None
        result = housekeeping.run(self.store, self.config.name,
                                  Path(self.config.image_layer_dir or self.state / "rootfs"),
                                  keep, self.config.housekeeping_repair)
        self.housekept = result
        housekeeping.save(self.state, result)
        return result

    # ---- set-aside uppers (asides.py) ------------------------------------------------

    def asides(self) -> list[dict]:
        """The set-aside uppers on this node (sizes measured once: they never change)."""
        return asides.listing(self.state, self.config.name, self._aside_sizes)

    def restore_aside(self, aside_id: str) -> dict:
        n = asides.restore(self.state, self.store, aside_id)
        return {"id": aside_id, "version": n}

    def delete_aside(self, aside_id: str) -> dict:
        return {"id": aside_id, "key": asides.delete(self.state, aside_id)}

    # ---- leases on stored versions (storage/leases.py) --------------------------------

    def _lease_file(self, key: str) -> Path:
        return self.state / "leases" / f"{key}.json"

    def _lease(self, key: str, version: int | None) -> None:
        """Lease the version ``key``'s root is mounted over, and remember it here (the
        renewals after an agent restart read it back)."""
        versions = [version] if version is not None else []
        f = self._lease_file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{key}.tmp")
        tmp.write_text(json.dumps({"versions": versions}))
        os.replace(tmp, f)
        self.store.lease(key, self.config.name, versions, self.config.lease_grace_s)

    def _release(self, key: str) -> None:
        self._lease_file(key).unlink(missing_ok=True)
        try:
            self.store.release(key, self.config.name)
        except OSError:
            log.exception("%s: could not release its lease (it expires by itself)", key)

    def renew_leases(self) -> None:
        """Renew the leases of every root mounted here (with each heartbeat)."""
        for key in sorted(self.live_keys()):
            try:
                versions = json.loads(self._lease_file(key).read_text())["versions"]
                self.store.lease(key, self.config.name, versions, self.config.lease_grace_s)
            except FileNotFoundError:
                pass  # started before leases existed, or mid-start
            except (OSError, ValueError, KeyError):
                log.exception("%s: could not renew its lease", key)

    def _merge_later(self, key: str) -> None:
        """Merge the frozen layers of a key taken over into a new version, off-path."""

        def merge() -> None:
            made = self.store.merge_pending(key)
            log.info("%s: merged taken-over layers into version(s) %s", key, made)

        self.upkeep.run(f"merge-{key}", merge)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.syncing.close()
        self.allocator.close()
        self.client.close()


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
