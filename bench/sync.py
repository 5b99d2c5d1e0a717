"""Sync benchmark: journaled sync of 100 changed paths in an upper of 100,000 files
vs ``rsync -aHAX --numeric-ids --delete`` bringing its own copy up to date.

Each round changes the same upper (rewrites, new files, deletions, chmods), then
runs both, alternating which goes first. Last line: ``sync_speedup=X`` (rsync
median / ours median; goal >= 20).

Env: LABVM_BENCH_SYNC_FILES (100000), LABVM_BENCH_SYNC_CHANGES (100),
LABVM_BENCH_RUNS (5), LABVM_BENCH_DIR (/var/tmp/labvm-bench).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, env_int, file_names, make_files, median, timed  # noqa: E402

from labvm_spawner.storage.sync import UpperSync  # noqa: E402


def change(upper: Path, names: list[str], live: set[str], n: int, rnd: random.Random,
           round_no: int) -> None:
    for i in range(n):
        kind = i % 4
        if kind == 0 and live:  # delete
            rel = rnd.choice(sorted(live)[:2000])
            os.unlink(upper / rel)
            live.discard(rel)
        elif kind == 1:  # new file
            rel = f"new{round_no}/g{i}"
            make_files(upper, [rel], b"new")
            live.add(rel)
        elif kind == 2:
            rel = rnd.choice(names)
            if rel in live:
                os.chmod(upper / rel, 0o600 if round_no % 2 else 0o640)
        else:
            rel = rnd.choice(names)
            make_files(upper, [rel], f"changed {round_no} ".encode())
            live.add(rel)


def main() -> int:
    n_files = env_int("LABVM_BENCH_SYNC_FILES", 100_000)
    n_changes = env_int("LABVM_BENCH_SYNC_CHANGES", 100)
    runs = env_int("LABVM_BENCH_RUNS", 5)
    base = Path(os.environ.get("LABVM_BENCH_DIR", "/var/tmp/labvm-bench")) / "sync"
    shutil.rmtree(base, ignore_errors=True)
    upper, ours_dir, rsync_dir = base / "upper", base / "store" / "upper-sync", base / "rsync"
    names = file_names(n_files, 100, "d")
    make_files(upper, names, b"content " * 8)
    ours_dir.parent.mkdir(parents=True)
    live = set(names)
    rsync = ["rsync", "-aHAX", "--numeric-ids", "--delete", f"{upper}/", f"{rsync_dir}/"]

    syncer = UpperSync(upper, ours_dir, journal=True)
    t_first = timed(syncer.sync)
    t_rfirst = timed(lambda: subprocess.run(rsync, check=True))
    print(f"initial full copy: ours {t_first:.2f}s, rsync {t_rfirst:.2f}s", flush=True)
    rnd = random.Random(1)
    times: dict[str, list[float]] = {}
    for r in range(runs):
        change(upper, names, live, n_changes, rnd, r)

        def do_ours() -> None:
            stats = syncer.sync()
            assert not stats.rescan, "journal overflowed"

        def do_rsync() -> None:
            subprocess.run(rsync, check=True)

        for label, t in alternate(r, {"ours": do_ours, "rsync": do_rsync}, times).items():
            print(f"run {r}: {label} {t * 1000:.1f} ms", flush=True)
    syncer.close()
    # Both copies must now equal the upper.
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(upper), str(ours_dir)],
                          capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[:2000]
    ours, theirs = times["ours"], times["rsync"]
    speedup = median(theirs) / median(ours)
    print(f"ours median {median(ours) * 1000:.1f} ms, rsync median {median(theirs) * 1000:.1f} ms")
    shutil.rmtree(base, ignore_errors=True)
    print(f"sync_speedup={speedup:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
