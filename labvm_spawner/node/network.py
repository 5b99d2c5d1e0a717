"""The Docker network user containers live on."""

from __future__ import annotations

import docker
import docker.errors


def ensure_network(client: docker.DockerClient, name: str = "labvm") -> str:
    """Create the bridge network if needed and return its gateway address.

    Inter-container traffic is off: users reach only the hub and the outside
    (for apt), never each other's servers directly.
    """
    try:
        net = client.networks.get(name)
    except docker.errors.NotFound:
        net = client.networks.create(
            name, driver="bridge",
            options={"com.docker.network.bridge.enable_icc": "false"},
            labels={"labvm": "1"},
        )
        net.reload()
    configs = (net.attrs.get("IPAM") or {}).get("Config") or []
    for cfg in configs:
        if cfg.get("Gateway"):
            return cfg["Gateway"]
    raise RuntimeError(f"docker network {name!r} has no gateway address")
