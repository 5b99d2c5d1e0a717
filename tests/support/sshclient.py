"""A user's OpenSSH client for the tests: their key, known_hosts, and the ssh config their
LabVM page shows (plus where their key is, as anyone would add)."""

from __future__ import annotations

import subprocess
from pathlib import Path


class Client:
    """One user's OpenSSH client: their key, their known_hosts, and the config their page
    gave them (plus where their key is, as anyone would add)."""

    def __init__(self, tmp: Path, user: str, key: Path, page: dict) -> None:
        self.user = user
        self.dir = tmp / f"ssh-{user}"
        self.dir.mkdir(exist_ok=True)
        known = self.dir / "known_hosts"
        known.write_text(page["gateway"]["known_hosts"] + "\n")
        self.config = self.dir / "config"
        self.config.write_text(page["gateway"]["config"] + f"""
Host *
    IdentityFile {key}
    IdentitiesOnly yes
    IdentityAgent none
    UserKnownHostsFile {known}
    StrictHostKeyChecking accept-new
    BatchMode yes
    ConnectTimeout 20
""")

    def run(self, *args: str, tool: str = "ssh", timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([tool, "-F", str(self.config), *args], capture_output=True,
                           text=True, timeout=timeout)
        if check:
            assert p.returncode == 0, f"{tool} {args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def ssh(self, command: str, host: str = "labvm", **kw) -> subprocess.CompletedProcess[str]:
        return self.run(host, command, **kw)


def keygen(tmp: Path, name: str) -> tuple[Path, str]:
    key = tmp / f"id-{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@laptop",
                    "-f", str(key)], check=True)
    return key, (tmp / f"id-{name}.pub").read_text().strip()
