"""The one loop: wait for data or template edits, quiesce, render, swap, reload once per batch."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2.sandbox import SandboxedEnvironment
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from sidecar.logs import REDACTOR
from sidecar.memory import gc_paused, give_back
from sidecar.once import SayOnce
from templater.child import Child
from templater.deps import Catalog
from templater.errors import TemplateError
from templater.fragments import Fragments
from templater.output import side_dir
from templater.proxy_driver import ProxyDriver, ProxyHook
from templater.quiesce import TemplateWaits
from templater.reload import reloaded
from templater.render import RenderResult, compile_go, compile_template, env_allowed, make_environment, render
from templater.settings import Settings, SettingsError
from templater.sources import Sources
from templater.status import Metrics
from templater.store import FrozenView, Store
from templater.writer import TemplateState, Writer, Written

if TYPE_CHECKING:
    from templater.dns_sync import DnsSync

log = logging.getLogger("templater")

TEMPLATE_KEY = "template:"
RETRY_KEY = "retry:writes"  # a cycle that tries again the destinations it could not write
WAIT_KEY = "wait:template"  # a cycle for a template whose own wait has run out
RELOAD_KEY = "reload:config"  # SIGHUP with -config: the files are read again
EDIT_SETTLE = 0.05


WARNED_MAX = 10_000  # distinct warnings remembered (said once each); the oldest are forgotten


@dataclass(frozen=True)
class CycleResult:
    all_done: bool  # every template written (and the DNS sync offered its records)
    failed: bool
    wrote: bool  # a destination changed


def _due(state: TemplateState, changed: set[str]) -> bool:
    """Whether a cycle for these changes renders the template: its data changed, it was never
    written, it failed; a cycle that only retries writes renders those whose write failed."""
    if changed == {RETRY_KEY}:
        return bool(state.write_error)
    return not state.done or bool(state.deps & changed) or state.failed


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


class Runner:
    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, proxy_hook: ProxyHook | None = None,
        reread: Callable[[], Settings] | None = None,
    ) -> None:  # fmt: skip
        """reread: the settings read again from the same command line (SIGHUP with -config)."""
        self.settings = settings
        self._reread = reread
        self.metrics = metrics or Metrics()
        self.metrics.watched = self._watched
        self.store = Store(settings.empty_grace)
        self._envs: dict[tuple[tuple[str, str], bool], SandboxedEnvironment] = {}  # by delimiters, strictness
        self.templates = [TemplateState(spec) for spec in settings.templates]
        self.state_lock = threading.Lock()
        self.sources = Sources(settings, self.store, self.metrics, self._warn)
        self.supervisor = self.sources.supervisor
        self.warned = SayOnce(WARNED_MAX)  # each distinct warning once
        self.child: Child | None = None
        self.driver = ProxyDriver(settings, self.metrics, proxy_hook) if settings.proxy and not settings.dry else None
        self.dns: DnsSync | None = None
        if settings.dns is not None:
            # dnspython is imported only when DNS is asked for: no start-up cost otherwise
            from templater.dns_sync import make_dns_sync

            self.dns = make_dns_sync(settings, self.metrics, self._warn)
        self._observer: Any = None
        self.writer = Writer(settings, self.metrics, self.driver)
        self.waits = TemplateWaits()

    # -- callbacks from watch threads

    def _warn(self, message: str) -> None:

        with self.state_lock:
            fresh = self.warned.new(message)
        if fresh:
            log.warning("%s", message)
            self.metrics.history.warned(message)

    # -- sources

    def _drop_unused_sources(self) -> None:
        if any(t.failed or t.result is None for t in self.templates):
            return  # a broken template may need its old dependencies again
        used = set().union(*(t.deps for t in self.templates))
        if self.dns is not None:
            used.add(Catalog(self.dns.dc).key)
        self.sources.keep_only(used)

    # -- rendering

    def _load(self, state: TemplateState) -> None:
        spec = state.spec
        try:
            source = spec.source.read_text() if spec.contents is None else spec.contents
        except OSError as err:
            raise TemplateError(spec.name, None, f"cannot read: {err}") from err
        if not source.strip():
            # an empty source is a file caught mid-write, never a config anyone wants
            raise TemplateError(spec.name, None, "template file is empty")
        if spec.go:
            state.compiled = compile_go(spec.name, source, spec.delimiters, spec.strict)
            return
        options = (spec.delimiters, spec.strict)
        if options not in self._envs:
            self._envs[options] = make_environment(*options)
        state.compiled = compile_template(self._envs[options], spec.name, source)
        state.fragments = Fragments()  # blocks of the old source mean nothing to the new one

    def _render(self, state: TemplateState, view: FrozenView) -> RenderResult | None:
        spec = state.spec
        try:
            if state.compiled is None:
                self._load(state)
            assert state.compiled is not None
            allow = self.settings.env_allow
            env_vars = {k: v for k, v in os.environ.items() if env_allowed(k, allow)}
            with gc_paused:  # its reference cycles are collected after the write (_finish)
                result = render(
                    state.compiled, spec.name, view, self.settings.variables, env_vars, allow, state.fragments,
                    state.routes, side_dir(spec.dest).as_posix(),
                )  # fmt: skip
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
        state.deps = {dep.key for dep in result.used}
        self.metrics.add(renders=1)
        return result

    # -- the cycle: render, write, hand what changed to its consumers

    def cycle(self, changed: set[str]) -> CycleResult:
        """Render what changed, write it, then one command or proxy reload per batch."""
        view = self.store.view()
        written: list[Written] = []
        failed = rendered = False
        for index, state in enumerate(self.templates):
            if TEMPLATE_KEY + str(state.spec.source) in changed:
                state.compiled = None
            elif state.spec.wait and state.done and not state.failed and changed != {RETRY_KEY}:
                # its own wait: rendered once its data has been quiet long enough
                if not self.waits.ready(index, state.spec.wait, bool(state.deps & changed), time.monotonic()):
                    continue
            elif not _due(state, changed):
                continue
            started = time.perf_counter()
            result = self._render(state, view)
            rendered = True
            if result is None:
                failed = True
                continue
            for dep in sorted(result.used, key=lambda d: d.key):
                self.sources.watch(dep)
            step = self.writer.write(index, state, result, (time.perf_counter() - started) * 1000)
            failed |= step is False
            if isinstance(step, Written):
                written.append(step)
        failed |= not self.writer.hand_over(written)
        return self._finish(view, changed, written, failed, rendered)

    def _finish(
        self, view: FrozenView, changed: set[str], written: list[Written], failed: bool, rendered: bool
    ) -> CycleResult:
        since = self.store.take_since()
        if written and since is not None:
            self.metrics.change_to_write.observe(time.monotonic() - since)
            self.metrics.history.change(time.monotonic() - since)
        all_done = all(t.done for t in self.templates)
        if self.dns is not None:
            dns_ok = self.dns.cycle(view, changed, self.settings.once)
            all_done &= dns_ok is not None
            failed |= dns_ok is False
        if all_done and not failed:
            self.metrics.last_success = time.time()
        self._drop_unused_sources()
        self.metrics.held = self.store.held()
        if rendered:
            # a render leaves its context and the block callers in reference cycles; collected
            # only by the cyclic collector, a render's worth of them (a megabyte and more for a
            # large template) piled up for several renders. Young ones only, after the write:
            # a few ms, off the path of the change; then what was freed goes back to the system
            gc.collect(1)
            give_back()
        return CycleResult(all_done, failed, bool(written))

    def _watched(self) -> int:
        return len(set().union(*(t.result.queries for t in self.templates if t.result is not None)))

    # -- the loop

    def _watch_templates(self) -> None:
        paths = {str(t.spec.source) for t in self.templates if t.spec.contents is None}
        observer = Observer()
        handler = _TemplateEvents(paths, self.store)
        for directory in sorted({str(Path(p).parent) for p in paths}):
            observer.schedule(handler, directory, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _reload(self) -> None:
        """The -config files read again; a broken one keeps the running configuration."""
        if self._reread is None:
            return
        try:
            fresh = self._reread()
        except SettingsError as err:
            log.error("configuration not reloaded, the running one stays: %s", err)
            return
        done = reloaded(self.settings, self.templates, fresh)
        self.settings = self.writer.settings = done.settings
        self.templates = done.templates
        for name in done.removed + done.changed:  # what they said on /health is no longer so
            for kind in ("render", "check", "write"):
                self.metrics.problem(f"{kind}:{name}", None)
            self.writer.forget(name)
        logging.getLogger().setLevel(done.settings.log_level)
        if self._observer is not None:
            self._observer.stop()
            self._watch_templates()
        log.info(
            "configuration reloaded: %d templates (added %s, removed %s, changed %s)", len(self.templates),
            done.added or "none", done.removed or "none", done.changed or "none",
        )  # fmt: skip
        if done.restart:
            log.warning("changed in the configuration, taken only on a restart: %s", ", ".join(done.restart))

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
            remaining = self.writer.last_write + interval - time.monotonic()
            if remaining <= 0:
                break
            changed |= self.store.wait(remaining)
        return changed

    def run(self, stop: threading.Event) -> int:
        """Until stopped (or, with --once, until every template is written). The exit code."""
        if not self.settings.once:
            self._watch_templates()
        if self.dns is not None:
            self.sources.watch(Catalog(self.dns.dc))
            if not self.settings.once:
                self.dns.start(self.supervisor)
        changed: set[str] = set()
        started_child = False
        try:
            while not stop.is_set():
                if RELOAD_KEY in changed:
                    self._reload()
                result = self.cycle(changed)
                all_done, failed = result.all_done, result.failed
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
                    elif result.wrote and any(t.spec.command is None for t in self.templates):
                        assert self.child is not None
                        self.child.reload()
                changed = set()
                while not stop.is_set() and not changed:
                    next_at = [t for t in (self.writer.retry_at, self.waits.next_due()) if t is not None]
                    changed = self.store.wait(max(0.0, min([0.5, *(t - time.monotonic() for t in next_at)])))
                    if not changed and self.writer.retry_due():
                        changed = {RETRY_KEY}
                    due = self.waits.next_due()
                    if not changed and due is not None and time.monotonic() >= due:
                        changed = {WAIT_KEY}
                    if self.sources.gave_up():
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
        self.metrics.replace_problems("thread:", self.supervisor.problems())
        self.sources.watchdog()
        if self.driver is not None:
            self.driver.watchdog(self.templates[0].done)

    def close(self) -> None:
        self.sources.close()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(2)
        if self.child is not None:
            self.child.stop()
        if self.dns is not None:
            self.dns.stop()
        if self.driver is not None:
            self.driver.close()
