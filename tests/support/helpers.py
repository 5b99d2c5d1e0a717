"""What the end-to-end tests look at: containers, mounts and files on the node."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def container_of(client, user: str, server: str = ""):
    import docker.errors

    key = f"{user}.{server}" if server else user
    for _ in range(5):
        try:
            found = client.containers.list(all=True, filters={"label": f"labvm.key={key}"})
        except docker.errors.NotFound:
            continue  # removed between the listing and its inspection: look again
        assert len(found) <= 1, found
        return found[0] if found else None
    raise AssertionError(f"the container of {key} kept vanishing while listed")


def sh(container, script: str, root: bool = False) -> tuple[int, str]:
    """Run a shell script in the container as the user (uid 1000), or as its root."""
    r = container.exec_run(["bash", "-c", script], user="0" if root else "1000:1000",
                           environment={"HOME": "/root" if root else "/home"})
    return r.exit_code, r.output.decode(errors="replace")


def mounts_under(path: Path) -> list[str]:
    from labvm_spawner.node.overlay import mount_points

    return sorted(m for m in mount_points() if m.startswith(str(path)))


def fixture_uuids(name: str = "nvml_dgx_a100.json") -> list[str]:
    return [d["uuid"] for d in json.loads((FIXTURES / name).read_text())["devices"]]


def state_dir(hub) -> Path:
    return Path(hub.env["LABVM_TEST_STATE"])
