"""Servers a test starts as a process group of its own (``dg dev``, ``dagster-daemon``,
a code server): their children (webserver, run workers) are stopped with them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def default_signals() -> None:
    """In the child (``preexec_fn``): Ctrl-C and SIGTERM act as in a terminal, even if
    pytest was started with them ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_group(process: subprocess.Popen, first: signal.Signals, wait_s: float) -> None:
    """``first`` to the whole group (the server's own shutdown), up to ``wait_s`` for it
    to end, then SIGKILL; then SIGKILL to whatever of the group outlived it."""
    for sig, wait in ((first, wait_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
