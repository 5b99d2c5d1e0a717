"""The gateway's host key: made once, kept root-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import asyncssh

from ..errors import LabVMError


def load_or_make(path: Path) -> asyncssh.SSHKey:
    """The private host key at ``path``; made (ed25519, mode 0600) if there is none. A key
    file that others may read is refused rather than used."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        key = asyncssh.generate_private_key("ssh-ed25519", comment="labvm-ssh gateway")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return key
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.geteuid():
            raise LabVMError(f"{path}: the gateway's host key must be a file of its own user "
                             f"with mode 0600 (it is {stat.filemode(st.st_mode)}); fix or "
                             "remove it")
        data = f.read()
    return asyncssh.import_private_key(data)
