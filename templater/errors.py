"""The templater's error types. Third-party errors are mapped to these at the adapters.

TemplaterError
 +-- TemplateError       a template failed to parse or render; names the template and line
 +-- CheckFailed         the check command refused a staged file; the old file stays
 +-- CommandFailed       a command or reload after a swap failed
 +-- ConsulUnavailable   Consul did not answer; retried with backoff, last good output kept
 +-- ConsulRejected      Consul answered with an error (bad query, ACL)
 +-- ProxyError          a proxy could not be found, started or reloaded
"""

from __future__ import annotations


class TemplaterError(Exception):
    pass


class TemplateError(TemplaterError):
    def __init__(self, template: str, line: int | None, message: str) -> None:
        self.template = template
        self.line = line
        where = f"{template}:{line}" if line else template
        super().__init__(f"template {where}: {message}")


class CheckFailed(TemplaterError):
    pass


class CommandFailed(TemplaterError):
    pass


class ConsulUnavailable(TemplaterError):
    pass


class ConsulRejected(TemplaterError):
    pass


class ProxyError(TemplaterError):
    pass
