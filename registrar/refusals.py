"""What Consul refused, per operation: said once until it changes, and its end once; a
permission denial shows in /health until the same operation succeeds."""

from __future__ import annotations

import logging

from registrar.errors import ConsulForbidden, ConsulRejected
from sidecar.once import SayOnce

log = logging.getLogger("registrar.sync")


class Refusals:
    def __init__(self) -> None:
        self._said = SayOnce()  # operation -> the refusal logged for it
        self._denied: dict[str, str] = {}  # operation -> permission denied, until it succeeds

    @property
    def denied(self) -> dict[str, str]:
        """Operations the ACL token may not do now (permission denied), with Consul's answer."""
        return dict(self._denied)

    def refused(self, operation: str, err: ConsulRejected) -> None:
        """A refusal: logged once until its text changes (the loop retries it every second)."""
        text = str(err)
        if self._said.new(operation, text):
            log.error("%s refused, will retry: %s", operation, text)
        if isinstance(err, ConsulForbidden):
            self._denied[operation] = text

    def accepted(self, operation: str) -> None:
        self._denied.pop(operation, None)
        if self._said.over(operation):  # every denial was said first
            log.info("%s accepted again", operation)
