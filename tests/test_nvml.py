import ctypes
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest
from support import fake_nvml
from support.fake_devices import make_fake_dev

from labvm_spawner.node import nvml
from labvm_spawner.node.nvml import Gpu, NvmlError, device_paths, read_inventory

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
MIXED = FIXTURES / "nvml_mixed_a100_a6000.json"


@pytest.fixture(autouse=True)
def _fresh_log_once(monkeypatch):
    monkeypatch.setattr(nvml, "_logged_no_driver", False)


def _has_real_nvml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_dgx_inventory(monkeypatch):
    fake = fake_nvml.install(monkeypatch=monkeypatch)
    gpus = read_inventory()
    assert len(gpus) == 8
    assert [g.index for g in gpus] == list(range(8))
    assert [g.minor for g in gpus] == list(range(8))
    assert {g.name for g in gpus} == {"NVIDIA A100-SXM4-80GB"}
    assert {g.memory_total for g in gpus} == {85899345920}
    assert len({g.uuid for g in gpus}) == 8
    for g in gpus:
        assert g.uuid.startswith("GPU-") and len(g.uuid) == 40, g.uuid
    # What NVML said, in order, and the library was shut down again.
    fixture = json.loads((FIXTURES / "nvml_dgx_a100.json").read_text())
    assert [g.uuid for g in gpus] == [d["uuid"] for d in fixture["devices"]]
    assert fake.init_calls == fake.shutdown_calls == 1
    assert fake.init_count == 0


def test_bytes_returns_are_decoded(monkeypatch):
    fake = fake_nvml.install(monkeypatch=monkeypatch)
    fake.return_bytes = True  # as older pynvml releases return
    pynvml.nvmlInit()
    assert (
        pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)) == b"NVIDIA A100-SXM4-80GB"
    )
    pynvml.nvmlShutdown()
    gpus = read_inventory()
    assert gpus[0].name == "NVIDIA A100-SXM4-80GB"
    assert isinstance(gpus[0].uuid, str) and gpus[0].uuid.startswith("GPU-")


def test_mixed_inventory_keeps_minor_separate_from_index(monkeypatch):
    fake_nvml.install(MIXED, monkeypatch=monkeypatch)
    gpus = read_inventory()
    assert [(g.index, g.minor) for g in gpus][:2] == [(0, 4), (1, 5)]
    assert [g.name for g in gpus].count("NVIDIA RTX A6000") == 4
    assert [g.name for g in gpus].count("NVIDIA A100 80GB PCIe") == 4
    a6000 = next(g for g in gpus if g.name == "NVIDIA RTX A6000")
    assert a6000.memory_total == 51527024640


def test_no_driver_gives_no_gpus_and_logs_once(monkeypatch, caplog):
    fake_nvml.install(FIXTURES / "nvml_no_driver.json", monkeypatch=monkeypatch)
    with caplog.at_level(logging.INFO, logger="labvm_spawner.node.nvml"):
        assert read_inventory() == []
        assert read_inventory() == []
    msgs = [r for r in caplog.records if r.name == "labvm_spawner.node.nvml"]
    assert len(msgs) == 1
    assert msgs[0].levelno == logging.INFO
    assert "No NVIDIA driver" in msgs[0].getMessage()


def test_driver_not_loaded_gives_no_gpus(monkeypatch):
    fake = fake_nvml.install(monkeypatch=monkeypatch)
    fake.init_error = "DRIVER_NOT_LOADED"
    assert read_inventory() == []


@pytest.mark.skipif(_has_real_nvml(), reason="host has a real NVIDIA driver")
def test_real_pynvml_without_driver_gives_no_gpus():
    # No fake: the real pynvml fails to load libnvidia-ml here.
    assert read_inventory() == []


@pytest.mark.skipif(not _has_real_nvml(), reason="no NVIDIA driver on this host")
def test_real_pynvml_with_driver():
    gpus = read_inventory()
    assert all(g.uuid.startswith(("GPU-", "MIG-")) and g.memory_total > 0 for g in gpus)


def test_other_nvml_error_raises_clearly_and_shuts_down(monkeypatch):
    fake = fake_nvml.install(monkeypatch=monkeypatch)

    def lost(handle):
        if handle.index == 3:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return fake.devices[handle.index]["uuid"]

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lost)
    with pytest.raises(NvmlError, match="reading GPU 3: GPU is lost"):
        read_inventory()
    assert fake.init_count == 0  # nvmlShutdown still ran


def test_init_error_other_than_no_driver_raises(monkeypatch):
    fake = fake_nvml.install(monkeypatch=monkeypatch)
    fake.init_error = "NO_PERMISSION"
    with pytest.raises(NvmlError, match="initialisation failed: Insufficient Permissions"):
        read_inventory()


def test_fake_requires_init_like_nvml(monkeypatch):
    fake_nvml.install(monkeypatch=monkeypatch)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_monitoring_values_move_over_time(monkeypatch):
    fake = fake_nvml.install(monkeypatch=monkeypatch)
    fake.set_processes(2, [(4242, 10 * 2**30)])
    now = [1_700_000_000.0]
    fake.clock = lambda: now[0]
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(2)

        def sample():
            return (
                pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
                pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                pynvml.nvmlDeviceGetPowerUsage(h),
            )

        seen = []
        for _ in range(5):
            seen.append(sample())
            now[0] += 3
        for util, temp, power in seen:
            assert 0 <= util <= 100
            assert 20 <= temp <= 90
            assert 60_000 <= power <= 400_000  # milliwatts, idle..TDP of an A100 SXM4
        assert len(set(seen)) > 1
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        assert [(p.pid, p.usedGpuMemory) for p in procs] == [(4242, 10 * 2**30)]
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        assert mem.used >= 10 * 2**30 and mem.free == mem.total - mem.used
        other = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert pynvml.nvmlDeviceGetComputeRunningProcesses(other) == []
    finally:
        pynvml.nvmlShutdown()


def test_install_in_place_from_another_process(tmp_path):
    # As a jupyterhub_config.py would: no monkeypatch, fixture from $LABVM_FAKE_NVML.
    script = (
        "import json\nfrom support import fake_nvml\n"
        "fake_nvml.install()\n"
        "from labvm_spawner.node.nvml import read_inventory\n"
        "print(json.dumps([[g.index, g.minor, g.name] for g in read_inventory()]))\n"
    )
    env = dict(os.environ, LABVM_FAKE_NVML=str(MIXED))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    gpus = json.loads(out.stdout)
    assert len(gpus) == 8
    assert gpus[0] == [0, 4, "NVIDIA A100 80GB PCIe"]
    assert gpus[7] == [7, 3, "NVIDIA RTX A6000"]


def test_uninstall_restores_pynvml():
    real = pynvml.nvmlInit
    fake = fake_nvml.install()
    try:
        assert pynvml.nvmlInit != real
    finally:
        fake.uninstall()
    assert pynvml.nvmlInit is real


def test_device_paths_use_minor_and_existing_control_nodes(tmp_path):
    dev = make_fake_dev(tmp_path, count=8)
    (dev / "nvidia-modeset").unlink()  # not every host has it
    gpus = [
        Gpu(index=0, minor=4, uuid="GPU-a", name="x", memory_total=1),
        Gpu(index=1, minor=5, uuid="GPU-b", name="x", memory_total=1),
    ]
    assert device_paths(gpus, dev_root=str(dev)) == [
        f"{dev}/nvidia4",
        f"{dev}/nvidia5",
        f"{dev}/nvidiactl",
        f"{dev}/nvidia-uvm",
        f"{dev}/nvidia-uvm-tools",
    ]
    for p in device_paths(gpus, dev_root=str(dev)):
        assert Path(p).exists()


def test_device_paths_without_gpus_is_empty(tmp_path):
    dev = make_fake_dev(tmp_path, count=2)
    assert device_paths([], dev_root=str(dev)) == []


def test_device_paths_from_fake_inventory(monkeypatch, tmp_path):
    fake_nvml.install(monkeypatch=monkeypatch)
    dev = make_fake_dev(tmp_path)
    paths = device_paths(read_inventory()[6:], dev_root=str(dev))
    assert paths[:2] == [f"{dev}/nvidia6", f"{dev}/nvidia7"]
    assert f"{dev}/nvidia-modeset" in paths
