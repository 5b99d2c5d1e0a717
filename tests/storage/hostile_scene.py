"""A hostile tenant against the real storage code, in a scene that cannot harm this machine.

Run by tests/storage/test_hostile.py as ``unshare --mount --propagation private python
hostile_scene.py PHASE``. Inside that private mount namespace every mount is first
remounted read-only (a regression then fails with EROFS instead of writing to the
host), and the whole scene lives on a tmpfs at /mnt:

    /mnt/canary/    stands in for /etc and other host files; must stay byte-identical
    /mnt/lower/     the layer below (an image)
    /mnt/upper/     the overlay upper, /mnt/work, /mnt/merged the real overlay mount
    /mnt/store/     the layer store

The attacker is a process chrooted into the overlay mount, as root is in its container.
It never follows a symlink itself (every path is opened component by component with
O_NOFOLLOW). Its symlinks point at the canary, into the store, or climb out with
``../``. Each phase prints one JSON line of facts; the test asserts on them.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import treeops

from labvm_spawner.storage.sync import UpperSync

SCENE = Path("/mnt")
CANARY = SCENE / "canary"
LOWER, UPPER, WORK, MERGED = (SCENE / n for n in ("lower", "upper", "work", "merged"))
STORE = SCENE / "store"
KEY = "alice"
TOKEN = "LABVM-CANARY-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
PY = sys.executable
CLI = [PY, "-m", "labvm_spawner.cli", "storage"]

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
_KEEP_RW = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "nsfs", "bpf",
            "tracefs", "debugfs", "securityfs", "pstore", "configfs", "fusectl", "binfmt_misc"}


# ---- the scene ------------------------------------------------------------------------------

def lockdown() -> int:
    """Remount every mount of this (private) namespace read-only; returns how many."""
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split(" - ")[1].split()[0]) for line in f]
    done = 0
    for mp, fstype in sorted(mounts, key=lambda m: m[0].count("/")):
        if fstype in _KEEP_RW:
            continue
        mp = mp.encode().decode("unicode_escape")
        rc = _libc.mount(None, mp.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        if rc != 0 and mp == "/":
            raise OSError(ctypes.get_errno(), "cannot remount / read-only")
        done += rc == 0
    probe = Path("/labvm-hostile-probe")
    try:
        probe.touch()
    except OSError as e:
        assert e.errno == 30, e  # EROFS
    else:
        probe.unlink()
        raise AssertionError("/ is still writable in the scene's namespace")
    return done


def build_scene() -> dict:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0755", "labvm-scene",
                    str(SCENE)], check=True)
    (CANARY / "sub").mkdir(parents=True)
    for rel in ("passwd", "ld.so.preload", "shadow", "sub/authorized_keys"):
        (CANARY / rel).write_text(f"{TOKEN} {rel}\n")
    for rel in ("home/alice/.profile", "etc/motd", "etc/issue", "usr/bin/tool"):
        (LOWER / rel).parent.mkdir(parents=True, exist_ok=True)
        (LOWER / rel).write_text(f"lower {rel}\n")
    for d in (UPPER, WORK, MERGED, STORE):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "labvm-scene-root", "-o",
                    f"lowerdir={LOWER},upperdir={UPPER},workdir={WORK},{treeops.OVERLAY_OPTS}",
                    str(MERGED)], check=True)
    return treeops.snapshot(CANARY)


# ---- the attacker ---------------------------------------------------------------------------

NAMES = ["z", "L", "M", "P", "ld.so.preload", "passwd"]
TOPS = ["home/alice", "home/alice", "home/alice", "etc", "z"]
# Where its symlinks point: the canary as the host sees it, the store, and climbs out
# of the mirror (<store>/alice/upper-sync/...) or the upper towards the canary.
TARGETS = [str(CANARY), str(CANARY / "sub"), str(CANARY / "passwd"), str(STORE),
           str(STORE / KEY), str(STORE / KEY / "versions"), "/", ".", "z", "M", "z/z/z/M",
           "z/M", "../P", "../../P", "../../../P", "L/ld.so.preload"]
TARGETS += ["../" * k + "canary" for k in range(1, 7)]
TARGETS += ["../" * k + "mnt/canary/sub" for k in range(1, 7)]


def _path(rnd: random.Random) -> str:
    parts = [rnd.choice(TOPS)] + [rnd.choice(NAMES) for _ in range(rnd.randint(0, 3))]
    return "/".join(parts)


def attack_op(rnd: random.Random) -> tuple:
    kind = rnd.choice(["mkdir", "mkdir", "write", "write", "write", "rmtree", "unlink",
                       "rename", "symlink", "symlink", "swap", "swap", "link", "chmod",
                       "mkfifo", "setxattr"])
    p = _path(rnd)
    if kind == "write":
        return ("write", p, rnd.randbytes(rnd.choice([0, 5, 700, 70_000])))
    if kind == "mkdir":
        return ("mkdir", p, rnd.choice([0o755, 0o700, 0o1777]))
    if kind in ("rename", "link"):
        return (kind, p, _path(rnd))
    if kind == "symlink":
        return ("symlink", rnd.choice(TARGETS), p)
    if kind == "swap":
        return ("swap", p, rnd.choice(TARGETS))
    if kind == "chmod":
        return ("chmod", p, rnd.choice([0o644, 0o4755, 0o600]))
    if kind == "setxattr":
        return ("setxattr", p, "user.k", rnd.randbytes(8))
    return (kind, p)


def apply_attack(root: Path, o: tuple) -> None:
    """One attacker step; "swap" turns a directory into a symlink or back."""
    if o[0] != "swap":
        treeops.apply_op(root, o)
        return
    try:
        fd, name = treeops.open_parent(root, o[1])
    except OSError:
        return
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            aside = f"{name}.old{random.randrange(1 << 30)}"
            os.rename(name, aside, src_dir_fd=fd, dst_dir_fd=fd)
            os.symlink(o[2], name, dir_fd=fd)
            shutil.rmtree(aside, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
            os.mkdir(name, 0o755, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def attacker(ops: list[tuple], pause: float) -> int:
    """Fork a process chrooted into the overlay mount that runs ``ops``; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        os.chroot(MERGED)
        os.chdir("/")
        rnd = random.Random(len(ops))
        for o in ops:
            apply_attack(Path("/"), o)
            if pause and rnd.random() < 0.3:
                time.sleep(rnd.random() * pause)
    except BaseException:  # noqa: BLE001 - report through the exit code
        code = 1
    os._exit(code)


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# ---- checks ---------------------------------------------------------------------------------

def leaks(root: Path) -> list[str]:
    """Files under ``root`` holding the canary's token: host content copied in."""
    found = []
    for rel, v in treeops.snapshot(root).items():
        if v[0] == stat.S_IFREG:
            fd, name = treeops.open_parent(root, rel)
            try:
                f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                with os.fdopen(f, "rb") as fh:
                    if TOKEN.encode() in fh.read():
                        found.append(rel)
            finally:
                os.close(fd)
    return found


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def mirror_matches_upper() -> str:
    want, got = treeops.snapshot(UPPER), treeops.snapshot(STORE / KEY / "upper-sync")
    return "" if want == got else treeops.diff(want, got)


# ---- phases ---------------------------------------------------------------------------------

def phase_exploit(canary_before: dict) -> dict:
    """The security review's exploit, step by step against the real UpperSync, in journal
    and in rescan mode, with the canary standing in for /etc."""
    out = {}
    for mode in ("journal", "rescan"):
        home = f"home/alice/{mode}"
        steps1 = [("mkdir", f"{home}/z", 0o755), ("mkdir", f"{home}/z/z", 0o755),
                  ("mkdir", f"{home}/z/z/z", 0o755), ("mkdir", f"{home}/L", 0o755),
                  ("mkdir", f"{home}/P", 0o755), ("symlink", str(CANARY), f"{home}/z/z/z/M")]
        steps2 = [("write", f"{home}/L/ld.so.preload", b""), ("rmtree", f"{home}/L"),
                  ("symlink", "z/z/z/M", f"{home}/L"),
                  ("write", f"{home}/P/ld.so.preload", b"/path/to/evil.so\n"),
                  ("unlink", f"{home}/z/z/z/M"), ("symlink", "../../../P", f"{home}/z/z/z/M")]
        (MERGED / "home/alice" / mode).mkdir(parents=True, exist_ok=True)
        syncer = UpperSync(UPPER, STORE / KEY / "upper-sync", journal=mode == "journal")
        try:
            syncer.sync()
            _run_in_chroot(steps1)
            syncer.sync()
            _run_in_chroot(steps2)
            s2 = syncer.sync()
            s3 = syncer.sync()
        finally:
            syncer.close()
        out[mode] = {"errors": s2.errors + s3.errors, "mirror_diff": mirror_matches_upper()}
    out["canary_same"] = treeops.snapshot(CANARY) == canary_before
    out["leaks"] = leaks(STORE)
    return out


def _run_in_chroot(ops: list[tuple]) -> None:
    assert wait(attacker(ops, 0)) == 0


def phase_journal_walk(canary_before: dict) -> dict:
    """mkdir L; rmdir L; ln -s <host dir> L, all before the journal reads the events: the
    journal must not watch (or report, or copy) anything of the host directory."""
    host = SCENE / "hostdir"  # a host directory the test itself changes afterwards
    (host / "deep").mkdir(parents=True)
    syncer = UpperSync(UPPER, STORE / KEY / "upper-sync", journal=True)
    try:
        _run_in_chroot([("write", "home/alice/.keep", b"")])  # home/alice is watched
        syncer.sync()
        watches_before = len(syncer.journal._watches)
        _run_in_chroot([("mkdir", "home/alice/W", 0o755), ("rmtree", "home/alice/W"),
                        ("symlink", str(host), "home/alice/W")])
        stats = syncer.sync()
        watches_after = len(syncer.journal._watches)
        # What happens in the host directory afterwards must not be seen as the user's.
        probe = host / "deep" / f"probe-{os.getpid()}"
        probe.write_text(TOKEN)
        changes = syncer.journal.take()
        syncer.journal._pending = changes  # hand them to the next sync unchanged
        syncer.sync()
    finally:
        syncer.close()
    reported = sorted("/".join(p) for p in changes.paths | changes.trees)
    upper_dirs = 1 + sum(1 for v in treeops.snapshot(UPPER).values() if v[0] == stat.S_IFDIR)
    return {"watches_before": watches_before, "watches_after": watches_after,
            "upper_dirs": upper_dirs,
            "reported_after_probe": reported, "errors": stats.errors,
            "canary_same": treeops.snapshot(CANARY) == canary_before,
            "leaks": leaks(STORE), "mirror_diff": mirror_matches_upper()}


def phase_race(canary_before: dict, n_ops: int, seed: int) -> dict:
    """Random hostile operations racing the real background sync (--watch) and commits
    of the live upper; then a final sync, a commit and a merge, checked against the
    kernel's view."""
    rnd = random.Random(seed)
    log = SCENE / "sync.log"
    with open(log, "w") as f:
        sync = subprocess.Popen([*CLI, "sync", "--store", str(STORE), "--upper", str(UPPER),
                                 "--key", KEY, "--watch", "--interval", "0.02"],
                                stdout=f, stderr=subprocess.STDOUT)
    commits: list[tuple[int, str]] = []
    try:
        time.sleep(1.0)
        ops = [attack_op(rnd) for _ in range(n_ops)]
        pid = attacker(ops, 0.02)
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            r = cli("commit", KEY, "--store", str(STORE), "--upper", str(UPPER))
            commits.append((r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr else ""))
        time.sleep(0.5)
        sync_alive = sync.poll() is None
    finally:
        sync.send_signal(signal.SIGTERM)
        sync_rc = sync.wait(timeout=60)
    final = cli("sync", "--store", str(STORE), "--upper", str(UPPER), "--key", KEY)
    mirror_diff = mirror_matches_upper()
    commit = cli("commit", KEY, "--store", str(STORE))
    out = SCENE / f"merged-{seed}"
    merge = cli("merge", "--lower", str(LOWER), "--upper", str(UPPER), "--into", str(out))
    kernel = treeops.snapshot(MERGED)
    merged_diff = "" if treeops.snapshot(out) == kernel else treeops.diff(
        kernel, treeops.snapshot(out))
    text = log.read_text(errors="replace")
    return {
        "ops": n_ops, "seed": seed, "sync_alive": sync_alive, "sync_rc": sync_rc,
        "sync_passes": text.count("synced "), "traceback": "Traceback" in text,
        "erofs": "Read-only file system" in text, "final_rc": final.returncode,
        "final_err": final.stderr[-500:], "mirror_diff": mirror_diff,
        "commit_rc": commit.returncode, "commit_err": commit.stderr[-500:],
        "merge_rc": merge.returncode, "merge_err": merge.stderr[-500:],
        "merged_diff": merged_diff,
        "live_commits": [c for c in commits if c[0] != 0 and "labvm storage:" not in c[1]],
        "live_commits_ok": sum(1 for c in commits if c[0] == 0),
        "live_commits_tried": len(commits),
        "canary_same": treeops.snapshot(CANARY) == canary_before,
        "leaks": leaks(STORE) + leaks(out),
    }


def main() -> int:
    phase = sys.argv[1]
    report: dict = {"remounted_ro": lockdown()}
    canary_before = build_scene()
    try:
        if phase == "exploit":
            report.update(phase_exploit(canary_before))
        elif phase == "journal-walk":
            report.update(phase_journal_walk(canary_before))
        elif phase == "race":
            n_ops, seed = int(sys.argv[2]), int(sys.argv[3])
            report.update(phase_race(canary_before, n_ops, seed))
        else:
            raise SystemExit(f"unknown phase {phase}")
    finally:
        subprocess.run(["umount", "-l", str(MERGED)], check=False)
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
