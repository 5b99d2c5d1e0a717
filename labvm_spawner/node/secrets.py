"""Handing each server's tokens to its container without writing them to disk.

Docker stores a container's environment in its config on disk, so tokens go into
a per-server file on a tmpfs (``<secrets_root>/<key>/env``, mode 0400, owned by the
container's root), bind-mounted read-only; the entrypoint reads it.
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

    def write(self, key: str, owner: int, secrets: dict[str, str]) -> Path:
        """The directory to bind into ``key``'s container, holding ``secrets``."""
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
        return d

    def remove(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"
