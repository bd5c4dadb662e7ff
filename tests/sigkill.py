"""Kill a running command with SIGKILL once its outputs show it is mid-run (resume tests)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import pytest


def kill_mid_run(proc: subprocess.Popen, started: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `started()` (polled every 5 ms); skip the test if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not started():
        time.sleep(0.005)
    finished_before_kill = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if finished_before_kill:
        pytest.skip("the run finished before it could be killed")
