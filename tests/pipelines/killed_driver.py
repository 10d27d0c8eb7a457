"""A `capfilt` command in its own process, SIGKILLed mid-run: the crash the resume tests recover from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kill_when(args: list[str], ready: Callable[[], bool], log_path: Path, timeout_s: float,
              env: dict[str, str] | None = None, before_kill: Callable[[int], None] = lambda pid: None) -> None:
    """Run `python -m capfilt.cli ARGS` in a new session and SIGKILL it once `ready()` holds (or it
    exits, or `timeout_s` passes); `before_kill(pid)` looks at the live process first."""
    if env is None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "capfilt.cli", *args], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while not ready() and driver.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            before_kill(driver.pid)
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
