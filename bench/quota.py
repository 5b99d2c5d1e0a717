"""What a disk quota costs a user's writes: a quota-limited upper against the same upper
without one, alternating.

Two uppers' file systems made by ``scripts/upperfs.sh``, the same size on the same disk:
one with btrfs quotas on (as every LabVM node has), one with quotas off. Each run makes
a fresh root (a subvolume; on the first file system it has a qgroup limit well above the
workload), mounts its overlay over an empty lower as a node does, and writes through
the overlay: large files, then small files, then syncs the file system. Prints each
run, MB/s and files/s; the last line is ``quota_overhead=X`` (limited / unlimited time,
median; goal <= 1.05).

Env: LABVM_BENCH_QUOTA_MB (1024, in files of 128 MiB), LABVM_BENCH_QUOTA_FILES (20000),
LABVM_BENCH_RUNS (3), LABVM_BENCH_DIR (/var/tmp/labvm-bench).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, alternate, env_int, median  # noqa: E402

from labvm_spawner.node import overlay  # noqa: E402
from labvm_spawner.node.quota import Quotas, set_limit  # noqa: E402
from labvm_spawner.storage.fsops import syncfs  # noqa: E402

UPPERFS = REPO / "scripts" / "upperfs.sh"
BIG = 128 << 20


def write_tree(root: Path, big_mb: int, small: int) -> None:
    chunk = os.urandom(1 << 20)
    for i in range(max(1, big_mb * (1 << 20) // BIG)):
        fd = os.open(root / f"big{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for _ in range(BIG >> 20):
            os.write(fd, chunk)
        os.close(fd)
    body = b"x" * 3000
    for d in range(0, small, 500):
        os.mkdir(root / f"d{d // 500:03d}")
        for i in range(d, min(small, d + 500)):
            fd = os.open(root / f"d{d // 500:03d}" / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o644)
            os.write(fd, body)
            os.close(fd)


def main() -> int:
    big_mb = env_int("LABVM_BENCH_QUOTA_MB", 1024)
    small = env_int("LABVM_BENCH_QUOTA_FILES", 20_000)
    runs = env_int("LABVM_BENCH_RUNS", 3)
    base = Path(os.environ.get("LABVM_BENCH_DIR", "/var/tmp/labvm-bench")) / "quota"
    size = f"{max(4, 3 * big_mb // 1024 + 2)}G"
    states = {"quota": base / "with", "none": base / "without"}
    for name, state in states.items():
        subprocess.run([str(UPPERFS), "up", str(state), size], check=True,
                       stdout=subprocess.DEVNULL)
        if name == "none":
            subprocess.run(["btrfs", "quota", "disable", str(state / "uppers")], check=True)
    lower = base / "lower"
    lower.mkdir(exist_ok=True)
    mounted: list[overlay.RootPaths] = []
    times: dict[str, list[float]] = {}
    try:
        for r in range(runs):
            roots = {}
            for name, state in states.items():
                up = state / "uppers"
                key = f"bench{r}"
                if name == "quota":
                    Quotas(up).make_base(up / key)
                    set_limit(up / key, 2 * big_mb * (1 << 20) + (1 << 30))
                else:
                    subprocess.run(["btrfs", "subvolume", "create", str(up / key)], check=True,
                                   stdout=subprocess.DEVNULL)
                paths = overlay.RootPaths(up / key / "upper", up / key / "work",
                                          state / "mnt" / key)
                overlay.mount_root(paths, [lower], 0)
                mounted.append(paths)
                roots[name] = paths

            def run(paths: overlay.RootPaths) -> None:
                write_tree(paths.merged, big_mb, small)
                syncfs(paths.upper)

            took = alternate(r, {n: (lambda p=p: run(p)) for n, p in roots.items()}, times)
            for name, t in took.items():
                print(f"run {r}: {name:5s} {t:.2f}s ({big_mb / t:.0f} MB/s of large files and "
                      f"{small / t:.0f} small files/s, together)", flush=True)
            for paths in roots.values():
                overlay.unmount_root(paths)
                mounted.remove(paths)
                subprocess.run(["btrfs", "subvolume", "delete", str(paths.upper.parent)],
                               check=True, stdout=subprocess.DEVNULL)
    finally:
        for paths in mounted:
            overlay.unmount_root(paths)
        for state in states.values():
            subprocess.run([str(UPPERFS), "down", str(state)], check=False)
    q, n = median(times["quota"]), median(times["none"])
    print(f"with quota median {q:.2f}s, without {n:.2f}s")
    print(f"quota_overhead={q / n:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
