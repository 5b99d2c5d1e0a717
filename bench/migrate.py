"""Migration downtime against a plain stop-and-start of the same server, alternating.

The real two-node test bed (tests/support/testbed.py: nodes in their own namespaces with
their own dockerd and labvm-node agent, the store on MooseFS) and a real hub. Each
round first fills the running server's upper with 50,000 new files (1 GB) and lets
the background sync catch up; then, in an order that flips every round:

- plain: 100 files change, then the server is stopped and started on its node;
- migrate: 100 files change, then an admin migrates it to the other node.

Downtime is from the stop request to the hub reporting the server ready again,
polled every 0.2 s on both sides (the migration records its own the same way).
After a migration the stacked layer is merged in the background; nothing is timed
until that merge has finished, since it loads MooseFS during the next start.

    .venv/bin/python bench/migrate.py   # BENCH_ROUNDS=3, BENCH_FILES=50000, BENCH_MB=1000

Last line: migrate_ratio=<median migration downtime / median stop-and-start downtime>.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import docker  # noqa: E402
import requests  # noqa: E402
from _common import env_int, median  # noqa: E402
from support.testbed import Testbed  # noqa: E402

from labvm_spawner import images  # noqa: E402
from labvm_spawner.storage import open_store  # noqa: E402

ROUNDS = env_int("BENCH_ROUNDS", 3)
FILES = env_int("BENCH_FILES", 50_000)
MEGABYTES = env_int("BENCH_MB", 1000)
CHANGED = 100
PORT = 23000
ROOT = Path(os.environ.get("LABVM_TEST_ROOT", "/var/lib/labvm-test"))
MFS_STATE = Path(os.environ.get("LABVM_MFS_DIR", "/var/lib/labvm/mfs-test"))
ADMIN = "/services/labvm-monitor/"
USER = "bench"

FILL = """
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(size)
for i in range(n):
    d = os.path.join(root, f"d{i // 500:04d}")
    if i % 500 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i % 500:03d}"), "wb") as f:
        f.write(block[: size - (i % 7)])
"""

TOUCH = """
import os, sys
root, n, total, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for i in range(n):
    k = i * (total // n)  # spread over the whole upper
    with open(os.path.join(root, f"d{k // 500:04d}", f"f{k % 500:03d}"), "ab") as f:
        f.write(tag.encode())
"""


class Bench:
    def __init__(self, tb: Testbed, hub) -> None:
        self.tb = tb
        self.hub = hub
        self.boss = hub.user_token("boss")

    def node(self) -> str:
        for n in ("a", "b"):
            if self.tb.docker(n).containers.list(filters={"label": f"labvm.key={USER}"}):
                return n
        raise RuntimeError("the bench server runs nowhere")

    def exec(self, code: str, *args: str) -> None:
        n = self.node()
        c = self.tb.docker(n).containers.get(f"labvm-{n}-{USER}")
        r = c.exec_run(["python3", "-c", code, *args], user="1000:1000")
        if r.exit_code:
            raise RuntimeError(r.output.decode(errors="replace"))

    def synced(self) -> dict:
        try:
            return json.loads((self.tb.store / USER / "synced.json").read_text())
        except (OSError, ValueError):
            return {}

    def settle(self) -> None:
        """Wait until a background sync round that started after now copied nothing."""
        t = time.time()
        while True:
            s = self.synced()
            if s.get("t", 0) > t and s.get("changed", 1) == 0:
                return
            time.sleep(0.5)

    def wait_ready(self) -> float:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            srv = self.hub.api("GET", f"/users/{USER}").json()["servers"].get("")
            if srv and srv.get("ready"):
                return time.time()
            time.sleep(0.2)
        raise RuntimeError("the bench server did not come back")

    def plain(self, tag: str) -> float:
        self.exec(TOUCH, "/home/bench/fill-" + tag.split("-")[0], str(CHANGED), str(FILES), tag)
        t0 = time.time()
        r = self.hub.api("DELETE", f"/users/{USER}/server")
        assert r.status_code in (202, 204), r.text
        while self.hub.api("GET", f"/users/{USER}").json()["servers"].get(""):
            time.sleep(0.2)
        r = self.hub.api("POST", f"/users/{USER}/server", json={})
        assert r.status_code in (201, 202), r.text
        return self.wait_ready() - t0

    def migrate(self, tag: str) -> float:
        self.exec(TOUCH, "/home/bench/fill-" + tag.split("-")[0], str(CHANGED), str(FILES), tag)
        target = "b" if self.node() == "a" else "a"
        r = requests.post(f"{self.hub.url}{ADMIN}api/admin/migrate", timeout=60,
                          headers={"Authorization": f"token {self.boss}"},
                          json={"user": USER, "node": target})
        assert r.status_code == 202, r.text
        mid = r.json()["id"]
        while True:
            m = requests.get(f"{self.hub.url}{ADMIN}api/admin/migrations/{mid}", timeout=60,
                             headers={"Authorization": f"token {self.boss}"}).json()
            if m["state"] == "done":
                assert self.node() == target
                return float(m["downtime_s"])
            if m["state"] == "failed":
                raise RuntimeError(f"migration failed: {m}")
            time.sleep(0.2)


def main() -> int:
    client = docker.from_env()
    image = images.build_all(client)
    started_mfs = subprocess.run(["bash", str(REPO / "scripts/moosefs.sh"), "status"],
                                 capture_output=True).returncode != 0
    if started_mfs:
        subprocess.run(["bash", str(REPO / "scripts/moosefs.sh"), "up"], check=True,
                       capture_output=True)
    work = ROOT / f"bench-migrate-{int(time.time())}"
    mfs = MFS_STATE / "mnt" / work.name
    mfs.mkdir(parents=True)
    tb = Testbed(mfs, image, work, hub_port=PORT)
    hub = None
    times: dict[str, list[float]] = {"plain": [], "migrate": []}
    try:
        tb.up()
        hub = tb.hub(work / "hubbase", PORT)
        hub.start()
        tb.enroll(hub)
        hub.create_user("boss")
        hub.create_user(USER)
        hub.spawn(USER, timeout=300)
        bench = Bench(tb, hub)
        size = MEGABYTES * 1_000_000 // FILES
        for rnd in range(ROUNDS):
            t = time.time()
            bench.exec(FILL, f"/home/bench/fill-{rnd}", str(FILES), str(size))
            bench.settle()
            print(f"round {rnd}: upper filled with {FILES} files ({MEGABYTES} MB) on node "
                  f"{bench.node()} and synced in {time.time() - t:.1f} s", flush=True)
            runs = [("plain", bench.plain), ("migrate", bench.migrate)]
            if rnd % 2:
                runs.reverse()
            store = open_store(tb.store)
            for label, fn in runs:
                # A migration's background merge loads MooseFS for minutes, slowing any
                # start that follows: neither side is timed while one runs.
                while store.pending(USER):
                    time.sleep(1)
                bench.settle()  # "changed since the last sync": start from a settled sync
                took = fn(f"{rnd}-{label}")
                times[label].append(took)
                print(f"round {rnd}: {label} downtime {took:.2f} s", flush=True)
            t = time.time()
            while store.pending(USER):
                time.sleep(1)
            print(f"round {rnd}: background merge finished {time.time() - t:.1f} s later",
                  flush=True)
    finally:
        if hub is not None:
            hub.api("DELETE", f"/users/{USER}/server")
            time.sleep(3)
            hub.stop()
        tb.down()
        subprocess.run(["rm", "-rf", str(mfs)])
        if started_mfs:
            subprocess.run(["bash", str(REPO / "scripts/moosefs.sh"), "down"])
    plain, mig = median(times["plain"]), median(times["migrate"])
    print(f"plain stop-and-start downtime: median {plain:.2f} s {times['plain']}")
    print(f"migration downtime: median {mig:.2f} s {times['migrate']}")
    print(f"migrate_ratio={mig / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
