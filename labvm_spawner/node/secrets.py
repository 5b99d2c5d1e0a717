"""Handing each server's tokens to its container without writing them to disk.

Docker stores a container's environment in its config on disk, so tokens go into
a per-server file on a tmpfs (``<secrets_root>/<key>/env``, mode 0400, owned by the
container's root), bind-mounted read-only; the entrypoint reads it. The user's SSH
public keys go next to it (``authorized_keys``), where the container's sshd reads them,
so that a key added or deleted reaches a running server at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .overlay import is_mounted


class Secrets:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _ensure_tmpfs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not is_mounted(self.root):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0711",
                            "labvm-secrets", str(self.root)], check=True)

    def write(self, key: str, owner: int, secrets: dict[str, str],
              ssh_keys: list[str] | None = None) -> Path:
        """The directory to bind into ``key``'s container, holding ``secrets`` (and the
        user's ``ssh_keys``)."""
        self._ensure_tmpfs()
        d = self.root / key
        d.mkdir(mode=0o500, exist_ok=True)
        env_file = d / "env"
        body = "".join(f"{k}={_shell_quote(v)}\n" for k, v in secrets.items())
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.chown(env_file, owner, owner)
        os.chown(d, owner, owner)
        write_keys(d, ssh_keys or [])
        return d

    def set_keys(self, key: str, ssh_keys: list[str]) -> bool:
        """Replace a running server's keys; False if it has no secrets here (not running)."""
        d = self.root / key
        if not (d / "env").is_file():
            return False
        write_keys(d, ssh_keys)
        return True

    def remove(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def write_keys(secrets_dir: Path, ssh_keys: list[str]) -> None:
    """``authorized_keys`` in a server's secrets directory, replaced atomically, owned like
    its ``env`` (the container's root): sshd reads it whole or not at all."""
    fd = os.open(secrets_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        owner = os.stat("env", dir_fd=fd, follow_symlinks=False).st_uid
        tmp = ".authorized_keys.tmp"
        try:
            os.unlink(tmp, dir_fd=fd)
        except FileNotFoundError:
            pass
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400,
                      dir_fd=fd)
        with os.fdopen(out, "w") as f:
            f.write("".join(line + "\n" for line in ssh_keys))
            os.fchown(f.fileno(), owner, owner)
        os.replace(tmp, "authorized_keys", src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
