"""Resource limits per user, with group overrides, enforced by the kernel and shown on the form."""

import re

import pytest
from support.helpers import container_of, sh

pytestmark = pytest.mark.e2e

GiB = 1024**3


def test_limits_in_force_and_group_override(hub, docker_client):
    hub.create_user("alice")
    hub.create_user("gina", groups=["big"])
    hub.spawn("alice")
    hub.spawn("gina")
    alice, gina = container_of(docker_client, "alice"), container_of(docker_client, "gina")

    assert alice.attrs["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert gina.attrs["HostConfig"]["NanoCpus"] == 2_000_000_000
    assert alice.attrs["HostConfig"]["PidsLimit"] == 1024
    assert alice.attrs["HostConfig"]["BlkioDeviceWriteBps"][0]["Rate"] == 200 * 1024**2
    # What the kernel enforces, read from inside the container.
    assert sh(alice, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes") == (0, f"{GiB}\n")
    assert sh(gina, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes") == (0, f"{2 * GiB}\n")
    assert sh(alice, "cat /sys/fs/cgroup/pids/pids.max") == (0, "1024\n")


def test_spawn_form_shows_limits_and_gpu_choice(hub):
    hub.create_user("alice")
    s = hub.login("alice")
    page = s.get(f"{hub.url}/hub/spawn").text
    assert 'name="gpus"' in page
    # 8 free GPUs, policy allows 8: counts 0..8 are offered.
    assert re.findall(r'<option value="(\d+)"', page)[:9] == [str(i) for i in range(9)]
    assert "1 GiB" in page or "1.0 GiB" in page, page
    assert "1024" in page
