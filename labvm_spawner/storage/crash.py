"""Crash points for the crash-safety tests.

``crashpoint(name)`` kills the process with SIGKILL when the environment
variable ``LABVM_CRASH_AT`` names that point, so a test can stop an operation at
any step boundary exactly like a power cut of the process would.
"""

from __future__ import annotations

import os
import signal

ENV = "LABVM_CRASH_AT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
