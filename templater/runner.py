"""The one loop: wait for data or template edits, quiesce, render, swap, reload once per batch."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jinja2
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from sidecar.logs import REDACTOR
from sidecar.threads import Supervisor
from templater.catalog import CRITICAL, PASSING, WARNING, Snapshot
from templater.child import Child
from templater.consul_source import CatalogSource, ConsulFetcher, kv_watch
from templater.dns_records import desired
from templater.errors import CheckFailed, CommandFailed, ProxyError, ProxyWaiting, TemplateError
from templater.fragments import Fragments
from templater.haproxy_runtime import Outcome
from templater.output import read_current, run_command, swap
from templater.proxy import KINDS, Proxy, children
from templater.registration import SelfRegistration, State
from templater.render import RenderResult, catalog_key, compile_template, env_allowed, make_environment, render
from templater.routes import RouteMemo
from templater.settings import Settings, TemplateSpec
from templater.status import Metrics
from templater.store import FrozenView, Store
from templater.watch import BlockingLoop, WatchSettings

if TYPE_CHECKING:
    from templater.dns_sync import DnsSync

log = logging.getLogger("templater")

TEMPLATE_KEY = "template:"
EDIT_SETTLE = 0.05


class Source(Protocol):
    key: str

    @property
    def loops(self) -> list[BlockingLoop]: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...


class ProxyHook(Protocol):
    """Applies a new proxy configuration without a reload when it can (HAProxy runtime API)."""

    @property
    def alive(self) -> bool: ...

    @property
    def draining(self) -> int: ...

    def apply(self, old: str | None, new: str) -> str: ...  # an Outcome
    def after_reload(self, new: str, workers: set[int]) -> None: ...
    def stop(self) -> None: ...


PROXY_PROBLEMS = ("render", "check", "reload", "proxy")  # what makes the proxy's own check critical
WARNED_MAX = 10_000  # distinct warnings remembered (said once each); the oldest are forgotten


@dataclass
class TemplateState:
    spec: TemplateSpec
    compiled: jinja2.Template | None = None
    fragments: Fragments = field(default_factory=Fragments)  # its kept {% cache %} blocks
    routes: RouteMemo = field(default_factory=RouteMemo)  # routes() per service, across renders
    result: RenderResult | None = None
    deps: set[str] = field(default_factory=set)
    done: bool = False  # rendered completely and written at least once
    failed: bool = False
    last_text: str | None = None
    waiting: str = ""


class _TemplateEvents(FileSystemEventHandler):
    def __init__(self, paths: set[str], store: Store) -> None:
        self._paths = paths
        self._store = store

    def on_any_event(self, event: FileSystemEvent) -> None:
        # reading a template (ours included) raises opened/closed events: only writes count
        if event.event_type not in ("modified", "created", "moved", "deleted", "closed"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(path) if path else ""
            if path in self._paths:
                self._store.touch(TEMPLATE_KEY + path)


STALE_NOTICE = 2.0  # a stale read this far behind the leader is said in the log


class Runner:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, proxy_hook: ProxyHook | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.store = Store(settings.empty_grace)
        self.fetcher = ConsulFetcher(settings.consul)
        self.watch_settings = WatchSettings(
            stale=settings.max_stale_ms > 0,
            max_stale_ms=settings.max_stale_ms,
            backoff_base=settings.retry_backoff,
            backoff_cap=settings.retry_max_backoff,
        )
        self.env = make_environment()
        self.templates = [TemplateState(spec) for spec in settings.templates]
        self.sources: dict[str, Source] = {}
        self.down: dict[str, str] = {}
        self.failed_attempts: dict[str, int] = {}  # query -> failed attempts in a row
        self.state_lock = threading.Lock()
        self.supervisor = Supervisor()
        self.warned: dict[str, None] = {}  # insertion-ordered, capped at WARNED_MAX
        self.child: Child | None = None
        self.proxy: Proxy | None = None
        self.proxy_hook = proxy_hook
        if settings.proxy and not settings.dry:
            dest = settings.templates[0].dest
            log_file = None if settings.stop_proxy else dest.with_name(dest.name + ".log")
            self.proxy = Proxy(KINDS[settings.proxy], dest, settings.proxy_pid_file, log_file)
        self.registration: SelfRegistration | None = None
        if self.proxy is not None and settings.register_service and not settings.once:
            self.registration = SelfRegistration(
                settings.consul, settings.register_service, self.proxy.kind.name, str(self.proxy.config),
                settings.register_address,
            )  # fmt: skip
        self.dns: DnsSync | None = None
        if settings.dns is not None:
            # dnspython is imported only when DNS is asked for: no start-up cost otherwise
            from templater.dns_sync import make_dns_sync

            self.dns = make_dns_sync(settings, self.metrics, self._warn)
        self._observer: Any = None
        self.wrote = False
        self.last_write = 0.0  # when a destination last changed (--reload-interval)
        self.stale_reported = False

    # -- callbacks from watch threads

    def _on_state(self, key: str, up: bool, error: str) -> None:
        with self.state_lock:
            was_up = not self.down
            if up:
                self.down.pop(key, None)
                self.failed_attempts.pop(key, None)
            else:
                self.down[key] = error
                self.failed_attempts[key] = self.failed_attempts.get(key, 0) + 1
            now_up = not self.down
            self.metrics.consul_up = now_up
            self.metrics.consul_error = "" if now_up else next(iter(self.down.values()))
        if not up:
            self._stand_in_for_other_dc(key, error)
        if was_up and not now_up:
            what = "consul refused a read (ACL)" if error.startswith("permission denied") else "consul unavailable"
            log.warning("%s, keeping the last good output, will retry: %s", what, error)
        elif now_up and not was_up:
            log.info("consul available again")

    def _stand_in_for_other_dc(self, loop_key: str, error: str) -> None:
        """Another datacenter's catalog that cannot be read (a WAN partition, a dc that does not
        exist) and has never been: templates render as if it had no services, with a warning,
        rather than everything waiting for it. Its watch goes on and replaces this when it reads."""
        source_key = loop_key.rsplit(".", 1)[0]
        if not source_key.startswith("catalog(") or source_key == catalog_key(None):
            return
        dc = source_key[len("catalog(") : -1]
        if not self.store.has_catalog(source_key):
            self._warn(f"{source_key}: cannot be read ({error}); rendering as if datacenter {dc} had no services")
            self.store.publish_catalog(source_key, Snapshot())

    def _warn(self, message: str) -> None:

        with self.state_lock:
            if message in self.warned:
                return
            self.warned[message] = None
            if len(self.warned) > WARNED_MAX:
                del self.warned[next(iter(self.warned))]
        log.warning("%s", message)

    # -- sources

    def _ensure_sources(self, state: TemplateState) -> None:
        result = state.result
        if result is None:
            return
        for key in sorted(result.used):
            if key in result.catalogs:
                self._watch_catalog(key, result.catalogs[key])
            elif key not in self.sources:
                req = result.kv[key]
                self._start_source(key, kv_watch(
                    key, req.path, req.recurse, req.dc, self.fetcher, self.store.publish_kv, self._on_state,
                    self.watch_settings, self.supervisor,
                ))  # fmt: skip

    def _watch_catalog(self, key: str, dc: str) -> None:
        """One watch per datacenter, shared by every template and the DNS sync."""
        if key not in self.sources:
            self._start_source(key, CatalogSource(
                dc, self.fetcher, self.store.publish_catalog, self._on_state, self.watch_settings, self._warn,
                self.supervisor,
            ))  # fmt: skip

    def _start_source(self, key: str, source: Source) -> None:
        log.info("watching %s", key)
        self.sources[key] = source
        source.start()

    def _drop_unused_sources(self) -> None:
        if any(t.failed or t.result is None for t in self.templates):
            return  # a broken template may need its old dependencies again
        used = set().union(*(t.deps for t in self.templates))
        if self.dns is not None:
            used.add(catalog_key(self.dns.dc))
        for key in sorted(set(self.sources) - used):
            log.info("no longer watching %s", key)
            self.sources.pop(key).stop()
            self.store.forget(key)

    # -- rendering

    def _load(self, state: TemplateState) -> None:
        spec = state.spec
        try:
            source = spec.source.read_text()
        except OSError as err:
            raise TemplateError(spec.name, None, f"cannot read: {err}") from err
        if not source.strip():
            # an empty source is a file caught mid-write, never a config anyone wants
            raise TemplateError(spec.name, None, "template file is empty")
        state.compiled = compile_template(self.env, spec.name, source)
        state.fragments = Fragments()  # blocks of the old source mean nothing to the new one

    def _render(self, state: TemplateState, view: FrozenView) -> RenderResult | None:
        spec = state.spec
        try:
            if state.compiled is None:
                self._load(state)
            assert state.compiled is not None
            allow = self.settings.env_allow
            env_vars = {k: v for k, v in os.environ.items() if env_allowed(k, allow)}
            result = render(
                state.compiled, spec.name, view, self.settings.variables, env_vars, allow, state.fragments, state.routes
            )
        except TemplateError as err:
            state.failed = True
            self.metrics.add(render_failures=1)
            self.metrics.problem(f"render:{spec.name}", REDACTOR.text(str(err)))
            log.error("%s; keeping the last good %s", err, spec.dest)
            return None
        self.metrics.problem(f"render:{spec.name}", None)
        for warning in result.warnings:
            self._warn(f"template {spec.name}: {warning}")
        state.failed = False
        state.result = result
        state.deps = set(result.used)
        self.metrics.add(renders=1)
        return result

    def _check_for(self, index: int) -> str | None:
        if self.settings.check:
            return self.settings.check
        if self.proxy is not None and index == 0:
            return self.proxy.kind.check
        return None

    def cycle(self, changed: set[str]) -> tuple[bool, bool]:
        """Render what changed, write, then one command/reload per batch. (all_done, any_failed)

        self.wrote tells whether any destination changed in this cycle."""
        self.wrote = False
        commands: list[str] = []
        reload_proxy = False
        any_failed = False
        new_proxy_text: str | None = None
        old_proxy_text: str | None = None
        view = self.store.view()
        for index, state in enumerate(self.templates):
            spec = state.spec
            edited = TEMPLATE_KEY + str(spec.source) in changed
            if edited:
                state.compiled = None
            if state.done and not edited and not (state.deps & changed) and not state.failed:
                continue
            started = time.perf_counter()
            result = self._render(state, view)
            render_ms = (time.perf_counter() - started) * 1000
            if result is None:
                any_failed = True
                continue
            self._ensure_sources(state)
            if not result.complete:
                waiting = ", ".join(sorted(result.missing))
                if waiting != state.waiting:
                    log.info("template %s waiting for %s", spec.name, waiting)
                state.waiting = waiting
                continue
            state.waiting = ""
            content = result.text.encode()
            if self.settings.dry:
                if result.text != state.last_text:
                    sys.stdout.write(f"> {spec.dest}\n{result.text}")
                    sys.stdout.flush()
                state.last_text = result.text
                state.done = True
                continue
            runtime = False
            outcome = Outcome.SKIPPED
            try:
                current = read_current(spec.dest)
                check = self._check_for(index)
                if index == 0 and check is not None and not self.settings.check:
                    outcome = self._runtime_first(current, content)
                    runtime = outcome == Outcome.APPLIED
                    if runtime:
                        # HAProxy parsed and took every changed server line; the rest of the
                        # file is the structure it checked before: the check would only cost time
                        check = None
                changed_file = swap(spec.dest, content, current, spec.name, check, self.settings.backup)
            except CheckFailed as err:
                state.failed = True
                any_failed = True
                self.metrics.add(check_failures=1)
                self.metrics.problem(f"check:{spec.name}", str(err).splitlines()[0])
                log.error("%s; keeping the last good %s", err, spec.dest)
                if outcome == Outcome.REFUSED:
                    # part of the change may have reached the running proxy before the refusal:
                    # reload it from the file on disk, the last good one
                    log.warning("reloading %s from the last good file after a refused runtime update", spec.dest)
                    any_failed |= not self._apply_proxy(None, current.decode(errors="replace") if current else None)
                continue
            except OSError as err:
                state.failed = True
                any_failed = True
                log.error("cannot write %s for template %s: %s", spec.dest, spec.name, err)
                continue
            self.metrics.problem(f"check:{spec.name}", None)
            state.done = True
            state.last_text = result.text
            if not changed_file:
                continue
            self.metrics.add(writes=1)
            self.wrote = True
            self.last_write = time.monotonic()
            log.info("rendered %s -> %s render_ms=%.1f", spec.name, spec.dest, render_ms)
            if spec.command:
                if spec.command not in commands:
                    commands.append(spec.command)
            elif self.proxy is not None:
                if runtime:
                    self.metrics.add(runtime_updates=1)
                    continue
                reload_proxy = True
                if index == 0:
                    old_proxy_text = current.decode(errors="replace") if current is not None else None
                    new_proxy_text = result.text
        for command in commands:
            try:
                run_command(command)
                self.metrics.add(reloads=1)
                log.info("command ran: %s", command)
            except CommandFailed as err:
                any_failed = True
                self.metrics.add(reload_failures=1)
                log.error("%s", err)
        if reload_proxy:
            any_failed |= not self._apply_proxy(old_proxy_text, new_proxy_text)
        since = self.store.take_since()
        if self.wrote and since is not None:
            self.metrics.change_to_write.observe(time.monotonic() - since)
        all_done = all(t.done for t in self.templates)
        if self.dns is not None:
            dns_ok = self._dns_cycle(view, changed)
            all_done &= dns_ok is not None
            any_failed |= dns_ok is False
        if all_done and not any_failed:
            self.metrics.last_success = time.time()
        self._drop_unused_sources()
        self.metrics.watched = len(set().union(*((t.result.queries if t.result else set()) for t in self.templates)))
        self.metrics.held = self.store.held()
        return all_done, any_failed

    def _dns_cycle(self, view: FrozenView, changed: set[str]) -> bool | None:
        """Offer the records the catalog now asks for to the DNS worker (--once: sync here).
        None until the catalog has been read: nothing is ever sent before Consul answered."""
        assert self.dns is not None
        snapshot = view.catalog(self.dns.dc)
        if snapshot is None:
            return None
        if self.dns.offered and catalog_key(self.dns.dc) not in changed:
            return True
        want = desired(snapshot, self.dns.server.naming)
        if self.settings.once:
            return self.dns.sync_now(want)
        self.dns.offer(want)
        return True

    def _runtime_first(self, current: bytes | None, content: bytes) -> str:
        """Apply a server-only change to the running proxy before writing it. An Outcome."""
        if self.proxy is None or self.proxy_hook is None or current is None or current == content:
            return Outcome.SKIPPED
        if self.proxy.master() is None:
            return Outcome.SKIPPED
        started = time.monotonic()
        outcome = self.proxy_hook.apply(current.decode(errors="replace"), content.decode(errors="replace"))
        if outcome == Outcome.APPLIED:
            self.metrics.runtime_seconds.observe(time.monotonic() - started)
        return outcome

    def _apply_proxy(self, old: str | None, new: str | None) -> bool:
        """Start the proxy, or reload it (the runtime API was tried before the write)."""
        assert self.proxy is not None
        key = f"reload:{self.proxy.key}"
        try:
            if self.proxy.master() is None:
                pid = self.proxy.ensure_running()
                if self.proxy_hook and new is not None:
                    self.proxy_hook.after_reload(new, children(pid))
                self.metrics.problem(key, None)
                return True
            if (
                self.proxy_hook
                and new is not None
                and self.settings.check
                and self.proxy_hook.apply(old, new) == Outcome.APPLIED
            ):
                # with the user's own --check the write came first; the runtime API comes after it
                self.metrics.add(runtime_updates=1)
                return True
            started = time.monotonic()
            workers = self.proxy.reload()
            self.metrics.add(reloads=1)
            if self.proxy_hook and new is not None:
                self.proxy_hook.after_reload(new, workers)
            self.metrics.reload_seconds.observe(time.monotonic() - started)
            self.metrics.problem(key, None)
            return True
        except ProxyError as err:
            self.metrics.add(reload_failures=1)
            self.metrics.problem(key, str(err))
            log.error("%s", err)
            return False

    # -- the loop

    def _watch_templates(self) -> None:
        paths = {str(t.spec.source) for t in self.templates}
        observer = Observer()
        handler = _TemplateEvents(paths, self.store)
        for directory in sorted({str(Path(p).parent) for p in paths}):
            observer.schedule(handler, directory, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _quiesce(self, changed: set[str], stop: threading.Event) -> set[str]:
        while any(k.startswith(TEMPLATE_KEY) for k in changed) and not stop.is_set():
            more = self.store.wait(EDIT_SETTLE)  # a file being written arrives in several events
            if not more:
                break
            changed |= more
        changed = self._space_out(changed, stop)
        if self.settings.wait_min <= 0:
            return changed
        first = last = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            remaining = min(last + self.settings.wait_min, first + self.settings.wait_max) - now
            if remaining <= 0:
                break
            more = self.store.wait(remaining)
            if more:
                changed |= more
                last = time.monotonic()
        return changed

    def _space_out(self, changed: set[str], stop: threading.Event) -> set[str]:
        """--reload-interval: the first change after a quiet spell is written at once; changes
        that follow within the interval are gathered into one write when it has passed, so a
        burst costs a reload per interval, and a lone change no wait at all."""
        interval = self.settings.reload_interval
        if interval <= 0:
            return changed
        while not stop.is_set():
            remaining = self.last_write + interval - time.monotonic()
            if remaining <= 0:
                break
            changed |= self.store.wait(remaining)
        return changed

    def run(self, stop: threading.Event) -> int:
        """Until stopped (or, with --once, until every template is written). The exit code."""
        if not self.settings.once:
            self._watch_templates()
        if self.dns is not None:
            self._watch_catalog(catalog_key(self.dns.dc), self.dns.dc)
            if not self.settings.once:
                self.dns.start(self.supervisor)
        changed: set[str] = set()
        started_child = False
        try:
            while not stop.is_set():
                all_done, failed = self.cycle(changed)
                if self.settings.once and all_done:
                    return 1 if failed else 0
                if self.settings.once and failed and all(t.done or t.failed for t in self.templates):
                    return 1
                if all_done and self.settings.exec_command and not self.settings.dry:
                    if not started_child:
                        self.child = Child(
                            self.settings.exec_command,
                            self.settings.reload_signal,
                            self.settings.kill_signal,
                            self.settings.kill_timeout,
                        )
                        self.child.start()
                        started_child = True
                    elif self.wrote and any(t.spec.command is None for t in self.templates):
                        assert self.child is not None
                        self.child.reload()
                changed = set()
                while not stop.is_set() and not changed:
                    changed = self.store.wait(0.5)
                    if self._gave_up():
                        return 1
                    if self.child is not None and not self.child.running():
                        code = self.child.exit_code()
                        log.info("child exited code=%s; stopping", code)
                        return code or 0
                    self._watchdog()
                changed = self._quiesce(changed, stop)
            return 0
        finally:
            self.close()

    def _watchdog(self) -> None:
        """Twice a second: health of threads and watches for /health; the proxy still runs."""
        now = time.monotonic()
        self.metrics.replace_problems("thread:", self.supervisor.problems())
        if self.proxy_hook is not None and not self.proxy_hook.alive:
            self.metrics.problem("thread:haproxy-drain", "not running")
        stale = {
            loop.key: f"no answer from Consul for {now - loop.last_ok:.0f} s"
            for source in list(self.sources.values())
            for loop in source.loops
            if loop.stale(now)
        }
        self.metrics.replace_problems("watch:", stale)
        self.metrics.consul_requests = self.fetcher.requests
        self.metrics.consul_bytes = self.fetcher.bytes
        self._report_staleness()
        if self.proxy is None or not self.templates[0].done:
            return
        pid = self.proxy.master()
        if pid is None:
            self._report(None)  # the proxy's own check says so before the restart
            pid = self._restart_proxy()
        self._report(pid)

    def _gave_up(self) -> bool:
        """--once: a query failed --retry-attempts times in a row (consul-template's retry)."""
        attempts = self.settings.retry_attempts
        if not self.settings.once or attempts <= 0:
            return False
        with self.state_lock:
            exhausted = [(k, self.down.get(k, "")) for k, n in self.failed_attempts.items() if n >= attempts]
        if exhausted:
            key, error = exhausted[0]
            log.error("--once: giving up after %d failed attempts of %s: %s", attempts, key, error)
        return bool(exhausted)

    def _report_staleness(self) -> None:
        """Stale reads (--max-stale) that a server answered without a leader, or long after it
        heard from one: the output may lag the cluster. Said once in the log as it starts and
        ends; /metrics and /health show the figures all along."""
        last_contact = self.fetcher.last_contact_ms / 1000
        known_leader = self.fetcher.known_leader
        self.metrics.last_contact = last_contact
        self.metrics.known_leader = known_leader
        stale = not known_leader or last_contact > STALE_NOTICE
        if stale and not self.stale_reported:
            log.warning(
                "rendering from stale reads: the Consul server answering has %s, last contact %.1f s ago "
                "(accepted up to --max-stale %.0f s); the output may lag the cluster",
                "no leader" if not known_leader else "a leader", last_contact, self.settings.max_stale_ms / 1000,
            )  # fmt: skip
        elif not stale and self.stale_reported:
            log.info("reads are fresh again: the Consul servers have a leader")
        self.stale_reported = stale

    def _restart_proxy(self) -> int | None:
        assert self.proxy is not None
        key = f"proxy:{self.proxy.key}"
        try:
            pid = self.proxy.ensure_running()
        except ProxyWaiting as err:
            # twice a second while the backoff runs: /health shows it, the log said the failure
            self.metrics.problem(key, str(err))
            return None
        except ProxyError as err:
            self.metrics.problem(key, str(err))
            log.error("%s", err)
            return None
        self.metrics.problem(key, None)
        if self.proxy_hook is not None and self.templates[0].last_text is not None:
            try:
                self.proxy_hook.after_reload(self.templates[0].last_text, children(pid))
            except ProxyError as err:
                log.warning("%s", err)
        return pid

    def _report(self, master: int | None) -> None:
        """The proxy's own Consul check: what a person reads in the UI about this host's proxy."""
        if self.registration is None or self.proxy is None:
            return
        kind = self.proxy.kind.name
        wrong = [(k, v) for k, v in self.metrics.problem_items() if k.split(":", 1)[0] in PROXY_PROBLEMS]
        draining = self.proxy_hook.draining if self.proxy_hook is not None else 0
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
        for source in self.sources.values():
            source.stop()
        self.sources.clear()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(2)
        if self.child is not None:
            self.child.stop()
        if self.dns is not None:
            self.dns.stop()
        if self.proxy_hook is not None:
            self.proxy_hook.stop()
        if self.registration is not None:
            self.registration.deregister()
        if self.proxy is not None and self.settings.stop_proxy:
            self.proxy.stop()
        elif self.proxy is not None and self.proxy.master() is not None:
            log.info("leaving %s running pid=%s (--stop-proxy stops it too)", self.proxy.key, self.proxy.master())
