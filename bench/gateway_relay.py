"""The gateway's CPU per GiB relayed, with its own packet handling (ssh/fastpath.py)
against asyncssh's stock handling, alternating, in one run.

The gateway runs in this process (uvloop, as labvm-ssh does); Debian's OpenSSH client
sends BENCH_RELAY_MB MiB (default 1024) through a jump (``ssh -W default:22``) into a
sink in a process of its own. Only this process's CPU is counted: the gateway's. With
BENCH_RELAY_REPLY=1 the sink answers each read with 28 bytes, as SFTP answers each write
of an scp upload with a status, so the way back is measured too.

    .venv/bin/python bench/gateway_relay.py     # BENCH_ROUNDS=5

Last line: relay_cpu_ratio=<fast path CPU / stock CPU> (below 1: the fast path costs less).
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from labvm_spawner.ssh import fastpath, hostkey  # noqa: E402
from labvm_spawner.ssh.gateway import AuditLog, Gateway, Route  # noqa: E402
from labvm_spawner.ssh.keystore import KeyStore  # noqa: E402
from labvm_spawner.ssh.throttle import Throttle  # noqa: E402

MB = int(os.environ.get("BENCH_RELAY_MB", "1024"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
REPLY = os.environ.get("BENCH_RELAY_REPLY") == "1"

SINK = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
reply = sys.argv[1] == "1"
while True:
    conn, _ = srv.accept()
    while data := conn.recv(1 << 18):
        if reply:
            conn.sendall(b"x" * 28)
    conn.close()
"""


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(tmp: Path) -> int:
    keys = KeyStore(f"sqlite:///{tmp}/labvm.sqlite")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id")],
                   check=True)
    keys.add("bench", (tmp / "id.pub").read_text())
    data = tmp / "data.bin"
    with open(data, "wb") as f:
        for _ in range(MB):
            f.write(os.urandom(1 << 20))
    sink = subprocess.Popen([sys.executable, "-c", SINK, "1" if REPLY else "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())

        async def locate(user: str, server: str) -> Route:
            return Route(user, "local", ip="127.0.0.1", port=sink_port)

        mode = {"fast": True}
        tune = fastpath.tune
        fastpath.tune = lambda conn: mode["fast"] and tune(conn)  # type: ignore[assignment]
        gw = Gateway(keys, locate, AuditLog(tmp / "audit.log"), Throttle(10, 100, 300),
                     "http://hub/")
        server = await gw.listen("127.0.0.1", 0, hostkey.load_or_make(tmp / "host_key"))
        port = server.sockets[0].getsockname()[1]
        cmd = ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(tmp / "id"), "-o",
               "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes", "-o",
               "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o",
               "LogLevel=ERROR", "-W", "default:22", "bench@127.0.0.1"]
        per_gib: dict[str, list[float]] = {"stock": [], "fast": []}
        for r in range(ROUNDS):
            order = ["stock", "fast"] if r % 2 == 0 else ["fast", "stock"]
            line = []
            for label in order:
                mode["fast"] = label == "fast"
                c0 = cpu_s()
                with open(data, "rb") as f:
                    p = await asyncio.create_subprocess_exec(
                        *cmd, stdin=f, stdout=asyncio.subprocess.DEVNULL)
                    assert await p.wait() == 0, "the jump failed"
                used = (cpu_s() - c0) * 1024 / MB
                per_gib[label].append(used)
                line.append(f"{label} {used:.2f}")
            print(f"round {r + 1}: gateway CPU s per GiB: " + ", ".join(line), flush=True)
        server.close()
    finally:
        sink.kill()
    stock, fast = (statistics.median(per_gib[k]) for k in ("stock", "fast"))
    print(f"median gateway CPU s per GiB ({'with' if REPLY else 'without'} replies): "
          f"asyncssh's own {stock:.2f}, fast path {fast:.2f}")
    print(f"relay_cpu_ratio={fast / stock:.2f}")
    return 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="labvm-bench-relay-") as d:
        sys.exit(uvloop.run(main(Path(d))))
