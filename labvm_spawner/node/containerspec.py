"""Building the Docker container spec for one server, apart from the spawner's control flow.

Everything here is a pure function of its inputs, so the security-relevant
shape of a container (capabilities, devices, mounts, limits) can be read and
tested without a Docker engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from docker.types import DeviceRequest

from .nvml import Gpu
from .protocol import CAPABILITIES, SERVER_PORT, Limits

# Not part of the persistent root: fresh for every start.
EPHEMERAL = frozenset({"tmp", "proc", "sys", "dev", "run"})

# What runs inside every container (the entrypoint): labvm_spawner/runtime/.
RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"


@dataclass
class ServerSpec:
    """What the spawner decided for one server; turned into Docker's kwargs by ``build``."""

    name: str
    image: str
    key: str
    username: str
    merged: Path
    top_dirs: list[str]
    cmd: list[str]
    env: dict[str, str]
    limits: Limits
    gpus: list[Gpu] = field(default_factory=list)
    device_paths: list[str] = field(default_factory=list)
    nvidia_runtime: bool = False
    network: str = "labvm"
    secrets_dir: Path | None = None
    io_device: str | None = None
    uid: int = 1000
    capabilities: tuple[str, ...] = CAPABILITIES
    labels: dict[str, str] = field(default_factory=dict)
    # A static init (tini) from the host, so a user cannot break PID 1 by editing /usr.
    init_path: str | None = None
    # Publish Jupyter's port on this node address (a remote node: the hub cannot reach
    # the node's container bridge); None leaves it on the bridge only.
    publish_ip: str | None = None


def gpu_env(gpus: list[Gpu]) -> dict[str, str]:
    """Visible-device variables that follow the allocation exactly."""
    uuids = ",".join(g.uuid for g in gpus)
    return {
        "CUDA_VISIBLE_DEVICES": uuids,
        "NVIDIA_VISIBLE_DEVICES": uuids or "none",
    }


def build(spec: ServerSpec) -> dict:
    """Keyword arguments for ``docker.DockerClient.containers.create``."""
    volumes = {str(spec.merged / d): {"bind": f"/{d}", "mode": "rw"} for d in spec.top_dirs}
    volumes[str(RUNTIME_DIR)] = {"bind": "/.labvm/runtime", "mode": "ro"}
    entrypoint = ["/.labvm/runtime/entrypoint.sh"]
    if spec.init_path:
        volumes[spec.init_path] = {"bind": "/.labvm/init", "mode": "ro"}
        entrypoint = ["/.labvm/init", "--", *entrypoint]
    if spec.secrets_dir is not None:
        volumes[str(spec.secrets_dir)] = {"bind": "/.labvm/secrets", "mode": "ro"}

    env = dict(spec.env)
    # Last, so that nothing configured or passed in can widen the allocation.
    env.update(gpu_env(spec.gpus))
    env.update({"LABVM_USER": spec.username, "LABVM_UID": str(spec.uid)})

    limits = spec.limits
    kwargs: dict = {
        "image": spec.image,
        "name": spec.name,
        "hostname": spec.key.replace(".", "-")[:63],
        "command": spec.cmd,
        "entrypoint": entrypoint,
        "environment": env,
        "labels": {"labvm.key": spec.key, "labvm.user": spec.username, **spec.labels},
        "volumes": volumes,
        # The image's own root only carries the mount points; everything a user may
        # write lives in the bound overlay directories, so a write elsewhere fails
        # loudly instead of being lost with the container.
        "read_only": True,
        "tmpfs": {"/tmp": "mode=1777", "/run": "mode=755", "/run/lock": "mode=1777"},
        "cap_drop": ["ALL"],
        "cap_add": list(spec.capabilities),
        "devices": [f"{p}:/dev/{Path(p).name}:rwm" for p in spec.device_paths],
        "network": spec.network,
        "detach": True,
        "nano_cpus": int(limits.cpus * 1e9),
        "mem_limit": limits.mem_bytes,
        # No swap beyond the memory limit.
        "memswap_limit": limits.mem_bytes,
        "pids_limit": limits.pids,
    }
    if spec.publish_ip:
        kwargs["ports"] = {f"{SERVER_PORT}/tcp": (spec.publish_ip, None)}
    if limits.blkio_weight:
        kwargs["blkio_weight"] = limits.blkio_weight
    if spec.io_device and limits.io_read_bps:
        kwargs["device_read_bps"] = [{"Path": spec.io_device, "Rate": limits.io_read_bps}]
    if spec.io_device and limits.io_write_bps:
        kwargs["device_write_bps"] = [{"Path": spec.io_device, "Rate": limits.io_write_bps}]
    if spec.nvidia_runtime and spec.gpus:
        kwargs["device_requests"] = [
            DeviceRequest(driver="nvidia", device_ids=[g.uuid for g in spec.gpus],
                          capabilities=[["gpu", "utility", "compute"]])
        ]
    return kwargs
