"""N users start servers at once: LabVMSpawner against DockerSpawner, same run, alternating.

Two real hubs (``bench/_hubs.py``) on one machine, dockerd and image. Each round
makes N fresh users on one hub and POSTs all N starts at once through the REST
API, then stops them all; then the same on the other hub. The order alternates
every round. A user's time is from its POST to the hub reporting its server ready;
a start that fails counts as a failure, with the hub's message. The machine's busy CPU
seconds over a round's starts, divided by N, say what one start costs in all (hub,
dockerd, runc, the container): on a machine this small, that is what sets the p95.

Each user follows its start on the hub's progress stream, as the spawn page in a
browser does (one open request). BENCH_LOAD_FOLLOW=poll asks the REST API for the user
four times a second instead: ten pollers add a load of their own to the hub, and the
longer a start takes, the more of it.

    .venv/bin/python bench/load.py     # BENCH_LOAD_USERS=10, BENCH_ROUNDS=2

BENCH_CONCURRENT_STARTS sets LabVM's concurrent_starts (0: its default, one per CPU).

Last line: load_ratio=<LabVM p95 / DockerSpawner p95>.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import busy_s
from _hubs import KINDS, two_hubs
from support.hubharness import Hub, HubError

USERS = int(os.environ.get("BENCH_LOAD_USERS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
ROOT = Path(os.environ.get("LABVM_TEST_ROOT", "/var/lib/labvm-test"))
FOLLOW = os.environ.get("BENCH_LOAD_FOLLOW", "progress")


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def timed_spawn(hub: Hub, user: str) -> float | str:
    t0 = time.perf_counter()
    try:
        if FOLLOW == "poll":
            hub.spawn(user, timeout=300)
        else:
            hub.spawn_followed(user, timeout=300)
    except HubError as e:
        return str(e).splitlines()[0][:300]
    return time.perf_counter() - t0


def one_round(hub: Hub, users: list[str]) -> tuple[list[float | str], float]:
    """Each user's time to ready (or failure), and the machine's busy CPU seconds from
    the first POST to the last ready (everything running: hub, dockerd, containers)."""
    for u in users:
        hub.create_user(u)
    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        cpu0 = busy_s()
        results = list(pool.map(lambda u: timed_spawn(hub, u), users))
        cpu = busy_s() - cpu0
        list(pool.map(lambda u: hub.unspawn(u, timeout=180), users))
    return results, cpu


def main() -> int:
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    failures: dict[str, list[str]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    with two_hubs(ROOT, "load") as hubs:
        for hub in hubs.values():
            hub.poll_interval = 0.25  # N pollers at once: keep the hubs' own load modest
        for r in range(ROUNDS):
            order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                users = [f"r{r}u{i}" for i in range(USERS)]
                print(f"round {r + 1}/{ROUNDS} {kind}: {USERS} starts", flush=True)
                results, busy = one_round(hubs[kind], users)
                cpu[kind].append(busy / USERS)
                done = [res for res in results if isinstance(res, float)]
                times[kind] += done
                failures[kind] += [res for res in results if isinstance(res, str)]
                print(f"round {r + 1}/{ROUNDS} {kind}: {len(done)} ready, "
                      f"slowest {max(done, default=0):.2f}s, "
                      f"machine CPU {busy / USERS:.2f} s per start", flush=True)
    for kind in KINDS:
        v = times[kind] or [math.inf]
        print(f"{kind:7s} n={len(times[kind])}  median {statistics.median(v):.2f}s  "
              f"p95 {p95(v):.2f}s  failures {len(failures[kind])}  "
              f"machine CPU {statistics.median(cpu[kind]):.2f} s per start")
        for msg in failures[kind][:5]:
            print(f"    failed: {msg}")
    how = "polling the REST API" if FOLLOW == "poll" else "its progress stream"
    print(f"each start followed by {how}")
    ours, theirs = (p95(times[k] or [math.inf]) for k in KINDS)
    print(f"load_ratio={ours / theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
