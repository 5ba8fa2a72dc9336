"""Template files watched for edits: an edit marks the template changed in the store."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from templater.quiesce import TEMPLATE_KEY
from templater.writer import TemplateState


class _TemplateEvents(FileSystemEventHandler):
    def __init__(self, paths: set[str], touch: Callable[[str], None]) -> None:
        self._paths = paths
        self._touch = touch

    def on_any_event(self, event: FileSystemEvent) -> None:
        # reading a template (ours included) raises opened/closed events: only writes count
        if event.event_type not in ("modified", "created", "moved", "deleted", "closed"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(path) if path else ""
            if path in self._paths:
                self._touch(TEMPLATE_KEY + path)


class TemplateFiles:
    """A watchdog observer of the templates' directories (not recursive)."""

    def __init__(self, observer: Any) -> None:  # watchdog's Observer (a platform alias, no type)
        self._observer = observer

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(2)


def watch_templates(templates: Iterable[TemplateState], touch: Callable[[str], None]) -> TemplateFiles:
    """Watch the source files of templates (not inline contents); touch(TEMPLATE_KEY + path) on
    an edit."""
    paths = {str(t.spec.source) for t in templates if t.spec.contents is None}
    observer = Observer()
    handler = _TemplateEvents(paths, touch)
    for directory in sorted({str(Path(p).parent) for p in paths}):
        observer.schedule(handler, directory, recursive=False)
    observer.daemon = True
    observer.start()
    return TemplateFiles(observer)
