"""Exec mode: one supervised child process, started after the first complete render."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess

from sidecar.signals import terminate

log = logging.getLogger("templater.child")


class Child:
    def __init__(self, command: str, reload_signal: int | None, kill_signal: int, kill_timeout: float) -> None:
        self.command = command
        self.reload_signal = reload_signal
        self.kill_signal = kill_signal
        self.kill_timeout = kill_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = shlex.split(self.command)
        self.proc = subprocess.Popen(argv, start_new_session=False)
        log.info("child started pid=%d command=%s", self.proc.pid, self.command)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.running() and self.proc is not None:
            os.kill(self.proc.pid, signum)

    def reload(self) -> None:
        """After the templates changed: the reload signal, or a restart when there is none."""
        if not self.running():
            return
        if self.reload_signal is not None:
            log.info(
                "child reload pid=%d signal=%s",
                self.proc.pid if self.proc else 0,
                signal.Signals(self.reload_signal).name,
            )
            self.signal(self.reload_signal)
        else:
            self.stop()
            self.start()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        code = terminate(self.proc, self.kill_signal, self.kill_timeout, "child")
        log.info("child stopped pid=%d exit=%s", self.proc.pid, code)
        return code
