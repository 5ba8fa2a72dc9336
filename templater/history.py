"""What happened lately, for the routes page: the last renders and what each changed, the last
proxy update and the last failure, and the figures of the last hour (change -> written, proxy
updates). Recorded on the templater's path at the cost of an append; a render's diff is worked
out only when the page asks for it, and then kept.
"""

from __future__ import annotations

import difflib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

RENDERS_KEPT = 8
WINDOW = 3600.0  # the plots' hour
DIFF_LINES = 400  # a longer diff is cut (the page says by how much)


@dataclass
class RenderRecord:
    at: float
    template: str
    old: bytes | str | None  # the file before (None: there was none); dropped once diffed
    new: str | None
    diff: str | None = None
    added: int = 0
    removed: int = 0


def per_minute(points: Iterable[tuple[float, str, float]], now: float) -> list[dict[str, Any]]:
    """(at, kind, seconds) of the last hour in one-minute buckets, oldest first, empty minutes
    left out: how many of each kind, and the median and the largest seconds. Pure."""
    buckets: dict[int, list[tuple[str, float]]] = {}
    for at, kind, seconds in points:
        if 0 <= now - at <= WINDOW:
            buckets.setdefault(int(at // 60), []).append((kind, seconds))
    out = []
    for minute in sorted(buckets):
        items = buckets[minute]
        values = sorted(s for _, s in items)
        counts: dict[str, int] = {}
        for kind, _ in items:
            counts[kind] = counts.get(kind, 0) + 1
        out.append({"minute": minute * 60, "count": counts, "p50": values[len(values) // 2], "max": values[-1]})
    return out


def diff_text(old: str, new: str, name: str) -> tuple[str, int, int]:
    """A unified diff (1 line of context) and the lines it adds and removes. Pure."""
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), f"{name} before", name, n=1, lineterm=""))
    added = sum(1 for x in lines if x.startswith("+") and not x.startswith("+++"))
    removed = sum(1 for x in lines if x.startswith("-") and not x.startswith("---"))
    if len(lines) > DIFF_LINES:
        lines = [*lines[:DIFF_LINES], f"... {len(lines) - DIFF_LINES} more lines"]
    return "\n".join(lines), added, removed


class History:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._renders: deque[RenderRecord] = deque(maxlen=RENDERS_KEPT)
        self._changes: deque[tuple[float, str, float]] = deque(maxlen=20_000)  # (at, "written", seconds)
        self._applies: deque[tuple[float, str, float]] = deque(maxlen=20_000)  # (at, how, seconds)
        self._failure: dict[str, Any] | None = None
        self._warnings: deque[tuple[float, str]] = deque(maxlen=50)  # the last distinct ones
        self._count = 0

    def count(self) -> int:
        """Grows with every record (a version for the page)."""
        with self._lock:
            return self._count

    def _add(self, kept: deque[Any], item: Any) -> None:
        with self._lock:
            self._count += 1
            kept.append(item)

    def rendered(self, template: str, old: bytes | None, new: str) -> None:
        """A file changed. While the last render of the same template waits for its diff, its
        new text is this one's old text: the same string is kept once, not a copy per render."""
        with self._lock:
            last = next((r for r in reversed(self._renders) if r.template == template), None)
        before: bytes | str | None = last.new if last is not None and last.new is not None else old
        self._add(self._renders, RenderRecord(self._clock(), template, before, new))

    def change(self, seconds: float) -> None:
        self._add(self._changes, (self._clock(), "written", seconds))

    def applied(self, how: str, seconds: float) -> None:
        """The proxy took a change: how (reload, runtime API, start) and how long it took."""
        self._add(self._applies, (self._clock(), how, seconds))

    def warned(self, message: str) -> None:
        self._add(self._warnings, (self._clock(), message))

    def failed(self, what: str, message: str) -> None:
        with self._lock:
            self._count += 1
            self._failure = {"at": self._clock(), "what": what, "message": message}

    def export(self, redact: Callable[[str], str]) -> dict[str, Any]:
        """The record as the routes page's JSON; diffs made now for renders not diffed yet."""
        with self._lock:
            pending = [r for r in self._renders if r.diff is None]
        for record in pending:  # outside the lock: a large diff must not hold a render up
            old = record.old.decode(errors="replace") if isinstance(record.old, bytes) else (record.old or "")
            text, added, removed = diff_text(old, record.new or "", record.template)
            with self._lock:
                record.diff, record.added, record.removed = redact(text), added, removed
                record.old = record.new = None
        now = self._clock()
        with self._lock:
            renders = [
                {"at": r.at, "template": r.template, "added": r.added, "removed": r.removed, "diff": r.diff or ""}
                for r in reversed(self._renders)
            ]
            changes = per_minute(self._changes, now)
            applies = per_minute(self._applies, now)
            last = self._applies[-1] if self._applies else None
            failure = dict(self._failure, message=redact(self._failure["message"])) if self._failure else None
            warnings = [{"at": at, "text": redact(text)} for at, text in reversed(self._warnings)]
        return {
            "warnings": warnings,
            "renders": renders,
            "changes": changes,
            "applies": applies,
            "last_apply": {"at": last[0], "how": last[1], "seconds": last[2]} if last else None,
            "last_failure": failure,
        }
