"""The one loop: wait for data or template edits, quiesce, render, swap, reload once per batch."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.memory import give_back
from sidecar.once import SayOnce
from templater.child import Child
from templater.deps import Catalog
from templater.proxy_driver import ProxyDriver, ProxyHook
from templater.quiesce import TEMPLATE_KEY, Pace, TemplateWaits, gather
from templater.reload import reloaded
from templater.render_step import TemplateRenderer
from templater.settings import Settings, SettingsError
from templater.sources import Sources
from templater.status import Metrics
from templater.store import FrozenView, Store
from templater.template_files import TemplateFiles, watch_templates
from templater.writer import TemplateState, Writer, Written

if TYPE_CHECKING:
    from templater.dns_sync import DnsSync

log = logging.getLogger("templater")

RETRY_KEY = "retry:writes"  # a cycle that tries again the destinations it could not write
WAIT_KEY = "wait:template"  # a cycle for a template whose own wait has run out
RELOAD_KEY = "reload:config"  # SIGHUP with -config: the files are read again


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
        self._files: TemplateFiles | None = None
        self.writer = Writer(settings, self.metrics, self.driver)
        self.waits = TemplateWaits()
        self.renderer = TemplateRenderer(self.metrics, self._warn)

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
            result = self.renderer.render(state, view, self.settings)
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
        if self._files is not None:
            self._files.stop()
            self._files = watch_templates(self.templates, self.store.touch)
        log.info(
            "configuration reloaded: %d templates (added %s, removed %s, changed %s)", len(self.templates),
            done.added or "none", done.removed or "none", done.changed or "none",
        )  # fmt: skip
        if done.restart:
            log.warning("changed in the configuration, taken only on a restart: %s", ", ".join(done.restart))

    def run(self, stop: threading.Event) -> int:
        """Until stopped (or, with --once, until every template is written). The exit code."""
        if not self.settings.once:
            self._files = watch_templates(self.templates, self.store.touch)
        if self.dns is not None:
            self.sources.watch(Catalog(self.dns.dc))
            if not self.settings.once:
                self.dns.start(self.supervisor)
        changed: set[str] = set()
        try:
            while not stop.is_set():
                if RELOAD_KEY in changed:
                    self._reload()
                result = self.cycle(changed)
                if self.settings.once and result.all_done:
                    return 1 if result.failed else 0
                if self.settings.once and result.failed and all(t.done or t.failed for t in self.templates):
                    return 1
                if result.all_done and self.settings.exec_command and not self.settings.dry:
                    self._exec(result.wrote)
                waited = self._next_changes(stop)
                if isinstance(waited, int):
                    return waited
                pace = Pace(self.settings.wait_min, self.settings.wait_max, self.settings.reload_interval)
                changed = gather(waited, self.store.wait, pace, self.writer.last_write, stop)
            return 0
        finally:
            self.close()

    def _exec(self, wrote: bool) -> None:
        """Exec mode: the child starts after the first complete render, and is reloaded when a
        template without a command of its own wrote."""
        s = self.settings
        if self.child is None:
            self.child = Child(s.exec_command or "", s.reload_signal, s.kill_signal, s.kill_timeout)
            self.child.start()
        elif wrote and any(t.spec.command is None for t in self.templates):
            self.child.reload()

    def _next_changes(self, stop: threading.Event) -> set[str] | int:
        """Wait for the next changes (data, a write to retry, a template's own wait run out),
        checking health twice a second; an exit code when the templater must end."""
        changed: set[str] = set()
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
        return changed

    def _watchdog(self) -> None:
        """Twice a second: health of threads and watches for /health; the proxy still runs."""
        self.metrics.replace_problems("thread:", self.supervisor.problems())
        self.sources.watchdog()
        if self.driver is not None:
            self.driver.watchdog(self.templates[0].done)

    def close(self) -> None:
        self.sources.close()
        if self._files is not None:
            self._files.stop()
        if self.child is not None:
            self.child.stop()
        if self.dns is not None:
            self.dns.stop()
        if self.driver is not None:
            self.driver.close()
