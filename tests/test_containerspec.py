"""The container spec: what a container may touch, read without a Docker engine."""

from pathlib import Path

from labvm_spawner.node import containerspec
from labvm_spawner.node.nvml import Gpu
from labvm_spawner.policy import Limits

GPUS = [Gpu(index=2, minor=2, uuid="GPU-aaa", name="A100", memory_total=1),
        Gpu(index=5, minor=5, uuid="GPU-bbb", name="A100", memory_total=1)]


def spec(**kw) -> dict:
    base = dict(
        name="labvm-alice", image="labvm/user:latest", key="alice", username="alice",
        merged=Path("/var/lib/labvm/mnt/alice"), top_dirs=["etc", "home", "usr", "var"],
        cmd=["jupyterhub-singleuser"],
        env={"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "JUPYTERHUB_USER": "alice"},
        limits=Limits(cpus=1.5, mem_bytes=2 << 30, pids=512, blkio_weight=None,
                      io_read_bps=None, io_write_bps=100 << 20),
        gpus=GPUS, device_paths=["/dev/nvidia2", "/dev/nvidia5", "/dev/nvidiactl"],
        io_device="/dev/vda", secrets_dir=Path("/run/labvm/secrets/alice"),
        init_path="/usr/bin/docker-init",
    )
    base.update(kw)
    return containerspec.build(containerspec.ServerSpec(**base))


def test_no_privilege_and_only_the_needed_capabilities():
    s = spec()
    assert s["cap_drop"] == ["ALL"]
    assert set(s["cap_add"]) == set(containerspec.CAPABILITIES)
    assert not {"SYS_ADMIN", "MKNOD", "NET_RAW", "NET_ADMIN"} & set(s["cap_add"])
    assert "privileged" not in s
    assert s["read_only"] is True
    assert not any("docker.sock" in src for src in s["volumes"])


def test_overlay_directories_are_bound_and_ephemeral_ones_are_tmpfs():
    s = spec()
    binds = {v["bind"]: src for src, v in s["volumes"].items()}
    assert binds["/etc"] == "/var/lib/labvm/mnt/alice/etc"
    assert binds["/usr"] == "/var/lib/labvm/mnt/alice/usr"
    assert binds["/.labvm/secrets"] == "/run/labvm/secrets/alice"
    assert s["volumes"]["/run/labvm/secrets/alice"]["mode"] == "ro"
    assert set(s["tmpfs"]) >= {"/tmp", "/run"}


def test_gpu_variables_follow_the_allocation_whatever_was_configured():
    s = spec()
    assert s["environment"]["CUDA_VISIBLE_DEVICES"] == "GPU-aaa,GPU-bbb"
    assert s["environment"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-aaa,GPU-bbb"
    assert s["devices"] == ["/dev/nvidia2:/dev/nvidia2:rwm", "/dev/nvidia5:/dev/nvidia5:rwm",
                            "/dev/nvidiactl:/dev/nvidiactl:rwm"]
    none = spec(gpus=[], device_paths=[])
    assert none["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert none["environment"]["NVIDIA_VISIBLE_DEVICES"] == "none"
    assert none["devices"] == []


def test_device_request_only_with_the_nvidia_runtime():
    assert "device_requests" not in spec()
    req = spec(nvidia_runtime=True)["device_requests"][0]
    assert req["Driver"] == "nvidia" and req["DeviceIDs"] == ["GPU-aaa", "GPU-bbb"]


def test_limits():
    s = spec()
    assert s["nano_cpus"] == 1_500_000_000
    assert s["mem_limit"] == s["memswap_limit"] == 2 << 30
    assert s["pids_limit"] == 512
    assert s["device_write_bps"] == [{"Path": "/dev/vda", "Rate": 100 << 20}]
    assert "device_read_bps" not in s


def test_the_bound_runtime_holds_the_entrypoint():
    # A missing bind source is made empty by dockerd, and every container dies at start.
    s = spec()
    runtime = [src for src, v in s["volumes"].items() if v["bind"] == "/.labvm/runtime"]
    assert len(runtime) == 1
    assert (Path(runtime[0]) / "entrypoint.sh").is_file()
    assert s["entrypoint"][-1] == "/.labvm/runtime/entrypoint.sh"
