"""Merge benchmark: our offline merge vs ``cp -a`` of the same upper onto a copy of the lower.

Upper of N small files (half replacing lower files, half new) over a lower of M,
on local disk and on MooseFS, alternating runs; copies of the lower are made
before timing. Last line: ``merge_ratio=X`` (ours / cp -a, the worse of the
targets; the goals are <= 0.8 on local disk and <= 0.5 on MooseFS, at full size:
LABVM_BENCH_MFS_UPPER_FILES=100000 LABVM_BENCH_MFS_LOWER_FILES=200000).

Env: LABVM_BENCH_UPPER_FILES (100000), LABVM_BENCH_LOWER_FILES (200000),
LABVM_BENCH_MFS_UPPER_FILES (10000), LABVM_BENCH_MFS_LOWER_FILES (20000) - MooseFS
creates ~1000 files/s here, so its default is smaller -, LABVM_BENCH_RUNS (3),
LABVM_BENCH_TARGETS (local,moosefs), LABVM_BENCH_DIR (/var/tmp/labvm-bench),
LABVM_BENCH_SETTLE_S (35): the wait after each round's fresh copies of the lower and
before the timed runs. ext4 without a journal (this machine's root) skips an inode freed
in the last 30 s when it allocates one, so every create right after the previous round's
copies were deleted scans past all of them: that noise hit whichever side ran first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, env_int, file_names, make_files, median, moosefs_up  # noqa: E402

from labvm_spawner.storage.merge import merge_upper  # noqa: E402
from labvm_spawner.storage.treecopy import copy_tree  # noqa: E402


def build(base: Path, n_upper: int, n_lower: int) -> tuple[Path, Path]:
    lower, upper = base / "lower", base / "upper"
    if not (base / ".built").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        make_files(lower, file_names(n_lower, 100, "d"), b"lower " * 10)
        half = n_upper // 2
        # half replaces lower files (spread over lower dirs), half lands in new dirs
        names = file_names(n_lower, 100, "d")[:: max(1, n_lower // half)][:half]
        names += file_names(n_upper - len(names), 100, "new")
        make_files(upper, names, b"upper " * 10)
        (base / ".built").touch()
    return lower, upper


def run_target(name: str, work: Path, lower_src: Path, upper: Path, runs: int,
               settle: float) -> float:
    lower = work / "lower"
    if not lower.exists():
        copy_tree(lower_src, lower)
    times: dict[str, list[float]] = {}
    for i in range(runs):
        a, b = work / f"a{i}", work / f"b{i}"
        for d in (a, b):
            if d.exists():
                shutil.rmtree(d)
            copy_tree(lower, d)
        subprocess.run(["sync"], check=True)
        time.sleep(settle)

        def do_ours(a: Path = a) -> None:
            merge_upper(upper, a)

        def do_cp(b: Path = b) -> None:
            subprocess.run(["cp", "-a", f"{upper}/.", str(b)], check=True)

        for label, t in alternate(i, {"ours": do_ours, "cp": do_cp}, times).items():
            print(f"{name} run {i}: {label} {t:.2f}s", flush=True)
        shutil.rmtree(a)
        shutil.rmtree(b)
    ours, cps = times["ours"], times["cp"]
    ratio = median(ours) / median(cps)
    print(f"{name}: ours median {median(ours):.2f}s, cp -a median {median(cps):.2f}s, "
          f"ratio {ratio:.2f}", flush=True)
    return ratio


def main() -> int:
    runs = env_int("LABVM_BENCH_RUNS", 3)
    settle = float(os.environ.get("LABVM_BENCH_SETTLE_S", 35))
    targets = os.environ.get("LABVM_BENCH_TARGETS", "local,moosefs").split(",")
    base = Path(os.environ.get("LABVM_BENCH_DIR", "/var/tmp/labvm-bench"))
    ratios = []
    if "local" in targets:
        n_up, n_low = env_int("LABVM_BENCH_UPPER_FILES", 100_000), env_int(
            "LABVM_BENCH_LOWER_FILES", 200_000)
        lower, upper = build(base / f"src-{n_up}-{n_low}", n_up, n_low)
        work = base / "local"
        work.mkdir(parents=True, exist_ok=True)
        ratios.append(run_target(f"local({n_up}/{n_low})", work, lower, upper, runs, settle))
        shutil.rmtree(work)
    if "moosefs" in targets:
        mnt = moosefs_up()
        if mnt is None:
            print("merge_ratio=nan (MooseFS unavailable)")
            return 1
        n_up, n_low = env_int("LABVM_BENCH_MFS_UPPER_FILES", 10_000), env_int(
            "LABVM_BENCH_MFS_LOWER_FILES", 20_000)
        lower, upper = build(base / f"src-{n_up}-{n_low}", n_up, n_low)
        work = mnt / "labvm-bench"
        work.mkdir(exist_ok=True)
        try:
            ratios.append(run_target(f"moosefs({n_up}/{n_low})", work, lower, upper, runs, settle))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"merge_ratio={max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
