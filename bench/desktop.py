"""Desktop frame rate through the hub against straight to websockify, interleaved.

One real hub (LabVMSpawner, the test configuration: 1 CPU, 1 GiB per user) starts a
server; an animation (x11-apps' ``ico``, about 50 frames/s) runs on its desktop. A
minimal RFB client (``tests/e2e/desktop_rfb.py``) asks for each next framebuffer
update in turn, as noVNC does, and counts updates and bytes over two connections
open at once:

- chain:  CHP -> jupyter-server-proxy -> websockify -> Xvnc (an API token);
- direct: websockify's unix socket inside the container -> Xvnc.

They take turns of BENCH_SECONDS, the order alternating every round, so that other
load on the machine falls on both alike. First-frame time is from opening the
websocket to the first full frame: cold (the first visit, which starts Xvnc and
XFCE) and warm.

    .venv/bin/python bench/desktop.py     # BENCH_ROUNDS=12, BENCH_SECONDS=1.5

Last line: desktop_ratio=<chain updates/s / direct updates/s> (goal >= 0.8).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import docker  # noqa: E402
from support.desktop_helpers import connect_chain, connect_direct, wait_for, x_run  # noqa: E402
from support.desktop_rfb import RfbClient, Stats  # noqa: E402
from support.helpers import container_of, sh  # noqa: E402
from support.hubharness import Hub, node_hub  # noqa: E402

from labvm_spawner import images  # noqa: E402
from labvm_spawner.node.overlay import mount_points  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "12"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "1.5"))
ROOT = Path(os.environ.get("LABVM_TEST_ROOT", "/var/lib/labvm-test"))
PORT = 20010
USER = "bench"


def first_frame(open_ws) -> float:
    t0 = time.perf_counter()
    with open_ws() as ws:
        rfb = RfbClient(ws)
        rfb.handshake()
        rfb.first_frame()
    return time.perf_counter() - t0


def main() -> int:
    client = docker.from_env()
    image = images.build_all(client)
    node = f"bench-{uuid.uuid4().hex[:8]}"
    base = ROOT / node
    hub = node_hub(base, node, image, ROOT / "rootfs", port=PORT)
    try:
        hub.start()
        hub.create_user(USER)
        hub.spawn(USER)
        # The hub's test service: admin, with access to every server.
        token = hub.token
        c = container_of(client, USER)

        def chain():
            return connect_chain(hub, USER, token)

        def direct():
            return connect_direct(c)

        cold = first_frame(chain)
        wait_for("the XFCE panel", lambda: sh(c, "pgrep -x xfce4-panel")[0] == 0, 60)
        time.sleep(3)  # let the session finish drawing
        warm = {name: statistics.median(first_frame(f) for _ in range(3))
                for name, f in (("chain", chain), ("direct", direct))}

        # About 50 frames/s, like a video: a spinning loop would starve the container's
        # one CPU, which the Jupyter server (the chain's proxy) shares with Xvnc.
        x_run(c, "setsid ico -faces -size 500x500 -sleep 0.02 >/dev/null 2>&1 < /dev/null &")
        wait_for("the animation", lambda: sh(c, "pgrep -x ico")[0] == 0, 20)
        time.sleep(1)
        results: dict[str, list[Stats]] = {"chain": [], "direct": []}
        with chain() as ws_chain, direct() as ws_direct:
            clients = {"chain": RfbClient(ws_chain), "direct": RfbClient(ws_direct)}
            for rfb in clients.values():
                rfb.handshake()
                rfb.first_frame()
            for r in range(ROUNDS):
                order = ["chain", "direct"] if r % 2 == 0 else ["direct", "chain"]
                line = []
                for name in order:
                    st = clients[name].measure(SECONDS)
                    results[name].append(st)
                    line.append(f"{name} {st.updates_per_s:5.1f}/s "
                                f"{st.bytes_per_s / 1e6:5.2f} MB/s")
                print(f"round {r + 1:2d}: " + "  ".join(line), flush=True)
        mem = c.stats(stream=False)["memory_stats"].get("usage", 0)
    finally:
        cleanup(hub, client, node, base)

    def total(name: str) -> Stats:
        runs = results[name]
        return Stats(sum(s.updates for s in runs), sum(s.bytes for s in runs),
                     sum(s.seconds for s in runs))

    ch, di = total("chain"), total("direct")
    print(f"first frame cold (chain, starts the desktop): {cold:.2f} s")
    print(f"first frame warm: chain {warm['chain'] * 1000:.0f} ms, "
          f"direct {warm['direct'] * 1000:.0f} ms")
    print(f"container memory with the desktop and animation: {mem / 2**20:.0f} MiB "
          "(limit 1024 MiB)")
    print(f"chain:  {ch.updates_per_s:.1f} updates/s, {ch.bytes_per_s / 1e6:.2f} MB/s")
    print(f"direct: {di.updates_per_s:.1f} updates/s, {di.bytes_per_s / 1e6:.2f} MB/s")
    print(f"desktop_bytes_ratio={ch.bytes_per_s / di.bytes_per_s:.2f}")
    print(f"desktop_ratio={ch.updates_per_s / di.updates_per_s:.2f}")
    return 0


def cleanup(hub: Hub, client, node: str, base: Path) -> None:
    hub.stop()
    for ct in client.containers.list(all=True, filters={"label": f"labvm.node={node}"}):
        ct.remove(force=True)
    for mp in sorted(mount_points(), key=len, reverse=True):
        if mp.startswith(str(base) + "/"):
            subprocess.run(["umount", "-l", mp], check=False)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
