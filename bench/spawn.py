"""Spawn time of LabVMSpawner against DockerSpawner, through real hubs, alternating.

Two hubs run side by side on the same machine, dockerd and image: one with
LabVMSpawner, one with DockerSpawner (from PyPI). Each round spawns a new user
on both (cold: nothing exists for that user yet), stops, spawns again (warm:
the user's root or container exists), stops. The order of the two spawners
alternates every round. Time is from the REST API's POST to the hub reporting
the server ready.

    .venv/bin/python bench/spawn.py            # BENCH_ROUNDS=5 by default

Last line: spawn_ratio=<total LabVM spawn time / total DockerSpawner spawn time>.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from _hubs import two_hubs
from support.hubharness import Hub

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ROOT = Path(os.environ.get("LABVM_TEST_ROOT", "/var/lib/labvm-test"))


def timed_spawn(hub: Hub, user: str) -> float:
    t0 = time.perf_counter()
    hub.spawn(user)
    return time.perf_counter() - t0


def main() -> int:
    times: dict[tuple[str, str], list[float]] = {}
    with two_hubs(ROOT, "bench") as hubs:
        for r in range(ROUNDS):
            order = ("labvm", "docker") if r % 2 == 0 else ("docker", "labvm")
            for kind in order:
                hub, user = hubs[kind], f"u{r}"
                hub.create_user(user)
                times.setdefault((kind, "cold"), []).append(timed_spawn(hub, user))
                hub.unspawn(user)
                times.setdefault((kind, "warm"), []).append(timed_spawn(hub, user))
                hub.unspawn(user)
            print(f"round {r + 1}/{ROUNDS}: " + ", ".join(
                f"{k}/{m} {v[-1]:.2f}s" for (k, m), v in sorted(times.items())), flush=True)

    for (kind, mode), v in sorted(times.items()):
        print(f"{kind:7s} {mode}: median {statistics.median(v):.3f}s  "
              f"min {min(v):.3f}s  max {max(v):.3f}s  (n={len(v)})")
    for mode in ("cold", "warm"):
        ours, theirs = times[("labvm", mode)], times[("docker", mode)]
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"{mode}_ratio={ratio:.3f}")
    total = {k: sum(sum(v) for (kk, _), v in times.items() if kk == k) for k in hubs}
    print(f"spawn_ratio={total['labvm'] / total['docker']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
