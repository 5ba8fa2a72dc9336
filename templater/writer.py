"""The output stage of a cycle: a rendered template to its destination, then what changed to
its consumers (each template's command once per batch, the proxy once after its files).

Compare, stage, check, rename (output.swap); the proxy's driver is asked first whether the
running proxy took the change at runtime. A destination that cannot be written keeps its last
good file and is tried again with a capped backoff, without a new change of data.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import jinja2

from sidecar.backoff import Backoff
from templater.errors import CheckFailed, CommandFailed
from templater.fragments import Fragments
from templater.haproxy_runtime import Outcome
from templater.output import (
    FileOptions,
    owner_ids,
    read_current,
    remove_stale_side_files,
    run_command,
    swap,
    write_side_files,
)
from templater.proxy_driver import ProxyDriver
from templater.render import RenderResult
from templater.routes import RouteMemo
from templater.settings import Settings
from templater.status import Metrics
from templater.template_spec import TemplateSpec

log = logging.getLogger("templater")

WRITE_RETRY = (1.0, 30.0)  # a destination it cannot write (a full or read-only disk): backoff


@dataclass(frozen=True)
class Written:
    """A destination that changed in a cycle (old and new text for the proxy's own file)."""

    spec: TemplateSpec
    outcome: str  # what the proxy's runtime API did with it (Outcome)
    old_text: str | None
    new_text: str | None


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
    write_error: str = ""  # why the last write of its destination failed, "" when it did not


class Writer:
    def __init__(self, settings: Settings, metrics: Metrics, driver: ProxyDriver | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.driver = driver
        self.last_write = 0.0  # when a destination last changed (--reload-interval)
        self._backoff = Backoff(*WRITE_RETRY)
        self._failing: set[str] = set()  # templates whose destination could not be written
        self.retry_at: float | None = None  # when to try those again

    def forget(self, name: str) -> None:
        """A template that is gone (a configuration reload): no more retries of its file."""
        self._failing.discard(name)
        if not self._failing:
            self.retry_at = None

    def retry_due(self) -> bool:
        return self.retry_at is not None and time.monotonic() >= self.retry_at

    def write(self, index: int, state: TemplateState, result: RenderResult, render_ms: float) -> Written | bool:
        """One rendered template to its destination: Written when the file changed, True when it
        did not (or --dry, or data is still missing), False when the write or its check failed."""
        spec = state.spec
        if not result.complete:
            waiting = ", ".join(sorted(dep.key for dep in result.missing))
            if waiting != state.waiting:
                log.info("template %s waiting for %s", spec.name, waiting)
            state.waiting = waiting
            return True
        state.waiting = ""
        if self.settings.dry:
            if result.text != state.last_text:
                sys.stdout.write(f"> {spec.dest}\n{result.text}")
                sys.stdout.flush()
            state.last_text, state.done = result.text, True
            return True
        content = result.text.encode()
        outcome, check = Outcome.SKIPPED, self.settings.check
        current: bytes | None = None
        try:
            current = read_current(spec.dest)
            if index == 0 and self.driver is not None:
                outcome, check = self.driver.before_write(current, content)
            # side files first: the check reads them with the file that names them
            write_side_files(spec.dest, result.files, spec.name, self._file_options(spec))
            changed_file = swap(spec.dest, content, current, spec.name, check, self._file_options(spec))
            remove_stale_side_files(spec.dest, result.files)
        except CheckFailed as err:
            state.failed = True
            self.metrics.add(check_failures=1)
            self.metrics.problem(f"check:{spec.name}", str(err).splitlines()[0])
            self.metrics.history.failed(f"check:{spec.name}", str(err))
            log.error("%s; keeping the last good %s", err, spec.dest)
            if outcome == Outcome.REFUSED and self.driver is not None:
                self.driver.after_refusal(current)
            return False
        except (OSError, LookupError) as err:  # LookupError: its user or group does not exist
            self._failed(state, f"cannot write {spec.dest} for template {spec.name}: {err}")
            return False
        self.metrics.problem(f"check:{spec.name}", None)
        if state.write_error:
            log.info("wrote %s again for template %s", spec.dest, spec.name)
            state.write_error = ""
            self.metrics.problem(f"write:{spec.name}", None)
            self._failing.discard(spec.name)
            if not self._failing:
                self.retry_at = None
                self._backoff.reset()
        state.done, state.last_text = True, result.text
        if not changed_file:
            return True
        self.metrics.add(writes=1)
        self.metrics.history.rendered(spec.name, current, result.text)
        self.last_write = time.monotonic()
        log.info("rendered %s -> %s render_ms=%.1f", spec.name, spec.dest, render_ms)
        old = current.decode(errors="replace") if current is not None and index == 0 else None
        return Written(spec, outcome, old, result.text if index == 0 else None)

    def _failed(self, state: TemplateState, message: str) -> None:
        """The last good file stays; said once per different error, in /health until a write
        succeeds, and tried again with a capped backoff (no change of data needed)."""
        state.failed = True
        if message != state.write_error:
            log.error("%s; keeping the last good file, trying again", message)
        state.write_error = message
        self.metrics.problem(f"write:{state.spec.name}", message)
        self._failing.add(state.spec.name)
        self.retry_at = time.monotonic() + self._backoff.next_delay()

    def _file_options(self, spec: TemplateSpec) -> FileOptions:
        return FileOptions(
            backup=self.settings.backup if spec.backup is None else spec.backup,
            mode=spec.perms,
            owner=owner_ids(spec.user, spec.group),
            make_dirs=spec.create_dest_dirs,
        )

    def hand_over(self, written: list[Written]) -> bool:
        """Each template's command once per batch; the proxy started or reloaded once, after its
        files: any template without a command is the proxy's. False when one failed."""
        ok = True
        timeouts: dict[str, float] = {}  # each command once, with the longest of its templates' timeouts
        for w in written:
            if w.spec.command:
                timeouts[w.spec.command] = max(timeouts.get(w.spec.command, 0.0), w.spec.command_timeout)
        for command, timeout in timeouts.items():
            try:
                run_command(command, timeout)
                self.metrics.add(reloads=1)
                log.info("command ran: %s", command)
            except CommandFailed as err:
                ok = False
                self.metrics.add(reload_failures=1)
                log.error("%s", err)
        mine = [w for w in written if not w.spec.command]
        if self.driver is None or not mine:
            return ok
        first = next((w for w in mine if w.new_text is not None), None)  # the proxy's own file
        others = any(w is not first for w in mine)  # other files it reads: only a reload takes them
        if first is not None and (first.outcome == Outcome.APPLIED or not others):
            ok &= self.driver.after_write(first.old_text, first.new_text, first.outcome)
            if others:
                ok &= self.driver.after_write(None, None, Outcome.SKIPPED)
        elif first is not None:
            ok &= self.driver.after_write(first.old_text, first.new_text, Outcome.SKIPPED)
        else:
            ok &= self.driver.after_write(None, None, Outcome.SKIPPED)
        return ok
