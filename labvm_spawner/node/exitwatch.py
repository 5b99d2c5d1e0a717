"""Whether a process has exited, without asking anyone: a pidfd.

A start waits for Jupyter while watching that the container has not died. Asking dockerd
(an inspect) twice a second per start was a good part of a small node's CPU with ten
starts at once; the container's init process answers the same question for nothing.
"""

from __future__ import annotations

import os
import select


class ExitWatch:
    """A pidfd, open: immune to PID reuse from then on."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def exited(self) -> bool:
        return bool(select.select([self._fd], [], [], 0)[0])

    def close(self) -> None:
        os.close(self._fd)


def exit_watch(pid: int) -> ExitWatch | None:
    """A watch on ``pid``, or None where none can be had (no PID, a process already gone
    or in no PID namespace of ours, a kernel without pidfds): then ask its owner."""
    if pid <= 0:
        return None
    try:
        return ExitWatch(os.pidfd_open(pid))
    except (OSError, AttributeError):
        return None
