"""What the hub and a node say to each other: settings, requests, results, inventory.

Plain dataclasses, no Docker and no node engine: the hub imports only this, the node
agent serves it, and every field that arrives from the network is checked here
(``StartRequest.checked_limits``) before a node acts on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import LabVMError
from ..names import parse_key, root_key
from ..ssh.keys import check_lines

# What sudo and apt need, and nothing more: no MKNOD (a container must not make
# device nodes for GPUs it does not hold), no NET_RAW, no SYS_ADMIN.
CAPABILITIES = (
    "AUDIT_WRITE",  # sudo and PAM log to the audit socket
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SYS_CHROOT",  # sshd's privilege separation (namespaced: the container's root only)
)
SERVER_PORT = 8888  # where Jupyter listens in every container
SSHD_PORT = 22  # where sshd listens in every container (reached only via the gateway)
MIN_MEM = 6 * 1024 * 1024  # docker refuses smaller memory limits

# progress (0-100) and a message for the user's spawn page
Emit = Callable[[int, str], None]


def gpus_phrase(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def are_free(n: int) -> str:
    return "none is free" if n == 0 else f"only {n} {'is' if n == 1 else 'are'} free"


MIN_DISK = 16 << 20  # a quota below this leaves no room to start JupyterLab


@dataclass
class Limits:
    """One server's resource limits, as Docker applies them."""

    cpus: float
    mem_bytes: int
    pids: int
    blkio_weight: int | None  # None: docker's default weight
    io_read_bps: int | None  # None: unlimited; applies to the device of the user's upper dir
    io_write_bps: int | None
    disk_bytes: int | None = None  # None: unlimited; the upper's quota (node/quota.py)
    store_bytes: int | None = None  # None: unlimited; a version's size (storage/quota.py)


@dataclass
class NodeConfig:
    """One node's settings (the agent's command line, or the spawner's traitlets)."""

    name: str = "local"
    docker_url: str = ""
    state_dir: str = "/var/lib/labvm"
    store_root: str = ""  # empty: <state_dir>/store
    cached_store_root: str = ""  # empty: roots read their layers through store_root
    image_layer_dir: str = ""  # empty: <state_dir>/rootfs
    db_url: str = ""  # empty: sqlite:///<state_dir>/labvm.sqlite
    network_name: str = "labvm"
    dev_root: str = "/dev"
    nvidia_runtime: str = "auto"
    gpu_sharing: bool = False
    userns_remap_user: str = "dockremap"
    container_uid: int = 1000
    stop_timeout: float = 10
    capabilities: list[str] = field(default_factory=lambda: list(CAPABILITIES))
    secrets_root: str = "/run/labvm/secrets"
    publish_ip: str = ""  # empty: the hub reaches containers on the node's bridge
    sync_interval_s: float = 10.0
    lease_grace_s: float = 600.0  # a lease on stored versions outlives its last renewal
    aside_max_age_days: float = 30.0  # unclaimed set-aside uppers are removed after this
    housekeeping_interval_h: float = 6.0  # image prune, fsck, version prune: how often
    housekeeping_repair: bool = False  # let the scheduled fsck repair what it finds
    concurrent_starts: int = 0  # servers started at once; 0: one per CPU
    # Images this node runs besides those `labvm image build` made (labvm/user:*).
    allowed_images: list[str] = field(default_factory=list)
    # Container network policy (node/netpolicy.py): the hub's API (HOST:PORT) is the only
    # address on the cluster's own networks that containers reach.
    hub_api: list[str] = field(default_factory=list)
    cluster_nets: list[str] = field(default_factory=list)  # beyond the node's own networks
    allow_nets: list[str] = field(default_factory=list)  # e.g. a package mirror in them


@dataclass
class StartRequest:
    """Everything a node needs to start one server; built by the spawner."""

    key: str
    username: str
    server: str
    image: str
    cmd: list[str]
    env: dict[str, str]
    secrets: dict[str, str]
    limits: dict
    gpus: int = 0
    model: str | None = None
    sharing: bool = False
    timeout_s: float = 120
    # The user's registered SSH public keys, one authorized_keys line each (no options).
    ssh_keys: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> StartRequest:
        try:
            req = cls(**data)
        except TypeError as e:
            raise LabVMError(f"bad start request: {e}") from e
        req.checked_limits()
        return req

    def checked_limits(self) -> Limits:
        """Check every field as the untrusted input it is on a node; the limits, parsed.

        The key must be the root of exactly this user and server, and everything that
        reaches Docker must have the type and shape the spawner sends.
        """
        try:
            ok = root_key(*parse_key(self.key)) == self.key
        except LabVMError:
            ok = False
        if not ok:
            raise LabVMError(f"bad start request: malformed key {str(self.key)[:80]!r}")
        if not isinstance(self.username, str) or not isinstance(self.server, str) or \
                root_key(self.username, self.server) != self.key:
            raise LabVMError(f"bad start request: key {self.key!r} is not the root of user "
                             f"{str(self.username)[:40]!r}, server {str(self.server)[:70]!r}")
        if not isinstance(self.image, str) or not _IMAGE.fullmatch(self.image):
            raise LabVMError(f"bad start request: image {str(self.image)[:80]!r}")
        if not (isinstance(self.cmd, list) and self.cmd and all(_plain(a) for a in self.cmd)):
            raise LabVMError("bad start request: cmd must be a non-empty list of strings")
        for what, env in (("env", self.env), ("secrets", self.secrets)):
            if not isinstance(env, dict) or not all(
                    isinstance(k, str) and _ENV_NAME.fullmatch(k) and _plain(v)
                    for k, v in env.items()):
                raise LabVMError(f"bad start request: {what} must map variable names to "
                                 "strings")
        if type(self.gpus) is not int or not 0 <= self.gpus <= 64:
            raise LabVMError(f"bad start request: gpus {self.gpus!r}")
        if self.model is not None and not _plain(self.model):
            raise LabVMError("bad start request: model must be a string")
        if type(self.sharing) is not bool:
            raise LabVMError("bad start request: sharing must be true or false")
        if not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s <= 3600:
            raise LabVMError(f"bad start request: timeout_s {self.timeout_s!r}")
        try:
            check_lines(self.ssh_keys)
        except LabVMError as e:
            raise LabVMError(f"bad start request: {e}") from None
        return _limits(self.limits)


_IMAGE = re.compile(r"[a-z0-9][a-z0-9._/-]{0,200}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                    r"(@sha256:[0-9a-f]{64})?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _plain(value: object) -> bool:
    return isinstance(value, str) and "\0" not in value and len(value) <= 65536


def _limits(data: object) -> Limits:
    """Limits from a request, each field of the type and range Docker takes."""
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(Limits)}:
        raise LabVMError("bad start request: limits must have exactly "
                         + ", ".join(f.name for f in fields(Limits)))
    lim = Limits(**data)
    ok = (isinstance(lim.cpus, int | float) and 0 < lim.cpus <= 4096
          and type(lim.mem_bytes) is int and lim.mem_bytes >= MIN_MEM
          and type(lim.pids) is int and 0 < lim.pids <= 1 << 22
          and all(v is None or (type(v) is int and v > 0)
                  for v in (lim.blkio_weight, lim.io_read_bps, lim.io_write_bps))
          and all(v is None or (type(v) is int and MIN_DISK <= v <= 1 << 60)
                  for v in (lim.disk_bytes, lim.store_bytes)))
    if not ok or (lim.blkio_weight is not None and not 10 <= lim.blkio_weight <= 1000):
        raise LabVMError(f"bad start request: limits out of range: {data}")
    return lim


@dataclass
class StartResult:
    """Where the hub reaches a server that started, and what it holds."""

    ip: str
    port: int
    container_id: str
    node: str
    gpus: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StartResult:
        try:
            return cls(ip=str(data["ip"]), port=int(data["port"]),
                       container_id=str(data["container_id"]), node=str(data["node"]),
                       gpus=[int(g) for g in data.get("gpus", [])])
        except (KeyError, TypeError, ValueError) as e:
            raise LabVMError(f"the node answered a start with a bad result: {e}") from e

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Status:
    """A server's container on its node, and its last sync."""

    state: str  # running | exited | missing
    exit_code: int | None = None
    last_synced: float | None = None
    synced_clean: bool = False
    interrupted: float | None = None  # not running: when a node restart was found to stop it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Status:
        state = data.get("state")
        if state not in ("running", "exited", "missing"):
            raise LabVMError(f"the node answered a status with a bad state: {state!r}")
        code = data.get("exit_code")
        synced = data.get("last_synced")
        cut = data.get("interrupted")
        return cls(state, int(code) if code is not None else None,
                   float(synced) if synced is not None else None,
                   bool(data.get("synced_clean")), float(cut) if cut is not None else None)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeInfo:
    """A node's inventory as its heartbeat tells it: GPUs with their holders, CPU and
    memory with what running servers committed. The one home of GPU counting."""

    name: str = ""
    gpus: list[dict[str, Any]] = field(default_factory=list)
    cpus: int = 1
    mem_bytes: int = 0
    cpus_committed: float = 0.0
    mem_committed: int = 0
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    asides: list[dict[str, Any]] = field(default_factory=list)  # set-aside uppers here
    housekeeping: dict[str, Any] = field(default_factory=dict)  # its last scheduled run

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> NodeInfo:
        """Tolerant of missing fields (an old agent, a node never heard from)."""
        data = data or {}
        gpus = [g for g in data.get("gpus") or [] if isinstance(g, dict) and "name" in g]
        return cls(name=str(data.get("name") or ""), gpus=gpus,
                   cpus=int(data.get("cpus") or 1), mem_bytes=int(data.get("mem_bytes") or 0),
                   cpus_committed=float(data.get("cpus_committed") or 0),
                   mem_committed=int(data.get("mem_committed") or 0),
                   servers=dict(data.get("servers") or {}),
                   asides=[a for a in data.get("asides") or [] if isinstance(a, dict)],
                   housekeeping=dict(data.get("housekeeping") or {}))

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def free_gpus(self, model: str | None = None, owner: str | None = None) -> list[dict]:
        """GPUs nobody holds (or ``owner`` holds), of ``model`` if given."""
        return [g for g in self.gpus
                if g.get("holder") in (None, owner) and (model is None or g["name"] == model)]

    def usable_gpus(self, model: str | None, owner: str | None, sharing: bool) -> int:
        """How many GPUs a server of ``owner`` can get here (with ``sharing``: all of them)."""
        if sharing:
            return sum(1 for g in self.gpus if model is None or g["name"] == model)
        return len(self.free_gpus(model, owner))

    def held_by(self, owner: str) -> list[dict]:
        return [g for g in self.gpus if g.get("holder") == owner]

    def models(self) -> set[str]:
        return {g["name"] for g in self.gpus}

    def by_model(self) -> dict[str, dict[str, int]]:
        """{model: {"total", "free"}}, for pages and forms."""
        out: dict[str, dict[str, int]] = {}
        for g in self.gpus:
            m = out.setdefault(g["name"], {"total": 0, "free": 0})
            m["total"] += 1
            m["free"] += 0 if g.get("holder") else 1
        return out

    @property
    def mem_free(self) -> int:
        return self.mem_bytes - self.mem_committed
