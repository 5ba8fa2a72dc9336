"""The proxy the first template configures (--proxy): one owner for its process, its runtime API,
the state saved before a reload, and its own Consul check.

The runner asks it, for each change of that file: before the write, whether the running proxy
took the change at runtime (HAProxy's admin socket) and so which check the staged file still
needs; after the write, to start or reload the proxy; after a refused check, to go back to the
file on disk. Twice a second, to restart a proxy that died and to say how it is in Consul.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from sidecar.backoff import Backoff
from templater.catalog import CRITICAL, PASSING, WARNING
from templater.errors import ProxyError, ProxyWaiting
from templater.haproxy_runtime import Outcome
from templater.proxy import KINDS, Proxy, children
from templater.registration import SelfRegistration, State, proxy_version
from templater.settings import Settings
from templater.status import Metrics

log = logging.getLogger("templater")

PROXY_PROBLEMS = ("render", "check", "reload", "proxy")  # what makes the proxy's own check critical


class ProxyHook(Protocol):
    """Applies a new proxy configuration without a reload when it can (HAProxy runtime API)."""

    @property
    def alive(self) -> bool: ...

    @property
    def draining(self) -> int: ...

    def apply(self, old: str | None, new: str) -> str: ...  # an Outcome
    def after_reload(self, new: str, workers: set[int]) -> None: ...
    def stop(self) -> None: ...


WORKER_WAIT = 30.0  # a proxy with 10,000 servers forks its first worker seconds after it starts


def first_workers(master: int) -> set[int]:
    """The workers of a master just started: HAProxy forks them once it has parsed the whole
    configuration, which takes a while with thousands of servers."""
    deadline = time.monotonic() + WORKER_WAIT
    while time.monotonic() < deadline:
        workers = children(master)
        if workers:
            return workers
        time.sleep(0.02)
    raise ProxyError(f"proxy master pid={master} forked no worker within {WORKER_WAIT:.0f} s")


class ProxyDriver:
    def __init__(self, settings: Settings, metrics: Metrics, hook: ProxyHook | None) -> None:
        assert settings.proxy is not None
        dest = settings.templates[0].dest
        log_file = None if settings.stop_proxy else dest.with_name(dest.name + ".log")
        self.proxy = Proxy(KINDS[settings.proxy], dest, settings.proxy_pid_file, log_file)
        self.hook = hook
        self._metrics = metrics
        self._user_check = settings.check
        self._stop_proxy = settings.stop_proxy
        self.registration: SelfRegistration | None = None
        if settings.register_service and not settings.once:
            page = f"http://{settings.status_addr[0]}:{settings.status_addr[1]}/routes" if settings.status_addr else ""
            self.registration = SelfRegistration(
                settings.consul, settings.register_service, self.proxy.kind.name, str(self.proxy.config),
                settings.register_address, page,
            )  # fmt: skip
        self._version = ""
        self.running_text: str | None = None  # the configuration last written for it
        self._applied: bytes | None = None  # the configuration last taken at runtime, until a reload
        # a reload that failed is tried again (capped backoff) from the file last written: else the
        # proxy served its old configuration until the next change of data, however long that was
        self._reload_again_at: float | None = None
        self._reload_backoff = Backoff(0.5, 30.0)

    def describe(self) -> dict[str, object]:
        """The proxy as the routes page shows it: kind, version, master's PID, config, drains."""
        if not self._version:
            self._version = self.registration.version if self.registration else proxy_version(self.proxy.kind.name)
        return {
            "kind": self.proxy.kind.name,
            "version": self._version or "unknown",
            "pid": self.proxy.master(),
            "config": str(self.proxy.config),
            "draining": self.hook.draining if self.hook is not None else 0,
        }

    # -- a change of its file

    def before_write(self, current: bytes | None, content: bytes) -> tuple[str, str | None]:
        """Offer the change to the running proxy first. (Outcome, check for the staged file):
        a change HAProxy took needs no check (it parsed every changed server line, and the rest
        is the structure it checked before); with the user's own --check, that check runs first
        and the runtime API comes after the write."""
        if self._user_check:
            return Outcome.SKIPPED, self._user_check
        outcome = Outcome.SKIPPED
        if self.hook is not None and current is not None and current != content and self.proxy.master() is not None:
            if content == self._applied:  # taken at runtime before; only its write failed (a full disk)
                return Outcome.APPLIED, None
            started = time.monotonic()
            outcome = self.hook.apply(current.decode(errors="replace"), content.decode(errors="replace"))
            self._applied = content if outcome == Outcome.APPLIED else None
            if outcome == Outcome.APPLIED:
                self._metrics.runtime_seconds.observe(time.monotonic() - started)
                self._metrics.history.applied("runtime API", time.monotonic() - started)
        return outcome, None if outcome == Outcome.APPLIED else self.proxy.kind.check

    def after_write(self, old: str | None, new: str | None, outcome: str) -> bool:
        """The file changed: start the proxy, or reload it unless the runtime API took the change."""
        if new is not None:
            self.running_text = new
        if outcome == Outcome.APPLIED:
            self._metrics.add(runtime_updates=1)
            return True
        return self._start_or_reload(old, new)

    def after_refusal(self, last_good: bytes | None) -> bool:
        """Part of a change HAProxy refused may have reached it: reload from the last good file."""
        log.warning("reloading %s from the last good file after a refused runtime update", self.proxy.config)
        text = last_good.decode(errors="replace") if last_good is not None else None
        return self._start_or_reload(None, text)

    def _start_or_reload(self, old: str | None, new: str | None) -> bool:
        key = f"reload:{self.proxy.key}"
        self._applied = None  # from now on it runs a file
        try:
            if self.proxy.master() is None:
                started = time.monotonic()
                pid = self.proxy.ensure_running()
                self._metrics.history.applied("start", time.monotonic() - started)
                if self.hook and new is not None:
                    self.hook.after_reload(new, first_workers(pid))
            elif self.hook and new is not None and self._user_check and self.hook.apply(old, new) == Outcome.APPLIED:
                self._metrics.add(runtime_updates=1)
            else:
                started = time.monotonic()
                workers = self.proxy.reload()
                self._metrics.add(reloads=1)
                if self.hook and new is not None:
                    self.hook.after_reload(new, workers)
                self._metrics.reload_seconds.observe(time.monotonic() - started)
                self._metrics.history.applied("reload", time.monotonic() - started)
        except ProxyError as err:
            self._metrics.add(reload_failures=1)
            self._metrics.problem(key, str(err))
            self._metrics.history.failed(key, str(err))
            delay = self._reload_backoff.next_delay()
            self._reload_again_at = time.monotonic() + delay
            log.error("%s; trying again in %.1f s", err, delay)
            return False
        self._metrics.problem(key, None)
        self._reload_again_at = None
        self._reload_backoff.reset()
        return True

    # -- twice a second

    def watchdog(self, written: bool) -> None:
        """A hook thread that died is a problem; once the file was written, a proxy that is not
        running is started again, and the proxy's own check says how it is."""
        if self.hook is not None and not self.hook.alive:
            self._metrics.problem("thread:haproxy-drain", "not running")
        if not written:
            return
        pid = self.proxy.master()
        if pid is None:
            self._report(None)  # the proxy's own check says so before the restart
            pid = self._restart()
        elif self._reload_again_at is not None and time.monotonic() >= self._reload_again_at:
            log.info("reloading %s again from its file after a failed reload", self.proxy.key)
            self._start_or_reload(None, self.running_text)
        self._report(pid)

    def _restart(self) -> int | None:
        key = f"proxy:{self.proxy.key}"
        self._applied = None
        try:
            pid = self.proxy.ensure_running()
        except ProxyWaiting as err:
            # twice a second while the backoff runs: /health shows it, the log said the failure
            self._metrics.problem(key, str(err))
            return None
        except ProxyError as err:
            self._metrics.problem(key, str(err))
            self._metrics.history.failed(key, str(err))
            log.error("%s", err)
            return None
        self._metrics.problem(key, None)
        self._reload_again_at = None  # started from the file as it is
        if self.hook is not None and self.running_text is not None:
            try:
                self.hook.after_reload(self.running_text, first_workers(pid))
            except ProxyError as err:
                log.warning("%s", err)
        return pid

    def _report(self, master: int | None) -> None:
        """The proxy's own Consul check: what a person reads in the UI about this host's proxy."""
        if self.registration is None:
            return
        kind = self.proxy.kind.name
        wrong = [(k, v) for k, v in self._metrics.problem_items() if k.split(":", 1)[0] in PROXY_PROBLEMS]
        draining = self.hook.draining if self.hook is not None else 0
        if master is None:
            state = State(CRITICAL, f"{kind} is not running; the templater is starting it")
        elif wrong:
            state = State(CRITICAL, "; ".join(f"{k}: {v}" for k, v in wrong)[:2000])
        elif draining:
            state = State(WARNING, f"{kind} pid {master}: draining {draining} removed server(s)")
        else:
            state = State(PASSING, f"{kind} pid {master} serves {self.proxy.config}")
        self.registration.update(state, master)

    def close(self) -> None:
        if self.hook is not None:
            self.hook.stop()
        if self.registration is not None:
            self.registration.deregister()
        if self._stop_proxy:
            self.proxy.stop()
        elif self.proxy.master() is not None:
            log.info("leaving %s running pid=%s (--stop-proxy stops it too)", self.proxy.key, self.proxy.master())
