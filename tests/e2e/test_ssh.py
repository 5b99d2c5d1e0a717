"""SSH into one's own container through the hub's gateway, with Debian's OpenSSH client.

A real hub with the monitor (where users add keys) and the gateway (labvm-ssh); real
containers whose sshd the gateway reaches. Users use exactly the ssh config their page
shows. ssh, scp, rsync, sftp, ``-L`` and tmux work; other users' keys, unregistered keys,
passwords and forwardings out of the container are refused, and the refusals are in the
gateway's audit log (or the container's sshd log, for what sshd itself refuses).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from support.browser import ARTIFACTS, launch, log_in
from support.helpers import container_of, fixture_uuids, sh, state_dir
from support.monitorharness import start_monitor
from support.sshclient import Client, keygen

pytestmark = pytest.mark.e2e

PORT = 21600
SSH_PORT = 21622
SFX = secrets.token_hex(3)
ALICE, BOB = f"alice-{SFX}", f"bob-{SFX}"


def audit(hub) -> list[dict]:
    path = state_dir(hub) / "ssh" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_audit(hub, match, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for rec in audit(hub):
            if all(rec.get(k) == v for k, v in match.items()):
                return rec
        assert time.monotonic() < deadline, f"no {match} in the audit log: {audit(hub)[-10:]}"
        time.sleep(0.2)


def make_tree(root: Path) -> None:
    """A small data set: nested dirs, a big and an empty file, a mode, a relative link."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "a" / "empty").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o750)
    for i in range(40):
        (root / "a" / f"f{i}.txt").write_text(f"file {i}\n" * i)
    (root / "link").symlink_to("a/f3.txt")


def tree_digest(root: Path, modes: bool = True) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir" + (f" {st.st_mode & 0o777:o}" if modes else "")
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + (
                    f" {st.st_mode & 0o777:o}" if modes else "")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_key_in_browser(mon, pub: str) -> None:  # noqa: ANN001
    """Alice adds her key on her own page in a real browser, and sees what to copy."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = log_in(browser.new_context(), mon.hub.url, ALICE, mon.hub.password)
            page.goto(mon.url + "me")
            page.wait_for_selector("#ssh-config", timeout=30000)
            page.fill("#ssh-key", pub)
            page.click("#ssh-add button[type=submit]")
            page.wait_for_selector("#ssh-keys td:has-text('alice@laptop')", timeout=30000)
            assert "Added SHA256:" in page.inner_text("#ssh-status")
            assert f"ProxyJump {ALICE}@127.0.0.1:{SSH_PORT}" in page.inner_text("#ssh-config")
            assert page.inner_text("#ssh-fingerprint").startswith("SHA256:")
            page.screenshot(path=str(ARTIFACTS / "ssh-user-page.png"), full_page=True)
        finally:
            browser.close()


def test_users_reach_their_own_containers_over_ssh(hub_factory, docker_client, tmp_path):
    mon = start_monitor(hub_factory, tmp_path, port=PORT, env={
        "LABVM_TEST_SSH": "1", "LABVM_TEST_SSH_PORT": str(SSH_PORT),
        "LABVM_FAKE_NVML": "nvml_dgx_a100.json"})
    hub = mon.hub
    for name in (ALICE, BOB):
        hub.create_user(name)
    alice_key, alice_pub = keygen(tmp_path, "alice")
    bob_key, bob_pub = keygen(tmp_path, "bob")
    stranger_key, _ = keygen(tmp_path, "stranger")

    # Alice adds her key on her page; a private key or garbage is refused with a reason.
    r = mon.post("api/me/ssh", {"key": alice_key.read_text()}, user=ALICE)
    assert r.status_code == 400 and "public key" in r.json()["message"], r.text
    r = mon.post("api/me/ssh", {"key": "ssh-ed25519 AAAA; rm -rf /"}, user=ALICE)
    assert r.status_code == 400, r.text
    mon.wait(lambda v: v["gateway"], path="api/me/ssh", user=ALICE)  # the gateway is up
    add_key_in_browser(mon, alice_pub)
    assert mon.post("api/me/ssh", {"key": bob_pub}, user=BOB).status_code == 201
    page = mon.get("api/me/ssh", user=ALICE).json()
    assert [k["comment"] for k in page["keys"]] == ["alice@laptop"]
    gw = page["gateway"]
    assert gw["port"] == SSH_PORT and gw["fingerprint"].startswith("SHA256:")
    assert f"ProxyJump {ALICE}@127.0.0.1:{SSH_PORT}" in gw["config"]
    # The host key is made once and readable by root only.
    host_key = state_dir(hub) / "ssh" / "ssh_host_ed25519_key"
    assert host_key.stat().st_mode & 0o777 == 0o600
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(host_key)], capture_output=True,
                           text=True, check=True).stdout.split()[1]
    assert shown == gw["fingerprint"]

    hub.spawn(ALICE, {"gpus": 1})
    hub.spawn(BOB)
    alice = Client(tmp_path, ALICE, alice_key, page)
    bob = Client(tmp_path, BOB, bob_key, mon.get("api/me/ssh", user=BOB).json())

    # ---- a shell: her account, her sudo, her GPU -----------------------------------
    out = alice.ssh("id -un; sudo -n true && echo sudo-ok; ls /dev/nvidia[0-9]*; "
                    "echo gpus=$CUDA_VISIBLE_DEVICES; cd && pwd", check=True).stdout.split()
    assert out[0] == ALICE and out[1] == "sudo-ok"
    assert len([p for p in out if p.startswith("/dev/nvidia")]) == 1
    gpus = next(p for p in out if p.startswith("gpus="))
    assert gpus.removeprefix("gpus=") in fixture_uuids()
    assert out[-1] == f"/home/{ALICE}"
    login = wait_audit(hub, {"event": "login", "user": ALICE})
    assert login["source"] == "127.0.0.1" and login["method"] == "publickey"
    fwd = wait_audit(hub, {"event": "forward", "user": ALICE})
    assert fwd["server"] == "default" and fwd["source"] == "127.0.0.1"

    # Both hops, the jump and the session inside it, agree on AES-GCM.
    verbose = alice.run("-v", "labvm", "true", check=True).stderr
    ciphers = re.findall(r"kex: \S+ cipher: (\S+)", verbose)
    assert len(ciphers) in (2, 4) and set(ciphers) == {"aes128-gcm@openssh.com"}, verbose

    # ---- scp and rsync of a tree, both ways ---------------------------------------
    src = tmp_path / "data"
    make_tree(src)
    alice.run("-r", "-p", str(src), "labvm:scp-copy", tool="scp", check=True)
    back = tmp_path / "scp-back"
    alice.run("-r", "-p", "labvm:scp-copy", str(back), tool="scp", check=True)
    # scp copies what a link points at; everything else must match byte for byte.
    want = tree_digest(src)
    got = tree_digest(back)
    assert got.pop("link") == want["a/f3.txt"]
    assert {k: v for k, v in want.items() if k != "link"} == got
    rsh = f"ssh -F {alice.config}"
    for a, b in ((f"{src}/", "labvm:rsync-copy/"), ("labvm:rsync-copy/", f"{tmp_path}/rs/")):
        p = subprocess.run(["rsync", "-a", "-e", rsh, a, b], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
    assert tree_digest(tmp_path / "rs") == want  # rsync -a keeps links and modes

    # ---- sftp -----------------------------------------------------------------------
    (tmp_path / "up.txt").write_text("via sftp\n")
    batch = tmp_path / "sftp.batch"
    batch.write_text(f"put {tmp_path}/up.txt sftp-up.txt\nls -1\n"
                     f"get sftp-up.txt {tmp_path}/down.txt\n")
    p = alice.run("-b", str(batch), "labvm", tool="sftp", check=True)
    assert "sftp-up.txt" in p.stdout and "rsync-copy" in p.stdout
    assert (tmp_path / "down.txt").read_text() == "via sftp\n"

    # ---- ssh -L to a web server in the container ---------------------------------------
    alice.ssh("mkdir -p www && echo tensorboard-here > www/index.html && cd www && "
              "(setsid python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &)",
              check=True)
    local = free_port()
    tunnel = subprocess.Popen(["ssh", "-F", str(alice.config), "-N", "-o",
                               "ExitOnForwardFailure=yes", "-L", f"{local}:localhost:8765",
                               "labvm"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page_text = requests.get(f"http://127.0.0.1:{local}/", timeout=5).text
                if "tensorboard-here" in page_text:
                    break
            except requests.RequestException:
                pass
            assert tunnel.poll() is None, tunnel.stderr.read()
            assert time.monotonic() < deadline, "the -L tunnel never served the page"
            time.sleep(0.5)
    finally:
        tunnel.terminate()
        tunnel.wait(10)

    # ---- ssh -R: the laptop's web server, seen from the container ------------------
    laptop = subprocess.Popen(["python3", "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=tmp_path / "data", stdout=subprocess.PIPE, text=True)
    try:
        laptop_port = int(laptop.stdout.readline().split(" port ")[1].split()[0])
        p = alice.run("-o", "ExitOnForwardFailure=yes", "-R", f"9777:127.0.0.1:{laptop_port}",
                      "labvm", "curl -fsS http://127.0.0.1:9777/run.sh", check=True)
        assert p.stdout == "#!/bin/sh\necho hi\n"
    finally:
        laptop.terminate()
        laptop.wait(10)

    # ---- agent forwarding: her laptop's agent signs inside the container -----------------
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.run(["ssh-agent", "-a", str(agent_sock)], capture_output=True, text=True,
                           check=True)
    agent_pid = int(agent.stdout.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
        subprocess.run(["ssh-add", "-q", str(alice_key)], env=env, check=True)
        p = alice.run("-A", "-o", f"IdentityAgent={agent_sock}", "labvm", "ssh-add -l",
                      check=True)
        assert page["keys"][0]["fingerprint"] in p.stdout
    finally:
        os.kill(agent_pid, 15)

    # ---- tmux outlives a dropped connection ------------------------------------------
    attached = subprocess.Popen(["ssh", "-F", str(alice.config), "-tt", "labvm",
                                 "tmux new-session -s work 'echo $$ > ~/tmux-pid; exec bash'"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while alice.ssh("test -s ~/tmux-pid").returncode != 0:
        assert time.monotonic() < deadline, "tmux did not start"
        time.sleep(0.5)
    attached.kill()  # the laptop's connection drops
    attached.wait()
    time.sleep(1)
    p = alice.ssh("tmux list-sessions -F '#{session_name}'; kill -0 $(cat ~/tmux-pid) && "
                  "echo alive", check=True)
    assert p.stdout.split() == ["work", "alive"]

    # ---- refused, and logged ---------------------------------------------------------
    # Alice's key as bob: the gateway refuses her; so does bob's own sshd.
    as_bob = alice.run("-o", f"User={BOB}", "-J", f"{BOB}@127.0.0.1:{SSH_PORT}",
                       f"{BOB}@default", "true")
    assert as_bob.returncode == 255 and "Permission denied" in as_bob.stderr
    wait_audit(hub, {"event": "login-refused", "user": BOB,
                     "reason": "no registered key matched"})
    bob_c = container_of(docker_client, BOB)
    bob_ip = next(iter(bob_c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    direct = subprocess.run(["ssh", "-F", "/dev/null", "-i", str(alice_key), "-o",
                             "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o",
                             "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                             f"{BOB}@{bob_ip}", "true"], capture_output=True, text=True,
                            timeout=60)
    assert direct.returncode == 255 and "Permission denied" in direct.stderr
    assert "Failed publickey" in sh(bob_c, "cat /run/labvm-sshd/sshd.log", root=True)[1] \
        or "Connection closed by authenticating user" in sh(
            bob_c, "cat /run/labvm-sshd/sshd.log", root=True)[1]
    # An unregistered key.
    stranger = Client(tmp_path, "stranger", stranger_key, page)
    p = stranger.ssh("true")
    assert p.returncode == 255 and "Permission denied (publickey)" in p.stderr
    # A password: the gateway offers none.
    p = subprocess.run(["ssh", "-F", "/dev/null", "-p", str(SSH_PORT), "-o",
                        "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,"
                        "keyboard-interactive", "-o", "BatchMode=yes", "-o",
                        f"UserKnownHostsFile={alice.dir / 'known_hosts'}",
                        f"{ALICE}@127.0.0.1", "true"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 255 and "Permission denied (publickey)" in p.stderr
    wait_audit(hub, {"event": "login-refused", "user": ALICE,
                     "reason": "no key offered (password and keyboard-interactive logins "
                               "are off)"})
    # Forwardings out of the container: the gateway opens nothing but port 22 of one's
    # own servers, and the container's sshd forwards only to the container itself.
    for target in ("172.17.0.1:22", f"{bob_ip}:22", "default:8888", "localhost:22"):
        p = alice.run("-p", str(SSH_PORT), "-W", target, f"{ALICE}@127.0.0.1", timeout=60)
        assert p.returncode != 0 and "administratively prohibited" in p.stderr, (target, p)
        wait_audit(hub, {"event": "forward-refused", "user": ALICE,
                         "target": target})
    out_port = free_port()
    leak = subprocess.Popen(["ssh", "-F", str(alice.config), "-N", "-L",
                             f"{out_port}:{bob_ip}:8888", "labvm"], stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{out_port}/", timeout=10)
    finally:
        leak.terminate()
        try:
            leak.wait(10)
        except subprocess.TimeoutExpired:  # still in its handshake through the jump
            leak.kill()
            leak.wait(10)
    alice_c = container_of(docker_client, ALICE)
    sshd_log = sh(alice_c, "cat /run/labvm-sshd/sshd.log", root=True)[1]
    assert f"to connect to host {bob_ip} port 8888, but the request was denied" in sshd_log, \
        sshd_log[-3000:]
    # Another container's sshd is out of reach from inside a container: refused at once,
    # and the node's kernel log names who knocked on whose port.
    alice_ip = next(iter(alice_c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    since = float(Path("/proc/uptime").read_text().split()[0]) - 1
    rc, out = sh(alice_c, f"timeout 5 bash -c 'echo > /dev/tcp/{bob_ip}/22' && echo open")
    assert "open" not in out and "Connection refused" in out, out
    knocks = [line for line in kernel_log(since) if "labvm refused: " in line
              and f"SRC={alice_ip} DST={bob_ip} " in line and " DPT=22 " in line]
    assert knocks, kernel_log(since)[-20:]

    # ---- keys change on running servers ------------------------------------------------
    key_id = page["keys"][0]["id"]
    r = requests.delete(mon.url + f"api/me/ssh/keys/{key_id}", timeout=30,
                        headers={"Authorization": f"token {mon.token(BOB)}"})
    assert r.status_code == 404  # bob cannot delete alice's key
    r = requests.delete(mon.url + f"api/me/ssh/keys/{key_id}", timeout=30,
                        headers={"Authorization": f"token {mon.token(ALICE)}"})
    assert r.ok and r.json()["servers_updated"] == 1, r.text
    assert "Permission denied" in alice.ssh("true").stderr
    assert sh(alice_c, "cat /.labvm/secrets/authorized_keys", root=True)[1] == ""
    assert mon.post("api/me/ssh", {"key": alice_pub}, user=ALICE).json()["servers_updated"] == 1
    assert alice.ssh("true").returncode == 0

    # ---- a stopped server ------------------------------------------------------------
    hub.unspawn(ALICE)
    p = alice.ssh("true")
    assert p.returncode == 255
    assert "your default server is not running" in p.stderr
    assert f"http://127.0.0.1:{PORT}/hub/" in p.stderr
    started = alice.run("-p", str(SSH_PORT), f"{ALICE}@127.0.0.1", "start", timeout=200,
                        check=True)
    assert "%]" in started.stdout and "is ready" in started.stdout, started.stdout
    p = alice.ssh("cat www/index.html", check=True)
    assert p.stdout.strip() == "tensorboard-here"  # her files, after a stop and a start
    # Bob's login still works: failures above were counted against alice's source only
    # within limits, and bob's own key was never refused.
    assert bob.ssh("id -un", check=True).stdout.strip() == BOB


def kernel_log(since: float) -> list[str]:
    """The host's kernel log from ``since`` (seconds since boot) on: where the node's
    network policy logs what it refuses."""
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        stamp = line[1:line.find("]")].strip() if line.startswith("[") else ""
        try:
            if float(stamp) >= since:
                lines.append(line)
        except ValueError:
            continue
    return lines
