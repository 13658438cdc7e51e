"""Services a test can freeze: a private PostgreSQL cluster and a moto S3 server, each
started here as its own process group, SIGSTOPped on demand and always SIGCONTed and
stopped again.

A SIGSTOPped server is the nasty case for clients: its kernel still completes TCP
handshakes and ACKs what we send, so nothing but a client-side deadline notices that
no answer is coming.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from esper_assets_tests.conftest import free_port

STARTUP_TIMEOUT_S = 60.0
MAX_FREEZE_S = 60.0  # a frozen service is thawed after this even if the test is stuck


def find_pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian layout first, then PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def find_moto_server() -> str | None:
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.exists() else shutil.which("moto_server")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _signal_tree(pid: int, sig: int) -> None:
    """``sig`` to ``pid`` first (a stopped postmaster forks no new backends), then to
    its descendants one by one: PostgreSQL backends call setsid(), so signalling the
    postmaster's process group would miss them. Never to our own group."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid and pid != os.getpgrp():
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    todo = _children(pid)
    while todo:
        child = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, sig)
        todo.extend(_children(child))


class _Freezable:
    def _leader(self) -> int:
        raise NotImplementedError

    @contextlib.contextmanager
    def frozen(self, max_s: float = MAX_FREEZE_S) -> Iterator[None]:
        """SIGSTOP the service for the block (at most ``max_s``), SIGCONT it after."""
        leader = self._leader()
        thaw = threading.Timer(max_s, _signal_tree, (leader, signal.SIGCONT))
        thaw.daemon = True
        _signal_tree(leader, signal.SIGSTOP)
        thaw.start()
        try:
            yield
        finally:
            thaw.cancel()
            _signal_tree(leader, signal.SIGCONT)


def _wait_for_port(port: int, alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited during startup")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT_S}s")


class PrivatePostgres(_Freezable):
    """A throwaway cluster in a temporary directory, listening on 127.0.0.1 only.

    The directory is made with ``tempfile`` rather than pytest's ``tmp_path``: as root,
    initdb must run as the ``postgres`` user, which cannot enter pytest's 0700
    ``/tmp/pytest-of-root``.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="esper-frozen-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            if shutil.which("runuser"):
                command = ["runuser", "-u", "postgres", "--", *command]
            else:
                command = ["su", "postgres", "-c", shlex.join(command)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = (
                (self.root / "server.log").read_text()
                if (self.root / "server.log").exists()
                else ""
            )
            raise RuntimeError(
                f"{shlex.join(command)} failed ({done.returncode}): {done.stderr or done.stdout}{log}"
            )

    def start(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self.port = free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c shared_buffers=16MB -c max_connections=40"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "30", "start",
        )  # fmt: skip

    def _leader(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        try:
            leader = self._leader()
        except (OSError, ValueError, IndexError):
            leader = None
        try:
            if leader is not None:
                _signal_tree(leader, signal.SIGCONT)
                self._run(
                    "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "20", "stop"
                )
        except (RuntimeError, subprocess.TimeoutExpired):
            if leader is not None:
                _signal_tree(leader, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class MotoProcess(_Freezable):
    """``moto_server`` as a child process in its own session (so it can be frozen)."""

    def __init__(self, executable: str, log_dir: Path) -> None:
        self.executable = executable
        self.port = free_port()
        self._log = open(log_dir / "moto.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process: subprocess.Popen[Any] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.executable, "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = self.process
        _wait_for_port(self.port, lambda: process.poll() is None, "moto_server")

    def _leader(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                _signal_tree(self.process.pid, signal.SIGCONT)
                _signal_tree(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    _signal_tree(self.process.pid, signal.SIGKILL)
                    self.process.wait(10)
        finally:
            self._log.close()


class Outcome:
    """What a call made in :func:`bounded` did: returned ``value`` or raised ``error``."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.elapsed_s: float | None = None


def bounded(fn: Callable[[], Any], limit_s: float, what: str) -> Outcome:
    """Run ``fn`` in a daemon thread; fail the test if it is still running after
    ``limit_s`` (a liveness bound, not a benchmark). The thread of a call that hangs is
    left to finish once the service is thawed."""
    outcome = Outcome()

    def run() -> None:
        start = time.monotonic()
        try:
            outcome.value = fn()
        except BaseException as exc:  # handed to the test thread
            outcome.error = exc
        finally:
            outcome.elapsed_s = time.monotonic() - start

    thread = threading.Thread(target=run, name=f"bounded: {what}", daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        raise AssertionError(f"{what}: still blocked after {limit_s:.1f}s against a frozen service")
    return outcome
