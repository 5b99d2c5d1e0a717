"""First sync of a fresh upper (``labvm storage sync``'s rescan) against ``cp -a`` of the same
tree, onto MooseFS and onto local disk, alternating which goes first.

The upper holds small files spread over directories of 100 entries, a few directories
of 5,000 entries, a chain of deep directories and a few large sparse files. Each run
copies into a fresh directory and is timed until its data is on disk (a backup is done
when it is durable, and otherwise one run pays for the last one's writeback); the copies
are checked equal to the upper. Prints files/s
for both; the last line is ``full_sync_ratio=X`` (ours / cp -a on MooseFS; goal <= 0.5).
The local figure is printed as ``local_ratio`` (goal <= 1.0).

Env: LABVM_BENCH_FULL_FILES (50000), LABVM_BENCH_RUNS (2), LABVM_BENCH_TARGETS
(moosefs,local), LABVM_BENCH_DIR (/var/tmp/labvm-bench), LABVM_SYNC_WORKERS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, env_int, file_names, make_files, median, moosefs_up  # noqa: E402

from labvm_spawner.storage.sync import UpperSync  # noqa: E402


def build(upper: Path, n: int) -> int:
    """The test tree; returns how many entries it has."""
    if (upper.parent / ".built").exists():
        return int((upper.parent / ".built").read_text())
    shutil.rmtree(upper, ignore_errors=True)
    wide = 3 * 5000
    names = file_names(max(0, n - wide - 100), 100, "d")
    names += [f"wide{w}/f{i:05d}" for w in range(3) for i in range(5000)]
    make_files(upper, names, b"content " * 16)
    deep = upper
    for i in range(60):
        deep = deep / f"level{i:02d}"
    deep.mkdir(parents=True, exist_ok=True)
    make_files(deep, [f"f{i}" for i in range(100)], b"deep")
    for i in range(4):  # large sparse files: 1 GiB apparent, a few MiB of data
        with open(upper / f"sparse{i}.img", "wb") as f:
            f.truncate(1 << 30)
            for off in range(0, 1 << 30, 256 << 20):
                f.seek(off)
                f.write(os.urandom(1 << 20))
    count = sum(len(fs) + len(ds) for _, ds, fs in os.walk(upper))
    (upper.parent / ".built").write_text(str(count))
    return count


def run_target(name: str, upper: Path, work: Path, runs: int, entries: int) -> float:
    times: dict[str, list[float]] = {}
    for r in range(runs):
        ours, theirs = work / f"ours{r}" / "upper-sync", work / f"cp{r}"
        for d in (ours.parent, theirs):
            if d.exists():
                subprocess.run(["rm", "-rf", str(d)], check=True)
        ours.parent.mkdir(parents=True)

        def do_ours(ours: Path = ours) -> None:
            syncer = UpperSync(upper, ours, journal=False)
            stats = syncer.sync()
            syncer.close()
            os.sync()
            assert stats.errors == 0, stats

        def do_cp(theirs: Path = theirs) -> None:
            subprocess.run(["cp", "-a", str(upper), str(theirs)], check=True)
            os.sync()

        for label, t in alternate(r, {"ours": do_ours, "cp": do_cp}, times).items():
            print(f"{name} run {r}: {label} {t:.1f}s ({entries / t:.0f} entries/s)", flush=True)
        diff = subprocess.run(["diff", "-r", "--no-dereference", str(upper), str(ours)],
                              capture_output=True, text=True)
        assert diff.returncode == 0, diff.stdout[:2000]
        subprocess.run(["rm", "-rf", str(ours.parent), str(theirs)], check=True)
    ours_t, cp_t = median(times["ours"]), median(times["cp"])
    ratio = ours_t / cp_t
    print(f"{name}: ours median {ours_t:.1f}s ({entries / ours_t:.0f}/s), cp -a median "
          f"{cp_t:.1f}s ({entries / cp_t:.0f}/s), ratio {ratio:.2f}", flush=True)
    return ratio


def main() -> int:
    n = env_int("LABVM_BENCH_FULL_FILES", 50_000)
    runs = env_int("LABVM_BENCH_RUNS", 2)
    targets = os.environ.get("LABVM_BENCH_TARGETS", "moosefs,local").split(",")
    base = Path(os.environ.get("LABVM_BENCH_DIR", "/var/tmp/labvm-bench")) / f"full-{n}"
    upper = base / "upper"
    entries = build(upper, n)
    print(f"upper: {entries} entries", flush=True)
    ratios: dict[str, float] = {}
    if "local" in targets:
        ratios["local"] = run_target("local", upper, base / "local", runs, entries)
    if "moosefs" in targets:
        mnt = moosefs_up()
        if mnt is None:
            print("full_sync_ratio=nan (MooseFS unavailable)")
            return 1
        work = mnt / "labvm-bench-full"
        try:
            ratios["moosefs"] = run_target("moosefs", upper, work, runs, entries)
        finally:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    if "local" in ratios:
        print(f"local_ratio={ratios['local']:.2f}")
    print(f"full_sync_ratio={ratios.get('moosefs', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
