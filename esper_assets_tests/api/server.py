"""``esper serve`` as a real process on a free loopback port, for the API tests and the
bench test: started with the environment it is given, waited for (bounded), stopped with
SIGTERM and then SIGKILL, its output kept for the test to read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from esper_assets.settings import SERVICE_VARIABLES
from esper_assets_tests.conftest import free_port
from esper_assets_tests.process_groups import default_signals, stop_group

ESPER = Path(sys.executable).with_name("esper")


def server_env(home: Path, **variables: str) -> dict[str, str]:
    """This process's environment without esper's service variables or a token, with
    ``ESPER_HOME=home``, usage files off, and ``variables``."""
    env = {k: v for k, v in os.environ.items()
           if k not in SERVICE_VARIABLES and k != "ESPER_API_TOKEN"}  # fmt: skip
    return env | {"ESPER_HOME": str(home), "ESPER_USAGE": "off"} | variables


class ApiServer:
    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        """``args``: more options of ``esper serve`` (e.g. ``--workers 2``)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(ESPER), "serve", "--port", str(self.port), "--log-level", "info", *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=default_signals,
            )  # fmt: skip
        self._wait_ready(30.0)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"esper serve exited {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"esper serve did not answer in {timeout_s} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        stop_group(self.process, signal.SIGTERM, 10)
