"""One template loaded and rendered, its failure or warnings said: the runner's render step."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from jinja2.sandbox import SandboxedEnvironment

from sidecar.logs import REDACTOR
from sidecar.memory import gc_paused
from templater.errors import TemplateError
from templater.fragments import Fragments
from templater.output import side_dir
from templater.render import RenderResult, compile_go, compile_template, env_allowed, make_environment, render
from templater.settings import Settings
from templater.status import Metrics
from templater.store import FrozenView
from templater.writer import TemplateState

log = logging.getLogger("templater")


class TemplateRenderer:
    def __init__(self, metrics: Metrics, warn: Callable[[str], None]) -> None:
        self.metrics = metrics
        self._warn = warn
        self._envs: dict[tuple[tuple[str, str], bool], SandboxedEnvironment] = {}  # by delimiters, strictness

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

    def render(self, state: TemplateState, view: FrozenView, settings: Settings) -> RenderResult | None:
        """The template rendered (loaded first when its source is new or changed); None when it
        failed (said on /health and in the log; the last good output stays)."""
        spec = state.spec
        try:
            if state.compiled is None:
                self._load(state)
            assert state.compiled is not None
            allow = settings.env_allow
            env_vars = {k: v for k, v in os.environ.items() if env_allowed(k, allow)}
            with gc_paused:  # its reference cycles are collected after the write (_finish)
                result = render(
                    state.compiled, spec.name, view, settings.variables, env_vars, allow, state.fragments,
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
