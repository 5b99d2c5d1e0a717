"""The gateway on its own, with Debian's OpenSSH client: who gets in, where a jump may go,
what is logged, and when failed logins are throttled. The hub's part (where a server
runs) is a table here; the real hub, containers and sshd are in e2e/test_ssh.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import uvloop

from labvm_spawner.ssh import fastpath, hostkey
from labvm_spawner.ssh.gateway import AuditLog, Gateway, Route, Stopped
from labvm_spawner.ssh.keystore import KeyStore
from labvm_spawner.ssh.throttle import Throttle

GREETING = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u6\r\n"


class Scene:
    """A gateway in a thread of its own, an echo server standing in for alice's sshd."""

    def __init__(self, tmp: Path, max_fails: int = 10, start_on_connect: bool = False,
                 tokens: dict[str, str] | None = None):
        self.tmp = tmp
        self.keys = KeyStore(f"sqlite:///{tmp}/labvm.sqlite")
        self.audit_path = tmp / "ssh" / "audit.log"
        self.running = {"alice": True}
        self.started: list[str] = []
        self.broken = False  # the hub stops answering
        self.greeting = False  # alice's "sshd" speaks first, at once, as sshd does
        self.loop = uvloop.new_event_loop()  # as the service runs it
        self.echo_port = 0
        self.port = 0
        ready = threading.Event()

        async def locate(user: str, server: str) -> Route:
            if self.broken:
                raise OSError("Connection refused")
            if server or not self.running.get(user):
                raise Stopped(f"LabVM: {user}'s server {server or 'default'} is not running")
            return Route(user, "local", ip="127.0.0.1",
                         port=self.greet_port if self.greeting else self.echo_port)

        async def start(user: str, server: str, say) -> None:
            say("[50%] starting")
            self.started.append(user)
            self.running[user] = True

        async def echo(reader, writer) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def main() -> None:
            srv = await asyncio.start_server(echo, "127.0.0.1", 0)
            self.echo_port = srv.sockets[0].getsockname()[1]
            async def check_token(user: str, token: str) -> bool:
                return (tokens or {}).get(user) == token

            gw = Gateway(self.keys, locate, AuditLog(self.audit_path),
                         Throttle(max_fails, 100, 300), "http://hub/", start=start,
                         check_token=check_token if tokens is not None else None,
                         start_on_connect=start_on_connect, public_host="127.0.0.1")
            key = hostkey.load_or_make(tmp / "ssh" / "host_key")
            self.server = await gw.listen("127.0.0.1", 0, key)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        # The greeter answers from a thread of its own, at once, as sshd does: its
        # version line can come in before the gateway has opened the client's channel.
        self.greeter = socket.create_server(("127.0.0.1", 0))
        self.greet_port = self.greeter.getsockname()[1]
        threading.Thread(target=self._greet, daemon=True).start()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(main(), self.loop).result(30)
        ready.wait(30)

    def _greet(self) -> None:
        while True:
            try:
                conn, _ = self.greeter.accept()
            except OSError:  # closed
                return
            conn.sendall(GREETING)
            threading.Thread(target=self._echo_blocking, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo_blocking(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def keygen(self, name: str) -> Path:
        key = self.tmp / f"id-{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        return key

    def ssh(self, key: Path, user: str, *args: str, stdin: str = "",
            command: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(key), "-o",
             "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             *args, f"{user}@127.0.0.1", *([command] if command else [])],
            input=stdin, capture_output=True, text=True, timeout=60)

    def audit(self, until=None) -> list[dict]:  # type: ignore[no-untyped-def]
        """The audit log; with ``until``, once it holds (a refusal is logged when the
        gateway sees the connection close, just after the client has exited)."""
        deadline = time.monotonic() + 10
        while True:
            log = [json.loads(x) for x in self.audit_path.read_text().splitlines()]
            if until is None or until(log) or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def close(self) -> None:
        self.greeter.close()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def scene(tmp_path):
    s = Scene(tmp_path)
    yield s
    s.close()


def test_a_jump_reaches_only_port_22_of_ones_own_server(scene) -> None:
    key = scene.keygen("alice")
    scene.keys.add("alice", (key.with_suffix(".pub")).read_text())
    p = scene.ssh(key, "alice", "-W", "default:22", stdin="hello through the jump\n")
    assert p.stdout == "hello through the jump\n", p.stderr
    for target in ("default:8888", "10.0.0.1:22", "evil.example:22", "gpu:22"):
        p = scene.ssh(key, "alice", "-W", target)
        assert p.returncode != 0 and "administratively prohibited" in p.stderr, (target, p)
    log = scene.audit()
    assert [r["event"] for r in log].count("login") == 5
    assert {r["target"] for r in log if r["event"] == "forward-refused"} == {
        "default:8888", "10.0.0.1:22", "evil.example:22", "gpu:22"}
    assert [r["server"] for r in log if r["event"] == "forward"] == ["default"]
    # -L on the gateway itself is a jump too, and as refused; -R is refused outright.
    p = scene.ssh(key, "alice", "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:localhost:22")
    assert p.returncode != 0
    assert any(r["event"] == "forward-refused" and r["kind"] == "remote" for r in scene.audit())


def test_bytes_cross_the_gateway_intact_both_ways_across_rekeys(scene, monkeypatch) -> None:
    """The gateway's own packet handling (fastpath) on the asyncssh it runs with: 48 MiB
    of random bytes to the echo server and back, with the client renewing its keys
    every MiB, so key changes fall in the middle of the gateway's reads."""
    tuned: list[bool] = []
    real_tune = fastpath.tune
    monkeypatch.setattr(fastpath, "tune", lambda conn: tuned.append(real_tune(conn))
                        or tuned[-1])
    key = scene.keygen("alice")
    scene.keys.add("alice", (key.with_suffix(".pub")).read_text())
    data = os.urandom(48 << 20)
    for cipher in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com"):
        p = subprocess.run(
            ["ssh", "-F", "/dev/null", "-p", str(scene.port), "-i", str(key), "-o",
             "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes", "-o",
             "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o",
             "RekeyLimit=1M", "-c", cipher, "-W", "default:22", "alice@127.0.0.1"],
            input=data, capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout) == len(data)
        assert hashlib.sha256(p.stdout).digest() == hashlib.sha256(data).digest(), cipher
    assert tuned == [True, True]  # the installed asyncssh has what the fast path needs


def test_what_the_sshd_says_first_reaches_the_client_every_time(scene) -> None:
    """sshd sends its version line the moment it accepts, often before the gateway has
    opened the client's channel: it must wait there, never be dropped (the client would
    read sshd's key exchange as its banner, "banner line contains invalid characters")."""
    key = scene.keygen("alice")
    scene.keys.add("alice", (key.with_suffix(".pub")).read_text())
    scene.greeting = True
    got = [scene.ssh(key, "alice", "-W", "default:22", stdin="and then mine\n").stdout
           for _ in range(30)]
    want = GREETING.decode().replace("\r\n", "\n") + "and then mine\n"  # text mode
    assert [g == want for g in got] == [True] * 30, [g for g in got if g != want][:3]


def test_a_stopped_server_is_named_and_a_session_can_start_it(scene) -> None:
    key = scene.keygen("alice")
    scene.keys.add("alice", (key.with_suffix(".pub")).read_text())
    scene.running["alice"] = False
    p = scene.ssh(key, "alice", "-W", "default:22")
    assert "alice's server default is not running" in p.stderr
    p = scene.ssh(key, "alice", command="start")
    assert p.returncode == 0 and "[50%] starting" in p.stdout and "is ready" in p.stdout
    assert scene.started == ["alice"]
    p = scene.ssh(key, "alice", "-W", "default:22", stdin="up\n")
    assert p.stdout == "up\n"
    p = scene.ssh(key, "alice", command="rm -rf /")
    assert p.returncode == 2 and "runs no commands" in p.stderr


def test_a_hub_that_does_not_answer_gets_a_sentence_not_a_hang(scene) -> None:
    key = scene.keygen("alice")
    scene.keys.add("alice", (key.with_suffix(".pub")).read_text())
    scene.broken = True
    p = scene.ssh(key, "alice", "-W", "default:22")
    assert p.returncode != 0
    assert "LabVM cannot find your server just now (Connection refused)" in p.stderr


def test_start_on_connect_starts_a_stopped_server_and_then_connects(tmp_path) -> None:
    scene = Scene(tmp_path, start_on_connect=True)
    try:
        key = scene.keygen("alice")
        scene.keys.add("alice", (key.with_suffix(".pub")).read_text())
        scene.running["alice"] = False
        p = scene.ssh(key, "alice", "-W", "default:22", stdin="after start\n")
        assert p.stdout == "after start\n" and scene.started == ["alice"]
        assert any(r["event"] == "start" for r in scene.audit())
    finally:
        scene.close()


def test_unknown_keys_and_users_are_refused_and_logged(scene) -> None:
    alice, stranger = scene.keygen("alice"), scene.keygen("stranger")
    scene.keys.add("alice", (alice.with_suffix(".pub")).read_text())
    for key, user in ((stranger, "alice"), (alice, "bob"), (alice, "../etc")):
        p = scene.ssh(key, user, "-W", "default:22")
        assert p.returncode == 255 and "Permission denied (publickey)" in p.stderr
    log = scene.audit(lambda log: len([r for r in log if r["event"] == "login-refused"]) == 3)
    refused = [(r["user"], r["reason"]) for r in log if r["event"] == "login-refused"]
    assert refused == [("alice", "no registered key matched"),
                       ("bob", "no registered key matched"),
                       ("../etc", "no registered key matched")]
    assert not [r for r in scene.audit() if r["event"] == "login"]


def test_failed_logins_from_one_source_are_throttled(tmp_path) -> None:
    scene = Scene(tmp_path, max_fails=3)
    try:
        alice, stranger = scene.keygen("alice"), scene.keygen("stranger")
        scene.keys.add("alice", (alice.with_suffix(".pub")).read_text())
        for _ in range(3):
            assert scene.ssh(stranger, "alice", "-W", "default:22").returncode == 255
        # Now even the right key is refused from this address, and that is logged.
        p = scene.ssh(alice, "alice", "-W", "default:22", stdin="x\n")
        assert p.returncode == 255 and p.stdout == ""
        assert any(r["event"] == "login-refused" and "too many failed logins from 127.0.0.1"
                   in r["reason"] for r in scene.audit())
    finally:
        scene.close()


def test_hub_tokens_as_passwords_only_when_turned_on(tmp_path) -> None:
    """With the setting, a user's hub API token is a password (asked through SSH_ASKPASS,
    as a person would type it); a wrong one is refused and logged."""
    scene = Scene(tmp_path, tokens={"alice": "tok-alice"})
    try:
        for password, works in (("tok-alice", True), ("tok-bob", False)):
            askpass = tmp_path / "askpass"
            askpass.write_text(f"#!/bin/sh\necho {password}\n")
            askpass.chmod(0o700)
            p = subprocess.run(
                ["ssh", "-F", "/dev/null", "-p", str(scene.port), "-o", "PubkeyAuthentication=no",
                 "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-W", "default:22", "alice@127.0.0.1"], input="pw\n", capture_output=True,
                text=True, timeout=60,
                env={**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
                     "DISPLAY": ":0"})
            assert (p.stdout == "pw\n") is works, p.stderr
        log = scene.audit(lambda log: any(r["event"] == "login-refused" for r in log))
        assert [r.get("method") for r in log if r["event"] == "login"] == ["hub-token"]
        assert [r["user"] for r in log if r["event"] == "login-refused"] == ["alice"]
    finally:
        scene.close()
    # Off (the default): the gateway does not even offer passwords.
    off = Scene(tmp_path / "off")
    try:
        p = off.ssh(tmp_path / "none", "alice", "-o", "PubkeyAuthentication=no",
                    "-W", "default:22")
        assert "Permission denied (publickey)" in p.stderr
    finally:
        off.close()


def test_the_host_key_is_made_once_and_must_stay_private(tmp_path) -> None:
    path = tmp_path / "ssh" / "host_key"
    first = hostkey.load_or_make(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert hostkey.load_or_make(path).get_fingerprint() == first.get_fingerprint()
    path.chmod(0o644)
    with pytest.raises(Exception, match="mode 0600"):
        hostkey.load_or_make(path)


def test_throttle_forgets_failures_after_the_window() -> None:
    now = [0.0]
    t = Throttle(max_per_source=2, max_per_user=3, window_s=60, clock=lambda: now[0])
    t.failed("10.0.0.1", "alice")
    t.failed("10.0.0.1", "alice")
    assert "10.0.0.1" in (t.blocked("10.0.0.1") or "")
    t.failed("10.0.0.2", "alice")
    assert "as alice" in (t.blocked("10.0.0.3", "alice") or "")
    assert t.blocked("10.0.0.3", "bob") is None
    now[0] = 61
    assert t.blocked("10.0.0.1", "alice") is None


def test_the_audit_log_rotates_instead_of_filling_the_disk(tmp_path) -> None:
    import json

    path = tmp_path / "ssh" / "audit.log"
    audit = AuditLog(path, max_bytes=2000, keep=2)
    for i in range(200):
        audit("login-refused", user=f"u{i}", source="10.0.0.9", reason="unknown key")
    audit.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all((path.parent / f).stat().st_size < 2200 for f in files)
    assert all(oct((path.parent / f).stat().st_mode & 0o777) == "0o600" for f in files)
    last = json.loads(path.read_text().splitlines()[-1])
    assert (last["user"], last["event"]) == ("u199", "login-refused")
