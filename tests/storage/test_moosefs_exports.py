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


def _mfsmount_pid(mnt: Path) -> int:
    out = subprocess.run(["pgrep", "-x", "mfsmount", "-a"], capture_output=True, text=True).stdout
    # mfsmount retitles itself "mfsmount (mounted on: MNT)".
    pids = [int(line.split()[0]) for line in out.splitlines() if f"mounted on: {mnt})" in line]
    assert len(pids) == 1, out
    return pids[0]


def test_up_brings_back_a_client_whose_mfsmount_was_killed(moosefs: Path) -> None:
    """A killed mfsmount (or a machine restored from a snapshot) leaves a dead mount.

    Everything on it answers ENOTCONN; ``moosefs.sh up`` must detach it and mount again,
    and the data, which lives in the master and the chunkserver, is all still there.
    """
    from support.components import MOOSEFS_SH

    mnt = MFS_STATE / "mnt"
    kept = moosefs / f"kept-{uuid.uuid4().hex[:6]}"
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.write(fd, b"still here\n")
    os.fsync(fd)
    os.close(fd)
    pid = _mfsmount_pid(mnt)
    os.kill(pid, 9)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        subprocess.run(["sleep", "0.05"])
    try:
        os.stat(mnt)
        dead = False
    except OSError:
        dead = True
    assert dead, "a killed mfsmount should leave a mount that no longer answers"
    st = subprocess.run([str(MOOSEFS_SH), "status", str(MFS_STATE)], capture_output=True, text=True)
    assert st.returncode != 0 and "mount: none" in st.stdout

    up = subprocess.run([str(MOOSEFS_SH), "up", str(MFS_STATE)], capture_output=True, text=True,
                        timeout=300)
    assert up.returncode == 0, up.stderr
    assert "detaching the dead MooseFS mount" in up.stderr
    assert kept.read_text() == "still here\n"
    assert _mfsmount_pid(mnt) != pid
    kept.unlink()
