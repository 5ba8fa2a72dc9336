"""The engine's one error type: its message is Go's (template name, line, and what)."""

from __future__ import annotations

from sidecar.errors import SidecarError


class GoTemplateError(SidecarError):
    """A template Go's text/template would refuse to parse, or fail to execute."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line
