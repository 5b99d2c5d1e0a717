"""Live GPU figures from NVML.

Calls go through ``pynvml`` module attributes (as in ``labvm_spawner.nvml``) so the
fake NVML of the tests replaces them in place. NVML stays initialised between samples:
nvmlInit is the expensive call, the per-device queries are cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pynvml

log = logging.getLogger(__name__)

_NO_DRIVER = (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED)


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    util: float  # percent
    mem_util: float  # percent of time the memory was read or written
    mem_used: int  # bytes
    mem_total: int
    temp_c: float
    power_w: float
    processes: tuple[tuple[int, int], ...]  # (host pid, used bytes)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(call, *args, default=0):  # type: ignore[no-untyped-def]
    # Some boards do not report every field (NOT_SUPPORTED); a sample must not fail for it.
    try:
        return call(*args)
    except pynvml.NVMLError:
        return default


class GpuSampler:
    """Reads every GPU of the node; an empty list on a host without an NVIDIA driver."""

    def __init__(self) -> None:
        self._ready = False
        self._no_driver = False
        self._static: dict[int, tuple[str, str]] = {}  # index -> (uuid, name)

    def _init(self) -> bool:
        if self._ready:
            return True
        if self._no_driver:
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            if e.value in _NO_DRIVER:
                log.info("No NVIDIA driver on this host; no GPU figures")
                self._no_driver = True
                return False
            raise
        self._ready = True
        return True

    def close(self) -> None:
        if self._ready:
            self._ready = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as e:
                log.warning("nvmlShutdown failed: %s", e)

    def read(self) -> list[GpuReading]:
        if not self._init():
            return []
        try:
            return [self._read_one(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as e:
            # A GPU fell off the bus or the driver was reloaded: start over next time.
            log.warning("NVML read failed: %s", e)
            self.close()
            self._static.clear()
            return []

    def _read_one(self, index: int) -> GpuReading:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        if index not in self._static:
            self._static[index] = (_text(pynvml.nvmlDeviceGetUUID(h)),
                                   _text(pynvml.nvmlDeviceGetName(h)))
        uuid, name = self._static[index]
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        rates = _optional(pynvml.nvmlDeviceGetUtilizationRates, h, default=None)
        procs = _optional(pynvml.nvmlDeviceGetComputeRunningProcesses, h, default=[])
        return GpuReading(
            index=index,
            uuid=uuid,
            name=name,
            util=float(rates.gpu) if rates is not None else 0.0,
            mem_util=float(rates.memory) if rates is not None else 0.0,
            mem_used=int(mem.used),
            mem_total=int(mem.total),
            temp_c=float(_optional(pynvml.nvmlDeviceGetTemperature, h,
                                   pynvml.NVML_TEMPERATURE_GPU)),
            power_w=_optional(pynvml.nvmlDeviceGetPowerUsage, h) / 1000.0,
            processes=tuple((int(p.pid), int(p.usedGpuMemory or 0)) for p in procs),
        )
