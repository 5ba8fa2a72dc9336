"""The templater's error types, on top of the shared tree in sidecar.errors.

SidecarError
 +-- TemplateError       a template failed to parse or render; names the template and line
 +-- CheckFailed         the check command refused a staged file; the old file stays
 +-- CommandFailed       a command or reload after a swap failed
 +-- ProxyError          a proxy could not be found, started or reloaded, or refused a runtime change
 |    +-- ProxyWaiting   it is down and its next start waits for the backoff
 +-- Unavailable
 |    +-- ConsulUnavailable   Consul did not answer; retried with backoff, last good output kept
 +-- ConsulRejected      Consul answered with an error (bad query, ACL)
"""

from __future__ import annotations

from sidecar.errors import ConsulForbidden, ConsulRejected, ConsulUnavailable, SidecarError

__all__ = [
    "CheckFailed",
    "CommandFailed",
    "ConsulForbidden",
    "ConsulRejected",
    "ConsulUnavailable",
    "ProxyError",
    "TemplateError",
]


class TemplateError(SidecarError):
    def __init__(self, template: str, line: int | None, message: str) -> None:
        self.template = template
        self.line = line
        where = f"{template}:{line}" if line else template
        super().__init__(f"template {where}: {message}")


class CheckFailed(SidecarError):
    pass


class CommandFailed(SidecarError):
    pass


class ProxyError(SidecarError):
    pass


class ProxyWaiting(ProxyError):
    """The proxy is down and its next start attempt waits for its backoff: known, not new."""
