"""A hostile tenant against sync, the journal, commit and merge (hostile_scene.py).

Each scene runs in a private mount namespace whose mounts are all read-only, with the
scene on a tmpfs: a regression fails here with EROFS or a changed canary, and cannot
write to this machine. The attacker is chrooted into a real overlay mount, as root is
in its container.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.components import IN_CI, require

HERE = Path(__file__).resolve().parent
# Random operations per seed; CI runs every seed (at least 2,000 operations in all).
RACE_OPS = int(os.environ.get("LABVM_HOSTILE_OPS", "800"))
RACE_SEEDS = [11, 12, 13]


def scene(*args: object) -> dict:
    require(os.geteuid() == 0 and shutil.which("unshare") is not None,
            "root and unshare(1) for the hostile-tenant scene")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                        str(HERE / "hostile_scene.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=900, cwd=HERE)
    reports = [line[len("REPORT "):] for line in r.stdout.splitlines()
               if line.startswith("REPORT ")]
    assert r.returncode == 0 and reports, r.stdout[-3000:] + r.stderr[-5000:]
    report = json.loads(reports[-1])
    assert report["remounted_ro"] >= 1
    return report


def test_the_reviewed_exploit_writes_nothing_outside(overlay_ok: None) -> None:
    # The security review's steps (a symlink to the scene's canary where the review had
    # the host's /etc, L swapped for a relative symlink through it, then M repointed),
    # in the scene's private read-only-root namespace; journal and rescan syncs.
    r = scene("exploit")
    assert r["canary_same"], "the sync wrote through the user's symlinks"
    assert r["leaks"] == []
    for mode in ("journal", "rescan"):
        assert r[mode] == {"errors": 0, "mirror_diff": ""}, (mode, r[mode])


def test_journal_never_walks_into_a_symlink(overlay_ok: None) -> None:
    # mkdir W; rmdir W; ln -s <host dir> W before the journal reads the events.
    r = scene("journal-walk")
    assert r["watches_after"] == r["upper_dirs"], "a directory outside the upper is watched"
    assert r["reported_after_probe"] == [], "host changes were reported as the user's"
    assert r["canary_same"] and r["leaks"] == []
    assert r["mirror_diff"] == "" and r["errors"] == 0


@pytest.mark.parametrize("seed", RACE_SEEDS)
def test_hostile_tenant_races_sync_commit_and_merge(overlay_ok: None, seed: int) -> None:
    r = scene("race", RACE_OPS, seed)
    # Nothing outside the user's tree was written or read into the store.
    assert r["canary_same"], f"seed {seed}: the canary changed"
    assert r["leaks"] == [], f"seed {seed}: host content in the store: {r['leaks']}"
    assert not r["erofs"], f"seed {seed}: something tried to write outside the scene"
    # The background sync survived the whole attack, and caught up afterwards.
    assert r["sync_alive"] and r["sync_rc"] == 0 and not r["traceback"], r
    assert (r["final_rc"], r["final_err"]) == (0, "")
    assert r["mirror_diff"] == "", r["mirror_diff"]
    # Commits of the live upper under attack either worked or said why, in our words.
    assert r["live_commits_tried"] >= 1 and r["live_commits"] == [], r["live_commits"]
    # Afterwards a commit of the synced copy and a merge work, equal to the kernel's view.
    assert (r["commit_rc"], r["commit_err"]) == (0, "")
    assert (r["merge_rc"], r["merge_err"]) == (0, "")
    assert r["merged_diff"] == "", r["merged_diff"]


def test_ci_runs_enough_hostile_operations() -> None:
    if IN_CI:
        assert RACE_OPS * len(RACE_SEEDS) >= 2000
