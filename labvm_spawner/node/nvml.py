"""GPU inventory from NVML, and the device nodes a container needs for its GPUs.

Every NVML call goes through the ``pynvml`` module attributes (never ``from pynvml
import ...``) so tests and the fake hub config can replace them in place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pynvml

log = logging.getLogger(__name__)

# Control nodes a CUDA process opens besides /dev/nvidia<minor>; passed only if present.
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")

# NVML return codes meaning "this host has no usable NVIDIA driver": not an error, no GPUs.
_NO_DRIVER = (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

_logged_no_driver = False


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML index (PCI bus order), what nvidia-smi shows
    minor: int  # /dev/nvidia<minor>; not necessarily equal to index
    uuid: str
    name: str
    memory_total: int  # bytes


class NvmlError(RuntimeError):
    """NVML is present but failed; the GPU inventory cannot be trusted."""


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def read_inventory() -> list[Gpu]:
    """All GPUs NVML reports, by index; [] on a host without an NVIDIA driver."""
    global _logged_no_driver
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        if e.value in _NO_DRIVER:
            if not _logged_no_driver:
                log.info("No NVIDIA driver/NVML on this host (%s); no GPUs to offer", e)
                _logged_no_driver = True
            return []
        raise NvmlError(f"NVML initialisation failed: {e}") from e

    gpus: list[Gpu] = []
    step = "counting GPUs"
    try:
        count = pynvml.nvmlDeviceGetCount()
        for index in range(count):
            step = f"reading GPU {index}"
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(
                Gpu(
                    index=index,
                    minor=int(pynvml.nvmlDeviceGetMinorNumber(handle)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
            )
    except pynvml.NVMLError as e:
        raise NvmlError(f"NVML failed while {step}: {e}") from e
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as e:  # must not hide the inventory or the real error
            log.warning("nvmlShutdown failed: %s", e)
    return gpus


def device_paths(gpus: Iterable[Gpu], dev_root: str = "/dev") -> list[str]:
    """Device nodes for ``gpus``: /dev/nvidia<minor> each, then the control nodes that exist.

    No GPUs means no nodes at all: a container without GPUs gets no nvidiactl either.
    """
    paths: list[str] = []
    for gpu in gpus:
        path = os.path.join(dev_root, f"nvidia{gpu.minor}")
        if path not in paths:
            paths.append(path)
    if not paths:
        return []
    for name in CONTROL_NODES:
        path = os.path.join(dev_root, name)
        if os.path.exists(path):
            paths.append(path)
    return paths
