"""dockerd's user-namespace remapping: which host ids the container's root becomes."""

from __future__ import annotations

from pathlib import Path

import docker

from ..errors import LabVMError


def remap_base(user: str = "dockremap", subuid: Path = Path("/etc/subuid")) -> int:
    """The first host uid of ``user``'s subordinate range: the container's uid 0."""
    try:
        lines = subuid.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        name, _, rest = line.partition(":")
        if name == user:
            return int(rest.split(":")[0])
    raise LabVMError(f"no subordinate uid range for {user!r} in {subuid}; is dockerd "
                     "running with userns-remap?")


def has_userns(info: dict) -> bool:
    """True when dockerd (its ``info``) runs with userns-remap."""
    return any("name=userns" in o for o in info.get("SecurityOptions") or [])


def require_userns(client: docker.DockerClient) -> dict:
    """Refuse to run containers when their root would be host root; returns dockerd's info."""
    info = client.info()
    if not has_userns(info):
        raise LabVMError("dockerd runs without userns-remap, so a container's root would be "
                         "host root; LabVM refuses to start containers until dockerd runs "
                         "with \"userns-remap\" (see scripts/setup.sh)")
    return info
