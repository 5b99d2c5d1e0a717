"""The MooseFS the project sets up lets in only its own address, with the password.

A client on another address of the storage network (a container, say, had the
network policy failed) or without the password is refused by the master.
"""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from pathlib import Path

from support.components import MFS_STATE

MASTER = "10.77.0.1"
OPTS = "mfsattrcacheto=0"


def _mount(mnt: Path, password: Path | None = None,
           netns: str | None = None) -> subprocess.CompletedProcess:
    """mfsmount, with the password from a file on stdin (-p) as the project's scripts do."""
    cmd = ["mfsmount", str(mnt), "-H", MASTER, "-o", OPTS] + (["-p"] if password else [])
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    stdin = open(password) if password else subprocess.DEVNULL
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=stdin)
    finally:
        if password:
            stdin.close()


def _umount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_only_the_listed_address_with_the_password_mounts(tmp_path: Path, moosefs: Path) -> None:
    password = MFS_STATE / "mfs.password"
    st = password.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    exports = (MFS_STATE / "mfsexports.cfg").read_text()
    assert password.read_text().strip() not in exports  # only its MD5 is there
    mnt = tmp_path / "m"
    mnt.mkdir()
    try:
        # No password, or a wrong one, from the allowed address: refused.
        assert _mount(mnt).returncode != 0 and not os.path.ismount(mnt)
        (tmp_path / "wrong").write_text("not-the-password\n")
        assert _mount(mnt, tmp_path / "wrong").returncode != 0
        # The right password from the allowed address works.
        ok = _mount(mnt, password)
        assert ok.returncode == 0 and os.path.ismount(mnt), ok.stderr
    finally:
        _umount(mnt)

    # The right password from another address on the storage network: refused.
    ns = f"labvm-x{uuid.uuid4().hex[:5]}"
    veth = f"lvx{uuid.uuid4().hex[:5]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                        "netns", ns], check=True)
        subprocess.run(["ip", "link", "set", veth, "master", "labvmmfs0", "up"], check=True)
        for cmd in (["ip", "addr", "add", "10.77.0.77/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        other = tmp_path / "other"
        other.mkdir()
        try:
            r = _mount(other, password, netns=ns)
            assert r.returncode != 0, r.stdout + r.stderr
        finally:
            _umount(other)
    finally:
        subprocess.run(["ip", "link", "del", veth], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)
