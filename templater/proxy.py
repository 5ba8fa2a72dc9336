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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from sidecar.backoff import Backoff
from sidecar.signals import signal_name, terminate
from templater.errors import ProxyError, ProxyWaiting

log = logging.getLogger("templater.proxy")


@dataclass(frozen=True)
class ProxyKind:
    name: str
    binary: str
    check: str  # `{}` is the staged file
    reload_signal: int
    stop_signal: int
    # HAProxy's master executes itself again on every start and reload, and a signal that
    # reaches it before it catches and unblocks its signals again is lost (a stop or reload
    # sent right after the new worker forked was lost 15 times in 15 on HAProxy 2.6). NGINX's
    # master keeps its signals blocked between sigsuspend calls: there, blocked is ready.
    reexecs: bool = False

    def start_argv(self, config: Path, pid_file: Path) -> list[str]:
        if self.name == "haproxy":
            return [self.binary, "-W", "-db", "-f", str(config), "-p", str(pid_file)]
        # the pid file is the configuration's own `pid` directive; found by command line otherwise
        return [self.binary, "-c", str(config), "-g", "daemon off;"]


KINDS = {
    "haproxy": ProxyKind("haproxy", "haproxy", "haproxy -c -f {}", signal.SIGUSR2, signal.SIGUSR1, reexecs=True),
    "nginx": ProxyKind("nginx", "nginx", "nginx -t -c {}", signal.SIGHUP, signal.SIGQUIT),
}


def find_master(kind: ProxyKind, config: Path, pid_file: Path | None) -> int | None:
    """The proxy master serving config: from its pid file, else by command line."""
    if pid_file is not None:
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):  # HAProxy empties it to rewrite it
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


RELOAD_CONFIRM = 10.0


def takes_signals(kind: ProxyKind, pid: int) -> bool:
    """The master catches its reload and stop signals (and, for HAProxy, has unblocked them),
    so a signal sent now is acted on; from /proc/PID/status. True where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.partition(":")[::2] for line in status)
        caught, blocked = int(fields["SigCgt"], 16), int(fields["SigBlk"], 16)
    except (OSError, KeyError, ValueError):
        return True
    wanted = (1 << (kind.reload_signal - 1)) | (1 << (kind.stop_signal - 1))
    return caught & wanted == wanted and (not kind.reexecs or blocked & wanted == 0)


def children(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children()}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


class Proxy:
    """One proxy instance serving one configuration file.

    The proxy outlives the templater: it runs in its own session, and a templater that starts
    again finds it (pid file, then command line) and reloads it in place. It is stopped with
    the templater only when asked (--stop-proxy), as in a container whose PID 1 is the
    templater.
    """

    def __init__(
        self, kind: ProxyKind, config: Path, pid_file: Path | None = None, log_file: Path | None = None
    ) -> None:
        """log_file: where a proxy that outlives the templater writes its output; None shares
        the templater's (with --stop-proxy, whose lifetime it shares)."""
        self.kind = kind
        self.config = config
        self.log_file = log_file
        # nginx's `pid` directive in the file wins over ours, so we look in both places
        self.pid_file = pid_file or config.with_name(config.name + ".pid")
        self.child: subprocess.Popen[bytes] | None = None
        self._found: int | None = None  # a master started by someone else, found earlier
        self._backoff = Backoff(base=0.5, cap=30.0)
        self._next_start = 0.0

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
        """The master's pid, starting the proxy when none runs (at most once per backoff step)."""
        pid = self.master()
        if pid is not None:
            return pid
        now = time.monotonic()
        if now < self._next_start:
            raise ProxyWaiting(f"{self.key} is not running; next start attempt in {self._next_start - now:.1f} s")
        self._next_start = now + self._backoff.next_delay()
        if self.child is not None and self.child.poll() is not None:
            log.warning("proxy exited %s code=%s: starting it again", self.key, self.child.returncode)
        argv = self.kind.start_argv(self.config, self.pid_file)
        try:
            if self.log_file is None:
                self.child = subprocess.Popen(argv, start_new_session=True)
            else:
                # never the templater's stdout: a caller reading it until EOF (a pipe, --once in
                # a script) would wait as long as the proxy lives
                with open(self.log_file, "ab") as log_out:
                    self.child = subprocess.Popen(
                        argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out
                    )
        except OSError as err:
            raise ProxyError(f"cannot start {self.key}: {err}") from err
        time.sleep(0.2)
        if self.child.poll() is not None:
            raise ProxyError(f"{self.key} exited at start with code {self.child.returncode}: {' '.join(argv)}")
        pid = self.child.pid
        self._settle(pid, time.monotonic() + RELOAD_CONFIRM, lambda: bool(children(pid)))
        self._backoff.reset()
        log.info("proxy started %s pid=%d", self.key, self.child.pid)
        return self.child.pid

    def reload(self) -> set[int]:
        """Reload gracefully; the new worker pids once the master has forked them.

        A master that cannot take the new configuration (a port already in use, say) keeps its
        old workers and forks none: that is reported as a failed reload, never as success."""
        pid = self.master()
        if pid is None:
            self.ensure_running()
            return set()
        before = children(pid)
        try:
            os.kill(pid, self.kind.reload_signal)
        except ProcessLookupError as err:
            raise ProxyError(f"{self.key} master pid={pid} is gone") from err
        deadline = time.monotonic() + RELOAD_CONFIRM
        while time.monotonic() < deadline:
            new = children(pid) - before
            if new:
                self._settle(pid, deadline, lambda: True)
                log.info("proxy reloaded %s pid=%d signal=%s workers=%s", self.key, pid,
                         signal_name(self.kind.reload_signal), ",".join(map(str, sorted(new))))  # fmt: skip
                return new
            if self.child is not None and self.child.pid == pid and self.child.poll() is not None:
                break
            time.sleep(0.01)
        raise ProxyError(
            f"reload of {self.key} pid={pid} not taken: no new worker within {RELOAD_CONFIRM:.0f} s; "
            "the proxy keeps serving its previous configuration (see its log)"
        )

    def _settle(self, pid: int, deadline: float, forked: Callable[[], bool]) -> None:
        """Wait until the master has forked (forked()) and takes signals again, so that the next
        reload or stop is not lost; gives up at deadline or when our child exits."""
        while time.monotonic() < deadline:
            if forked() and takes_signals(self.kind, pid):
                return
            if self.child is not None and self.child.pid == pid and self.child.poll() is not None:
                return
            time.sleep(0.002)
        log.warning("%s pid=%d does not take signals yet; the next reload or stop may be lost", self.key, pid)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the proxy gracefully (in-flight requests finish), then kill after timeout. A
        master still settling after someone's reload gets a moment to take signals first."""
        pid = self.master()
        if pid is None:
            return
        self._settle(pid, time.monotonic() + 2.0, lambda: True)
        if self.child is not None and self.child.poll() is None:
            terminate(self.child, self.kind.stop_signal, timeout, self.key)
            log.info("proxy stopped %s pid=%d", self.key, self.child.pid)
            return
        try:
            proc = psutil.Process(pid)
            proc.send_signal(self.kind.stop_signal)
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
        log.info("proxy stopped %s pid=%d", self.key, pid)
