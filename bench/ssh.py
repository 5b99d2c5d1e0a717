"""scp through the SSH gateway against scp straight to the container's sshd, alternating.

One real hub (the test configuration) with the gateway (labvm-ssh) starts a server.
The user's key is registered, then Debian's OpenSSH ``scp`` copies a file of
BENCH_SSH_MB MiB (default 1024) into the container's home:

- gateway: ``scp -J user@127.0.0.1:PORT user@default:`` (the path every user takes);
- direct:  ``scp user@<container bridge address>:`` (only this host can do that);
- openssh-jump: ``scp -J`` through OpenSSH's own sshd as the jump host, on loopback beside
  the gateway (a reference: what a jump host in C does on this machine). It is Debian's
  package unpacked into /var/cache/labvm-bench, never installed; BENCH_SSH_REFERENCE=0
  leaves it out.

Each round runs all three, the order flipping every round. Login latency is the median of
20 ``ssh ... true`` each way.

    .venv/bin/python bench/ssh.py     # BENCH_ROUNDS=4, BENCH_SSH_MB=1024

Last line: ssh_ratio=<direct time / gateway time> (goal >= 0.8).
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import docker  # noqa: E402
from _common import alternate, busy_s  # noqa: E402
from desktop import cleanup  # noqa: E402
from support.helpers import container_of  # noqa: E402
from support.hubharness import node_hub  # noqa: E402
from support.sshclient import keygen  # noqa: E402

from labvm_spawner import images  # noqa: E402
from labvm_spawner.monitor.cgroups import CgroupReader  # noqa: E402
from labvm_spawner.ssh.keystore import KeyStore  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))
MB = int(os.environ.get("BENCH_SSH_MB", "1024"))
ROOT = Path(os.environ.get("LABVM_TEST_ROOT", "/var/lib/labvm-test"))
PORT = 20030
SSH_PORT = 20052
USER = "bench"


def gateway_pid(state_dir: str) -> int:
    """The gateway (labvm-ssh) the hub started for this benchmark."""
    for p in Path("/proc").iterdir():
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"labvm_spawner.ssh" in args and f"--SSHService.state_dir={state_dir}".encode() in args:
            return int(p.name)
    raise RuntimeError("the gateway process was not found")


def proc_cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


# The reference jump host: OpenSSH's own sshd (C), on loopback beside the gateway.
REF_PORT = 20053
REF_USER = "labvm-bench-jump"  # a system account without a password, made here
REF_CACHE = Path("/var/cache/labvm-bench/openssh-server")
# cgroup v2 where it is the unified tree, else v1's cpuacct (this VM)
_V2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
REF_CGROUP = Path("/sys/fs/cgroup" if _V2 else "/sys/fs/cgroup/cpuacct") / "labvm-bench-jump"


def reference_sshd() -> str | None:
    """An sshd binary: the installed one, or Debian's package unpacked (never installed:
    an installed openssh-server starts listening on port 22 of every address)."""
    if os.environ.get("BENCH_SSH_REFERENCE", "1") == "0":
        return None
    if os.access("/usr/sbin/sshd", os.X_OK):
        return "/usr/sbin/sshd"
    sshd = REF_CACHE / "usr/sbin/sshd"
    if not sshd.exists():
        REF_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "openssh-server"], cwd=REF_CACHE, check=True,
                       capture_output=True)
        deb = next(REF_CACHE.glob("openssh-server_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(REF_CACHE)], check=True)
    if b"not found" in subprocess.run(["ldd", str(sshd)], capture_output=True).stdout:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "libwrap0"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return str(sshd)


def reference_jump(tmp: Path, pub: str, ip: str) -> subprocess.Popen | None:
    """OpenSSH's sshd as the jump host, run as an account of its own, allowed to open
    only the container's port 22; its CPU is counted in a cgroup of its own."""
    sshd = reference_sshd()
    if sshd is None:
        return None
    d = tmp / "ref"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")],
                   check=True)
    (d / "authorized_keys").write_text(pub + "\n")
    (d / "sshd_config").write_text(f"""ListenAddress 127.0.0.1:{REF_PORT}
HostKey {d}/hostkey
PidFile {d}/pid
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding local
PermitOpen {ip}:22
PermitTTY no
X11Forwarding no
Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com
""")
    if subprocess.run(["getent", "passwd", REF_USER], capture_output=True).returncode:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "--password", "*", REF_USER], check=True)
    subprocess.run(["chown", "-R", f"{REF_USER}:{REF_USER}", str(d)], check=True)
    os.chmod(tmp, 0o755)
    REF_CGROUP.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {REF_CGROUP}/cgroup.procs && exec "$@"', "sh", "setpriv",
         f"--reuid={REF_USER}", f"--regid={REF_USER}", "--clear-groups", sshd, "-D", "-e",
         "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def reference_cpu_s() -> float:
    try:
        if _V2:
            stat = dict(line.split() for line in (REF_CGROUP / "cpu.stat").read_text()
                        .splitlines())
            return int(stat["usage_usec"]) / 1e6
        return int((REF_CGROUP / "cpuacct.usage").read_text()) / 1e9
    except OSError:
        return 0.0


def main() -> int:
    client = docker.from_env()
    image = images.build_all(client)
    node = f"bench-{uuid.uuid4().hex[:8]}"
    base = ROOT / node
    hub = node_hub(base, node, image, ROOT / "rootfs", port=PORT, env={
        "LABVM_TEST_SSH": "1", "LABVM_TEST_SSH_PORT": str(SSH_PORT)})
    tmp = Path(tempfile.mkdtemp(prefix="labvm-bench-ssh-"))
    sshd = None
    try:
        hub.start()
        hub.create_user(USER)
        key, pub = keygen(tmp, USER)
        KeyStore(f"sqlite:///{hub.env['LABVM_TEST_STATE']}/labvm.sqlite").add(USER, pub)
        hub.spawn(USER)
        container = container_of(client, USER)
        ip = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
        gw_pid = gateway_pid(hub.env["LABVM_TEST_STATE"])
        jump_cpus = {"gateway": lambda: proc_cpu_s(gw_pid), "direct": lambda: 0.0,
                     "openssh-jump": reference_cpu_s}
        cgroups = CgroupReader()

        def container_cpu_s() -> float:
            reading = cgroups.read(container.id)
            return reading.cpu_ns / 1e9 if reading else float("nan")
        opts = ["-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o",
                "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                f"UserKnownHostsFile={tmp}/known_hosts", "-o", "LogLevel=ERROR"]
        jump = ["-o", f"ProxyCommand=ssh {' '.join(opts)} -p {SSH_PORT} -W default:22 "
                f"{USER}@127.0.0.1"]
        routes = {"gateway": (jump, "default"), "direct": ([], ip)}
        sshd = reference_jump(tmp, pub, ip)
        if sshd is not None:
            routes["openssh-jump"] = (["-o", f"ProxyCommand=ssh {' '.join(opts)} -p "
                                       f"{REF_PORT} -W {ip}:22 {REF_USER}@127.0.0.1"], ip)
        deadline = time.monotonic() + 60
        while subprocess.run(["ssh", *opts, *jump, f"{USER}@default", "true"]).returncode:
            assert time.monotonic() < deadline, "the gateway did not let the user in"
            time.sleep(1)

        data = tmp / "big.bin"
        with open(data, "wb") as f:
            for _ in range(MB):
                f.write(os.urandom(1 << 20))

        def copy(route: str):
            extra, host = routes[route]

            def run() -> None:
                jump_cpu = jump_cpus[route]
                b0, g0, c0 = busy_s(), jump_cpu(), container_cpu_s()
                k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(["scp", "-q", *opts, *extra, str(data), f"{USER}@{host}:big.bin"],
                               check=True)
                k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu.setdefault(route, []).append(busy_s() - b0)
                parts.setdefault(route, []).append((
                    k1.ru_utime + k1.ru_stime - k0.ru_utime - k0.ru_stime,
                    jump_cpu() - g0, container_cpu_s() - c0))
            return run

        times: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        parts: dict[str, list[tuple[float, float, float]]] = {}
        for r in range(ROUNDS):
            took = alternate(r, {route: copy(route) for route in routes}, times)
            print(f"round {r + 1}: " + "  ".join(
                f"{k} {v:.2f} s ({MB / v:.0f} MiB/s)" for k, v in took.items()), flush=True)

        login: dict[str, list[float]] = {"gateway": [], "direct": []}
        for i in range(20):
            for route in (("gateway", "direct") if i % 2 == 0 else ("direct", "gateway")):
                extra, host = routes[route]
                t0 = time.perf_counter()
                subprocess.run(["ssh", *opts, *extra, f"{USER}@{host}", "true"], check=True)
                login[route].append(time.perf_counter() - t0)
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
            with contextlib.suppress(OSError):
                REF_CGROUP.rmdir()
        cleanup(hub, client, node, base)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)

    gw, di = statistics.median(times["gateway"]), statistics.median(times["direct"])
    print(f"scp of {MB} MiB, median of {ROUNDS}: gateway {gw:.2f} s ({MB / gw:.0f} MiB/s), "
          f"direct {di:.2f} s ({MB / di:.0f} MiB/s)")
    print(f"CPU seconds per GiB (the whole machine, {os.cpu_count()} cores): " + ", ".join(
        f"{route} {statistics.median(got) * 1024 / MB:.1f}" for route, got in cpu.items()))
    for route, got in parts.items():
        client_s, gw_s, cont_s = (statistics.median(x[i] for x in got) * 1024 / MB
                                  for i in range(3))
        print(f"{route}: CPU seconds per GiB in the scp/ssh client processes {client_s:.1f}, "
              f"the jump host {gw_s:.1f}, the container (sshd) {cont_s:.1f}")
    print(f"login (ssh true), median of 20: gateway "
          f"{statistics.median(login['gateway']) * 1000:.0f} ms, direct "
          f"{statistics.median(login['direct']) * 1000:.0f} ms")
    if "openssh-jump" in times:
        ref = statistics.median(times["openssh-jump"])
        print(f"OpenSSH's sshd as the jump host (reference): {ref:.2f} s "
              f"({MB / ref:.0f} MiB/s), direct / it = {di / ref:.2f}")
    print(f"ssh_ratio={di / gw:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
