"""GPUs on a machine without one: NVML faked at the pynvml boundary, /dev/nvidiaN made by mknod."""

import time

import pytest
from support.helpers import FIXTURES, container_of, fixture_uuids, mounts_under, sh, state_dir
from support.hubharness import HubError

pytestmark = pytest.mark.e2e

CONTROL = {"nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools"}


def nvidia_nodes(container) -> set[str]:
    _, out = sh(container, "ls /dev")
    return {n for n in out.split() if n.startswith("nvidia")}


def test_each_container_sees_exactly_its_own_gpus(hub, docker_client):
    uuids = fixture_uuids()
    hub.create_user("bob")
    hub.create_user("carol")

    hub.spawn("bob", {"gpus": 5})
    bob = container_of(docker_client, "bob")
    assert nvidia_nodes(bob) == {f"nvidia{i}" for i in range(5)} | CONTROL
    _, env = sh(bob, "cat /proc/1/environ | tr '\\0' '\\n' | grep VISIBLE_DEVICES | sort",
                root=True)
    assert env.split() == [f"CUDA_VISIBLE_DEVICES={','.join(uuids[:5])}",
                           f"NVIDIA_VISIBLE_DEVICES={','.join(uuids[:5])}"]
    # Setting the variables wider changes nothing: the nodes are not there, and even
    # root cannot make them.
    _, out = sh(bob, "CUDA_VISIBLE_DEVICES=all NVIDIA_VISIBLE_DEVICES=all ls /dev/nvidia7")
    assert "No such file" in out
    rc, _ = sh(bob, "sudo -n mknod /tmp/nvidia7 c 195 7")
    assert rc != 0

    # Carol asks for more than are free: a clear message, and nothing held or made.
    with pytest.raises(HubError, match=r"4 GPUs .*requested.* only 3"):
        hub.spawn("carol", {"gpus": 4})
    assert container_of(docker_client, "carol") is None
    assert mounts_under(state_dir(hub) / "mnt" / "carol") == []

    hub.spawn("carol", {"gpus": 3})
    assert nvidia_nodes(container_of(docker_client, "carol")) == \
        {"nvidia5", "nvidia6", "nvidia7"} | CONTROL

    # Stopping frees the GPUs for the next user.
    hub.unspawn("bob")
    hub.unspawn("carol")
    hub.spawn("carol", {"gpus": 8})
    assert nvidia_nodes(container_of(docker_client, "carol")) == \
        {f"nvidia{i}" for i in range(8)} | CONTROL


def test_gpus_of_a_crashed_hub_are_reconciled(hub, docker_client):
    hub.create_user("bob")
    hub.create_user("carol")
    hub.spawn("bob", {"gpus": 6})
    # The hub dies, and bob's container with it (say, the node rebooted).
    hub.stop(kill=True)
    container_of(docker_client, "bob").remove(force=True)
    hub.start()
    hub.spawn("carol", {"gpus": 8})
    assert len(nvidia_nodes(container_of(docker_client, "carol")) - CONTROL) == 8


@pytest.mark.parametrize("breakage", ["cmd", "image"])
def test_failed_start_leaves_nothing_behind(hub_factory, docker_client, breakage):
    """A server that fails after GPUs, root and secrets were set up leaves none of them."""
    hub = hub_factory(env={"LABVM_TEST_BROKEN_USER": "broken", "LABVM_TEST_BREAKAGE": breakage})
    hub.create_user("broken")
    with pytest.raises(HubError) as err:
        hub.spawn("broken", {"gpus": 8})
    expected = {"cmd": "stopped while starting", "image": "no-such-image"}[breakage]
    assert expected in str(err.value)
    # The hub gives up on a server that never answers after http_timeout (30 s here).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (hub.api("GET", "/users/broken").json()["servers"]
                                           or container_of(docker_client, "broken")):
        time.sleep(0.5)
    assert container_of(docker_client, "broken") is None
    assert mounts_under(state_dir(hub) / "mnt") == []
    assert not (state_dir(hub) / "secrets" / "broken").exists()
    hub.create_user("next")
    hub.spawn("next", {"gpus": 8})  # all 8 GPUs were released


def test_model_choice_on_a_mixed_node(hub_factory, docker_client):
    """Two models: the user picks one; the container gets that model's device nodes."""
    mixed = str(FIXTURES / "nvml_mixed_a100_a6000.json")
    hub = hub_factory(env={"LABVM_FAKE_NVML": mixed})
    hub.create_user("hana")
    hub.spawn("hana", {"gpus": 2, "gpu_model": "NVIDIA RTX A6000"})
    # NVML index 4 and 5 are the first two A6000s; their device minors are 0 and 1.
    assert nvidia_nodes(container_of(docker_client, "hana")) == {"nvidia0", "nvidia1"} | CONTROL


def test_hub_killed_mid_start_leaks_nothing(hub, docker_client):
    """kill -9 of the hub right after it allocated GPUs: after a restart nothing is held."""
    hub.create_user("bob")
    hub.create_user("carol")
    r = hub.api("POST", "/users/bob/server", json={"gpus": 8})
    assert r.status_code == 202, r.text
    with hub.api("GET", "/users/bob/server/progress", stream=True) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if "Allocated GPU" in line:
                break
    hub.stop(kill=True)
    hub.start()
    # The restarted hub finds bob's start unfinished and cleans up after it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
            hub.api("GET", "/users/bob").json()["servers"] or container_of(docker_client, "bob")
            or mounts_under(state_dir(hub) / "mnt")):
        time.sleep(0.5)
    assert container_of(docker_client, "bob") is None
    assert mounts_under(state_dir(hub) / "mnt") == []
    hub.spawn("carol", {"gpus": 8})
