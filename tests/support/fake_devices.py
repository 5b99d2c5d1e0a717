"""Real character-device nodes laid out like an NVIDIA host's /dev (needs root for mknod).

The nodes are genuine (``stat`` shows them as char devices with NVIDIA's numbers), so
code that inspects or bind-mounts /dev/nvidia* sees what it would on a GPU host;
opening them fails as there is no driver behind them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

NVIDIA_MAJOR = 195  # fixed by the NVIDIA driver
UVM_MAJOR = 511  # dynamic on real hosts; any free major will do here

# name -> (major, minor) besides the per-GPU nvidia<N> nodes
CONTROL = {
    "nvidiactl": (NVIDIA_MAJOR, 255),
    "nvidia-modeset": (NVIDIA_MAJOR, 254),
    "nvidia-uvm": (UVM_MAJOR, 0),
    "nvidia-uvm-tools": (UVM_MAJOR, 1),
}


def _mknod(path: Path, major: int, minor: int) -> None:
    if path.exists():
        path.unlink()
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    os.chmod(path, 0o666)  # mknod's mode is filtered by the umask


def make_fake_dev(root: Path, count: int = 8) -> Path:
    """Create ``root/dev`` with nvidia0..nvidia<count-1> and the control nodes; return it."""
    dev = Path(root) / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    for minor in range(count):
        _mknod(dev / f"nvidia{minor}", NVIDIA_MAJOR, minor)
    for name, (major, minor) in CONTROL.items():
        _mknod(dev / name, major, minor)
    return dev
