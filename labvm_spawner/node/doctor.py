"""``labvm-node doctor``: what a node needs, checked one by one, each miss with its fix."""

from __future__ import annotations

import email.utils
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..storage.mounts import CACHED_MOUNT_OPTIONS, is_moosefs, mount_of
from . import netpolicy, nvml
from .userns import has_userns


@dataclass
class Check:
    what: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        head = f"[{'ok' if self.ok else 'PROBLEM'}] {self.what}: {self.detail}"
        return head if self.ok or not self.fix else f"{head}\n          fix: {self.fix}"


def docker_userns(info: dict[str, Any] | None, error: str = "") -> Check:
    if info is None:
        return Check("dockerd", False, f"not reachable ({error})",
                     "start dockerd (scripts/setup.sh does, with userns-remap)")
    if not has_userns(info):
        return Check("dockerd", False, "runs without userns-remap: container root would be "
                     "host root", 'add "userns-remap": "default" to dockerd\'s daemon.json '
                     "and restart it")
    return Check("dockerd", True, "running, with userns-remap")


def docker_live_restore(info: dict[str, Any] | None) -> Check:
    """Whether servers outlive a dockerd restart (unattended-upgrades restarts it)."""
    if info is not None and info.get("LiveRestoreEnabled"):
        return Check("dockerd live-restore", True, "on: servers keep running while dockerd "
                     "restarts")
    return Check("dockerd live-restore", False, "off: every server on this node stops "
                 "whenever dockerd restarts", 'add "live-restore": true to dockerd\'s '
                 "daemon.json and reload it (kill -HUP the dockerd)")


def store_mount(store_root: str) -> Check:
    if not store_root:
        return Check("layer store", True, "local (the one-node default)")
    mnt, fstype, source = mount_of(store_root)
    if not Path(store_root).is_dir():
        return Check("layer store", False, f"{store_root} does not exist",
                     "mount MooseFS and create the store directory")
    if not fstype.startswith("fuse") or "mfs" not in (source + fstype):
        return Check("layer store", False, f"{store_root} is on {fstype or '?'} ({mnt}), not "
                     "MooseFS", "mfsmount /mnt/mfs -H MASTER -p < /etc/labvm/mfs.password")
    opts = _mount_options(mnt)
    missing = {"nosuid", "nodev"} - opts
    if missing:
        return Check("layer store", False, f"MooseFS at {mnt} is mounted without "
                     f"{', '.join(sorted(missing))}", "remount without -o suid,dev")
    return Check("layer store", True, f"MooseFS at {mnt} (nosuid,nodev)")


CACHED_FIX = (f"mount MooseFS a second time (mfsmount -o {CACHED_MOUNT_OPTIONS}) and set "
              "--cached-store-root to the store's root in it (README, \"Reading layers\")")


def cached_store(store_root: str, cached_root: str) -> Check:
    """Whether roots read their layer versions through a cached, read-only mount."""
    name = "cached layer reads"
    if not cached_root:
        if not (store_root and is_moosefs(store_root)):
            return Check(name, True, "not needed: the store is not on MooseFS")
        return Check(name, False, "roots read their layers through the store's own mount, "
                     "where each file a container opens costs lookups in the MooseFS master",
                     CACHED_FIX)
    try:
        store, cached = os.stat(store_root), os.stat(cached_root)
    except OSError as e:
        return Check(name, False, f"{e.filename}: {e.strerror}", CACHED_FIX)
    if store.st_ino != cached.st_ino or store.st_dev == cached.st_dev:
        return Check(name, False, f"{cached_root} is not the store at {store_root} seen "
                     "through a second mount", CACHED_FIX)
    mnt = mount_of(cached_root)[0]
    if "ro" not in _mount_options(mnt):
        return Check(name, False, f"{mnt} is mounted read-write", "remount it with -o ro")
    return Check(name, True, f"through {mnt} (read-only)")


def _mount_options(mnt: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return set(fields[5].split(","))
    return set()


def gpu_runtime(gpus: int, runtimes: set[str]) -> Check:
    if gpus == 0:
        return Check("GPUs", True, "none on this node (it takes CPU-only servers)")
    if "nvidia" not in runtimes:
        return Check("GPUs", False, f"{gpus} GPU(s) but no NVIDIA runtime in dockerd",
                     "install nvidia-container-toolkit, run `nvidia-ctk runtime configure "
                     "--runtime=docker` and restart dockerd")
    return Check("GPUs", True, f"{gpus} GPU(s), NVIDIA runtime present")


def clock(hub_url: str, now: float | None = None, date: str | None = None) -> Check:
    if not hub_url:
        return Check("clock", True, "not compared (no --hub-url)")
    try:
        if date is None:
            with urllib.request.urlopen(f"{hub_url.rstrip('/')}/hub/api/", timeout=10) as r:
                date = r.headers["Date"]
        hub_time = email.utils.parsedate_to_datetime(date).timestamp()
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return Check("clock", False, f"cannot read the hub's time at {hub_url} ({e})",
                     "check that the hub is up and reachable from this node")
    skew = (now if now is not None else time.time()) - hub_time
    if abs(skew) > 5:
        return Check("clock", False, f"{skew:+.0f} s from the hub's clock: heartbeats would "
                     "look stale or fresh wrongly", "run an NTP client (chrony) on both")
    return Check("clock", True, f"within {abs(skew):.0f} s of the hub")


def disk(state_dir: str, min_free: float = 0.10) -> Check:
    try:
        st = os.statvfs(state_dir)
    except OSError as e:
        return Check("disk for uppers", False, f"{state_dir}: {e.strerror}",
                     "create the state directory on the node's local disk")
    free = st.f_bavail / st.f_blocks if st.f_blocks else 0.0
    gib = st.f_bavail * st.f_frsize / 2**30
    if free < min_free:
        return Check("disk for uppers", False, f"{gib:.1f} GiB free ({free:.0%}) on "
                     f"{state_dir}", "free space, or move state_dir to a bigger disk")
    return Check("disk for uppers", True, f"{gib:.1f} GiB free ({free:.0%}) on {state_dir}")


def disk_quotas(state_dir: str) -> Check:
    """Whether this node can give servers a disk quota (policy key ``disk``)."""
    from .quota import NO_QUOTA_FS, Quotas

    uppers = Path(state_dir) / "uppers"
    if Quotas(uppers).enabled():
        return Check("disk quotas", True, f"{uppers} is a btrfs with quotas on")
    return Check("disk quotas", False, f"{uppers} {NO_QUOTA_FS}: one user can fill the "
                 "node's disk, and servers with a disk quota are refused here",
                 f"stop this node's servers, then: scripts/upperfs.sh up {state_dir}")


def enrollment(token_hash_file: str, tls_dir: str) -> Check:
    cert = Path(tls_dir) / "node.crt"
    try:
        digest = Path(token_hash_file).read_text().strip() if token_hash_file else ""
    except OSError:
        digest = ""
    if len(digest) != 64 or not cert.is_file():
        return Check("enrollment", False, "not enrolled (no token hash or no certificate)",
                     "on the hub: labvm node join-token NODE; here: labvm-node join "
                     "--token-file FILE ...")
    return Check("enrollment", True, f"enrolled (certificate {cert})")


def network_policy(bridge: str) -> Check:
    if netpolicy.installed(bridge):
        return Check("container network policy", True, f"in place for {bridge}")
    return Check("container network policy", False, f"not in place for {bridge}",
                 "start the agent (labvm-node serve), which installs it")


def run_all(settings: Any, hub_url: str = "") -> list[Check]:
    """Every check for a node with ``settings`` (a NodeAgent)."""
    import docker

    checks = []
    try:
        client = (docker.DockerClient(base_url=settings.docker_url) if settings.docker_url
                  else docker.from_env())
        info = client.info()
        checks.append(docker_userns(info))
        checks.append(docker_live_restore(info))
    except Exception as e:  # noqa: BLE001 - reported as the finding
        client, info = None, None
        checks.append(docker_userns(None, str(e)))
    checks.append(store_mount(settings.store_root))
    checks.append(cached_store(settings.store_root, settings.cached_store_root))
    try:
        gpus = len(nvml.read_inventory())
    except Exception:  # noqa: BLE001 - no driver: no GPUs
        gpus = 0
    checks.append(gpu_runtime(gpus, set((info or {}).get("Runtimes") or {})))
    checks.append(clock(hub_url))
    checks.append(disk(settings.state_dir))
    checks.append(disk_quotas(settings.state_dir))
    checks.append(enrollment(settings.token_hash_file,
                             settings.tls_dir or f"{settings.state_dir}/tls"))
    if client is not None:
        try:
            checks.append(network_policy(netpolicy.bridge_of(client, settings.network_name)))
        except Exception as e:  # noqa: BLE001
            checks.append(Check("container network policy", False, str(e),
                                "start the agent once: it creates the network"))
    return checks
