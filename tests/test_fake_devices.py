import os
import stat

import pytest
from support.components import require
from support.fake_devices import make_fake_dev

pytestmark = pytest.mark.needs_root


@pytest.fixture(autouse=True)
def _root():
    require(os.geteuid() == 0, "root (mknod of char devices)")


def _dev(path):
    st = os.stat(path)
    assert stat.S_ISCHR(st.st_mode), f"{path} is not a character device"
    return os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode)


def test_gpu_nodes_are_char_devices_with_nvidia_numbers(tmp_path):
    dev = make_fake_dev(tmp_path)
    assert dev == tmp_path / "dev"
    for n in range(8):
        assert _dev(dev / f"nvidia{n}") == (195, n, 0o666)
    assert not (dev / "nvidia8").exists()


def test_control_nodes(tmp_path):
    dev = make_fake_dev(tmp_path, count=2)
    assert _dev(dev / "nvidiactl") == (195, 255, 0o666)
    assert _dev(dev / "nvidia-modeset") == (195, 254, 0o666)
    uvm_major, uvm_minor, _ = _dev(dev / "nvidia-uvm")
    assert (uvm_major, uvm_minor) == (511, 0)
    assert _dev(dev / "nvidia-uvm-tools")[:2] == (511, 1)
    assert sorted(p.name for p in dev.iterdir()) == sorted(
        ["nvidia0", "nvidia1", "nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools"]
    )


def test_idempotent(tmp_path):
    make_fake_dev(tmp_path, count=1)
    dev = make_fake_dev(tmp_path, count=1)
    assert _dev(dev / "nvidia0") == (195, 0, 0o666)
