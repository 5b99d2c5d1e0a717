"""Bad usernames and form values get a clear error, and nothing is created anywhere."""

from urllib.parse import quote

import pytest
from support.helpers import container_of, mounts_under, state_dir
from support.hubharness import HubError

pytestmark = pytest.mark.e2e

BAD_NAMES = ["../x", "a,b", "a:b", "x" * 201, "ünï", "a b", "lowerdir=x"]


def snapshot(hub, docker_client, running: str = "ok"):
    """Every name under the node's state, but what the running server ``running`` changes
    by itself (its root, its upper, its synced copy in the store)."""
    root = state_dir(hub)
    own = {(top, running) for top in ("mnt", "uppers", "store")}

    def counted(rel) -> bool:  # noqa: ANN001
        return "rootfs" not in rel.parts and rel.name != "labvm.sqlite" and \
            tuple(rel.parts[:2]) not in own

    files = sorted(str(rel) for rel in (p.relative_to(root) for p in root.rglob("*"))
                   if counted(rel))
    containers = sorted(c.name for c in docker_client.containers.list(
        all=True, filters={"label": f"labvm.node={hub.env['LABVM_TEST_NODE']}"}))
    return files, containers, mounts_under(root)


def test_bad_usernames_are_refused_before_anything_exists(hub, docker_client):
    hub.create_user("ok")
    hub.spawn("ok")  # the node is in use, with its directories made
    before = snapshot(hub, docker_client)
    for name in BAD_NAMES:
        r = hub.api("POST", f"/users/{quote(name, safe='')}")
        if r.status_code >= 400:
            continue  # the hub itself refused the name
        with pytest.raises(HubError) as err:
            hub.spawn(quote(name, safe=""))
        assert r.status_code == 201
        assert "cannot be used for a LabVM container" in str(err.value), name
    assert snapshot(hub, docker_client) == before


@pytest.mark.parametrize("options, message", [
    ({"gpus": 99}, "at most 8 GPUs"),
    ({"gpus": -1}, "must not be negative"),
    ({"gpus": "two"}, "whole number"),
    ({"gpus": 1, "gpu_model": "NVIDIA H100"}, "Unknown GPU model"),
    ({"image": "evil"}, "Unknown server option"),
])
def test_bad_options_are_refused(hub, docker_client, options, message):
    hub.create_user("alice")
    with pytest.raises(HubError, match=message):
        hub.spawn("alice", options)
    assert container_of(docker_client, "alice") is None
    assert not (state_dir(hub) / "uppers" / "alice").exists()
    assert mounts_under(state_dir(hub)) == []
