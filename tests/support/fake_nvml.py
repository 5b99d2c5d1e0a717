"""Fake NVML, replacing only the ``pynvml`` functions LabVM calls.

Everything above the pynvml call boundary (``labvm_spawner.node.nvml`` and the spawner)
runs unchanged. Data comes from a JSON fixture shaped like a real server
(``tests/fixtures/nvml_*.json``).

In a test::

    fake = fake_nvml.install(monkeypatch=monkeypatch)  # undone after the test

From a jupyterhub_config.py running in another process (patches pynvml in place)::

    import sys; sys.path.insert(0, "/path/to/repo/tests")
    from support import fake_nvml; fake_nvml.install()  # $LABVM_FAKE_NVML, else DGX A100

Utilisation, temperature, power and memory use move with wall-clock time (a
smooth wave per GPU), so a monitor polling twice sees different values;
``FakeNvml.clock`` can be replaced to pin the time.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DEFAULT_FIXTURE = FIXTURES / "nvml_dgx_a100.json"
ENV_FIXTURE = "LABVM_FAKE_NVML"

PATCHED = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlSystemGetDriverVersion",
)

MiB = 1024 * 1024


class _Handle:
    """Opaque like a real nvmlDevice_t; only the fake looks inside."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


def _error(name: str) -> pynvml.NVMLError:
    # The real error classes, so callers' except clauses behave exactly as with NVML.
    return pynvml.NVMLError(getattr(pynvml, f"NVML_ERROR_{name}"))


class FakeNvml:
    def __init__(self, fixture: dict[str, Any]) -> None:
        self.fixture = fixture
        self.devices: list[dict[str, Any]] = fixture["devices"]
        self.init_error: str | None = fixture.get("init_error")
        self.driver_version: str = fixture.get("driver_version", "535.154.05")
        self.return_bytes = False  # mimic old pynvml returning bytes for strings
        self.clock = time.time
        self.init_count = 0  # live nvmlInit calls not yet shut down
        self.init_calls = 0
        self.shutdown_calls = 0
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}

    # -- what tests can steer -------------------------------------------------

    def set_processes(self, index: int, processes: list[tuple[int, int]]) -> None:
        """Compute processes on GPU ``index`` as (pid, used_bytes) pairs."""
        self.devices[index]["processes"] = [
            {"pid": pid, "used_memory": used} for pid, used in processes
        ]

    def uninstall(self) -> None:
        for name, value in self._saved.items():
            setattr(pynvml, name, value)
        self._saved.clear()

    # -- helpers --------------------------------------------------------------

    def _str(self, value: str) -> str | bytes:
        return value.encode() if self.return_bytes else value

    def _require_init(self) -> None:
        if self.init_count <= 0:
            raise _error("UNINITIALIZED")

    def _device(self, handle: Any) -> dict[str, Any]:
        self._require_init()
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.devices):
            raise _error("INVALID_ARGUMENT")
        return self.devices[handle.index]

    def _load(self, index: int) -> float:
        """Utilisation 0..1, a slow wave with a different phase per GPU."""
        t = self.clock()
        return 0.5 + 0.5 * math.sin(t / 7.0 + index * 1.3)

    # -- the pynvml functions -------------------------------------------------

    def nvmlInit(self) -> None:
        if self.init_error:
            raise _error(self.init_error)
        with self._lock:
            self.init_count += 1
            self.init_calls += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            self._require_init()
            self.init_count -= 1
            self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._require_init()
        return self._str(self.driver_version)

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._require_init()
        if not 0 <= index < len(self.devices):
            raise _error("INVALID_ARGUMENT")
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes:
        return self._str(self._device(handle)["uuid"])

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        return self._str(self._device(handle)["name"])

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        return int(self._device(handle)["minor"])

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> SimpleNamespace:
        dev = self._device(handle)
        total = int(dev["memory_total"])
        procs = sum(p["used_memory"] for p in dev.get("processes", []))
        # A driver-reserved sliver that breathes a little, plus what processes hold.
        used = min(total, procs + int((4 + 2 * self._load(handle.index)) * MiB))
        return SimpleNamespace(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> SimpleNamespace:
        self._device(handle)
        load = self._load(handle.index)
        return SimpleNamespace(gpu=round(100 * load), memory=round(60 * load))

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        dev = self._device(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error("NOT_SUPPORTED")
        return int(dev.get("idle_temp_c", 32) + 45 * self._load(handle.index))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        """Milliwatts, between idle and the power limit."""
        dev = self._device(handle)
        idle = int(dev.get("idle_power_mw", 60000))
        limit = int(dev.get("power_limit_mw", 400000))
        return int(idle + (limit - idle) * self._load(handle.index))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        dev = self._device(handle)
        return [
            SimpleNamespace(
                pid=p["pid"],
                usedGpuMemory=p["used_memory"],
                gpuInstanceId=0xFFFFFFFF,  # what NVML reports without MIG
                computeInstanceId=0xFFFFFFFF,
            )
            for p in dev.get("processes", [])
        ]


def load_fixture(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    if path is None:
        path = os.environ.get(ENV_FIXTURE) or DEFAULT_FIXTURE
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = FIXTURES / path  # allow bare fixture names such as "nvml_mixed_a100_a6000.json"
    return json.loads(path.read_text())


def install_with_process_file(process_file: str | os.PathLike[str],
                              fixture_path: str | os.PathLike[str] | None = None) -> FakeNvml:
    """``install`` for a whole process (a hub service, a node agent), whose GPU processes
    come from a JSON file a test writes ({"<gpu index>": [[pid, bytes]]}), so that real
    container PIDs can be put on fake GPUs; read again at every listing."""
    fake = install(fixture_path)
    listing = pynvml.nvmlDeviceGetComputeRunningProcesses

    def processes(handle: Any) -> Any:
        try:
            with open(process_file) as f:
                wanted = json.load(f)
        except (OSError, ValueError):
            wanted = {}
        fake.set_processes(handle.index, wanted.get(str(handle.index), []))
        return listing(handle)

    pynvml.nvmlDeviceGetComputeRunningProcesses = processes
    return fake


def install(
    fixture_path: str | os.PathLike[str] | None = None, monkeypatch: Any = None
) -> FakeNvml:
    """Replace the pynvml functions LabVM uses with fakes serving ``fixture_path``.

    With ``monkeypatch`` (pytest) the patch is undone after the test; without it the
    ``pynvml`` module is patched in place for the life of the process (hub config use).
    """
    fake = FakeNvml(load_fixture(fixture_path))
    for name in PATCHED:
        replacement = getattr(fake, name)
        if monkeypatch is not None:
            monkeypatch.setattr(pynvml, name, replacement)
        else:
            fake._saved.setdefault(name, getattr(pynvml, name))
            setattr(pynvml, name, replacement)
    return fake
