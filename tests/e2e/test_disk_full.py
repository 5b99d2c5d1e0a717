"""The uppers' disk fills up, on a real hub whose uppers are on a small btrfs of their own.

One user with no disk quota fills it. They get "No space left on device"; the others'
background syncs go on, the hub's database (on the node's own disk) takes writes, a start
is refused with a sentence or runs, and the store keeps only whole versions: every user's
files, checked against a checksum manifest written before, survive a stop and a start.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.helpers import container_of, sh, state_dir
from support.hubharness import HubError

pytestmark = pytest.mark.e2e

PORT = 21500
SFX = secrets.token_hex(3)
FILLER, OTHER, LATE = (f"{n}-{SFX}" for n in ("filler", "other", "late"))
HOME = 'cd "$(getent passwd "$LABVM_USER" | cut -d: -f6)"'
MANIFEST = HOME + " && find w -type f -print0 | sort -z | xargs -0 sha256sum"


def _synced_at(hub, key: str) -> float:
    try:
        return json.loads((state_dir(hub) / "store" / key / "synced.json").read_text())["t"]
    except (OSError, ValueError, KeyError):
        return 0.0


def _wait_synced(hub, key: str, after: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _synced_at(hub, key) <= after:
        assert time.monotonic() < deadline, f"{key} not synced since {after}"
        time.sleep(0.5)


def test_a_full_uppers_disk_harms_no_one_else_and_loses_nothing(hub_factory, docker_client):
    hub = hub_factory(PORT, upperfs="700M", env={"LABVM_TEST_SYNC_INTERVAL": "2"})
    for name in (FILLER, OTHER, LATE):
        hub.create_user(name)
    hub.spawn(FILLER)
    hub.spawn(OTHER)
    filler, other = container_of(docker_client, FILLER), container_of(docker_client, OTHER)
    rc, out = sh(other, HOME + " && mkdir -p w && seq 1 200000 > w/before.txt && "
                 "head -c 2000000 /dev/urandom > w/blob.bin && echo ok")
    assert rc == 0 and "ok" in out, out
    rc, out = sh(filler, HOME + " && mkdir -p w && seq 1 1000 > w/mine.txt && echo ok")
    assert rc == 0 and "ok" in out, out
    _wait_synced(hub, OTHER, time.time())
    manifests = {u: sh(c, MANIFEST)[1] for u, c in ((FILLER, filler), (OTHER, other))}

    # The filler writes until the disk is full, and is told so.
    rc, out = sh(filler, HOME + " && dd if=/dev/zero of=big bs=1M count=4000 conv=fsync "
                 "2>&1; echo dd-rc=$?")
    assert "No space left on device" in out and "dd-rc=1" in out, out
    full_at = time.time()

    # The others' syncs go on, and the hub's database takes writes.
    _wait_synced(hub, OTHER, full_at)
    r = hub.create_user(f"new-{SFX}")
    assert r.status_code == 201, r.text
    # A start on the full disk runs, or is refused with our sentence and leaves nothing.
    try:
        hub.spawn(LATE, timeout=180)
        started = True
    except HubError as e:
        started = False
        assert "Internal Server Error" not in str(e)
        assert "The disk that holds users' files on node" in str(e), str(e)
        assert container_of(docker_client, LATE) is None
    print(f"a start on the full uppers disk: {'ran' if started else 'refused'}")

    # Freeing room lets everyone write again, within seconds: the filler's sync may be
    # reading the big file as it goes, and btrfs hands its blocks back at a commit.
    rc, out = sh(filler, HOME + " && rm big && sync && echo ok")
    assert rc == 0 and "ok" in out, out
    freed_at = time.monotonic()
    while True:
        rc, out = sh(other, HOME + " && echo after > w/after.txt && echo ok")
        if (rc == 0 and "ok" in out) or time.monotonic() - freed_at > 20:
            break
        time.sleep(0.5)
    assert rc == 0 and "ok" in out, out
    print(f"room back for the others {time.monotonic() - freed_at:.1f} s after the rm")
    manifests[OTHER] = sh(other, MANIFEST)[1]

    # Every user's files survive a stop (final sync, commit) and a start.
    for user in (FILLER, OTHER):
        hub.unspawn(user)
    fsck = subprocess.run([sys.executable, "-m", "labvm_spawner.cli", "storage", "fsck",
                           "--store", str(state_dir(hub) / "store")],
                          capture_output=True, text=True, timeout=300)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for user in (FILLER, OTHER):
        hub.spawn(user)
        rc, seen = sh(container_of(docker_client, user), MANIFEST)
        assert rc == 0 and seen == manifests[user], (user, seen, manifests[user])
    assert Path(state_dir(hub) / "labvm.sqlite").stat().st_size > 0
