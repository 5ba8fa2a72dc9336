"""HAProxy and NGINX: validate, find or start, reload gracefully.

A proxy that is not running when its configuration is first written is started as a
supervised child (HAProxy in master-worker mode); a running one is found through its pid file
or, failing that, by its command line naming the configuration file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from templater.errors import ProxyError

log = logging.getLogger("templater.proxy")


@dataclass(frozen=True)
class ProxyKind:
    name: str
    binary: str
    check: str  # `{}` is the staged file
    reload_signal: int
    stop_signal: int

    def start_argv(self, config: Path, pid_file: Path) -> list[str]:
        if self.name == "haproxy":
            return [self.binary, "-W", "-db", "-f", str(config), "-p", str(pid_file)]
        # the pid file is the configuration's own `pid` directive; found by command line otherwise
        return [self.binary, "-c", str(config), "-g", "daemon off;"]


KINDS = {
    "haproxy": ProxyKind("haproxy", "haproxy", "haproxy -c -f {}", signal.SIGUSR2, signal.SIGUSR1),
    "nginx": ProxyKind("nginx", "nginx", "nginx -t -c {}", signal.SIGHUP, signal.SIGQUIT),
}


def find_master(kind: ProxyKind, config: Path, pid_file: Path | None) -> int | None:
    """The proxy master serving config: from its pid file, else by command line."""
    if pid_file is not None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            if _is_master(kind, pid, config):
                return pid
    wanted = str(config)
    for proc in psutil.process_iter(["pid", "name", "cmdline", "ppid"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if kind.name not in (proc.info["name"] or "") or wanted not in cmdline:
                continue
            parent = psutil.Process(proc.info["ppid"])
            if kind.name in parent.name() and wanted in " ".join(parent.cmdline()):
                continue  # a worker: its parent is the master
            return int(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _is_master(kind: ProxyKind, pid: int, config: Path) -> bool:
    try:
        proc = psutil.Process(pid)
        return kind.name in proc.name() and str(config) in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class Proxy:
    """One proxy instance serving one configuration file."""

    def __init__(self, kind: ProxyKind, config: Path, pid_file: Path | None = None) -> None:
        self.kind = kind
        self.config = config
        # nginx's `pid` directive in the file wins over ours, so we look in both places
        self.pid_file = pid_file or config.with_name(config.name + ".pid")
        self.child: subprocess.Popen[bytes] | None = None
        self._found: int | None = None  # a master started by someone else, found earlier

    @property
    def key(self) -> str:
        return f"{self.kind.name}({self.config})"

    def master(self) -> int | None:
        """Our child, or the master found before while it still is one, or a new search."""
        if self.child is not None and self.child.poll() is None:
            return self.child.pid
        if self._found is not None and _is_master(self.kind, self._found, self.config):
            return self._found
        self._found = find_master(self.kind, self.config, self.pid_file)
        return self._found

    def ensure_running(self) -> int:
        pid = self.master()
        if pid is not None:
            return pid
        if self.child is not None and self.child.poll() is not None:
            log.warning("proxy exited %s code=%s: starting it again", self.key, self.child.returncode)
        argv = self.kind.start_argv(self.config, self.pid_file)
        try:
            self.child = subprocess.Popen(argv, start_new_session=True)
        except OSError as err:
            raise ProxyError(f"cannot start {self.key}: {err}") from err
        time.sleep(0.2)
        if self.child.poll() is not None:
            raise ProxyError(f"{self.key} exited at start with code {self.child.returncode}: {' '.join(argv)}")
        log.info("proxy started %s pid=%d", self.key, self.child.pid)
        return self.child.pid

    def reload(self) -> None:
        pid = self.master()
        if pid is None:
            self.ensure_running()
            return
        try:
            os.kill(pid, self.kind.reload_signal)
        except ProcessLookupError as err:
            raise ProxyError(f"{self.key} master pid={pid} is gone") from err
        log.info("proxy reloaded %s pid=%d signal=%s", self.key, pid, signal.Signals(self.kind.reload_signal).name)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the proxy only if this templater started it."""
        if self.child is None or self.child.poll() is not None:
            return
        self.child.send_signal(self.kind.stop_signal)
        try:
            self.child.wait(timeout)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        log.info("proxy stopped %s pid=%d", self.key, self.child.pid)
