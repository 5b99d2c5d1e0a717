"""LabVM's SQL databases: where they are by default, and how every one is opened.

LabVM's own database (GPU allocations, placements, enrolled nodes, migrations) is
shared by the hub, the in-process node and the admin service; the monitor keeps
its history in another. SQLite is the default for both, and several processes
write it at once, so every engine waits for the write lock instead of failing.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url

BUSY_TIMEOUT_S = 30  # SQLite's busy timeout: wait this long for another writer


def default_url(state_dir: str | Path) -> str:
    """LabVM's database of a node or hub whose state lives in ``state_dir``."""
    return f"sqlite:///{Path(state_dir) / 'labvm.sqlite'}"


def engine(url: str, file_only: bool = False) -> Engine:
    """An engine for ``url``; SQLite files get their directory, a busy timeout and may be
    used from any thread. ``file_only`` refuses an in-memory SQLite database (each pooled
    connection would see its own, empty one)."""
    parsed = make_url(url)
    connect_args: dict[str, object] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            if file_only:
                raise ValueError(f"{url}: LabVM needs a file-backed SQLite database here")
        else:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            connect_args = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}
    return create_engine(parsed, connect_args=connect_args)
