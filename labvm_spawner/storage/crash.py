"""Crash points for the crash-safety tests.

``crashpoint(name)`` kills the process with SIGKILL when the environment
variable ``LABVM_CRASH_AT`` names that point, so a test can stop an operation at
any step boundary exactly like a power cut of the process would. The variable is read
when the module is imported: set it in the environment of the process to crash.
"""

from __future__ import annotations

import os
import signal

ENV = "LABVM_CRASH_AT"
_AT = os.environ.get(ENV)  # read once: crash points sit on per-file paths


def crashpoint(name: str) -> None:
    if _AT is not None and _AT == name:
        os.kill(os.getpid(), signal.SIGKILL)
