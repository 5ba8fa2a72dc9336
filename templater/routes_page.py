"""The routes page and its JSON API on the templater's status address (issue 26).

    GET /routes        the page (HTML, its script and style inline: nothing from outside)
    GET /api/routes    the document it is drawn from (templater.routes_view), as JSON

Read-only. On a loopback status address anyone who can reach it may read it, as /health; bound
anywhere else, both need the token of --status-token-file (HTTP basic auth with any user name
and the token as the password, or `Authorization: Bearer <token>`). No token or secret value is
in either: KV values a template marked secret are redacted from the diffs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import threading
import time
from typing import TYPE_CHECKING, Any

from sidecar.logs import REDACTOR
from sidecar.status import GateFn
from templater import routes_view
from templater.page_html import PAGE
from templater.routes import RouteMemo

if TYPE_CHECKING:
    from templater.runner import Runner


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def authorized(header: str | None, token: str) -> bool:
    """Basic (any user, the token as password) or Bearer. Compared in constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except ValueError:
            return False
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def page_gate(host: str, token: str) -> GateFn | None:
    """Who may read the routes page: anyone on a loopback address (as /health); elsewhere only
    with the token, and nobody at all when there is none (the page says how to set one)."""
    if is_loopback(host):
        return None
    return lambda header: bool(token) and authorized(header, token)


class RoutesPage:
    def __init__(self, runner: Runner, fleet_service: str) -> None:
        self._runner = runner
        self._fleet = fleet_service
        self._memo = RouteMemo()  # its own: the page never touches a render's state
        self._lock = threading.Lock()

    def document(self) -> dict[str, Any]:
        runner = self._runner
        snapshot = runner.store.view().catalog("")
        with self._lock:
            table = None
            if snapshot is not None:
                names = self._memo.names(snapshot.services, {})
                table = self._memo.table(names, snapshot.instances, {})
        metrics = runner.metrics
        extra = {
            "generated": time.time(),
            "templates": [
                {
                    "name": t.spec.name,
                    "dest": str(t.spec.dest),
                    "done": t.done,
                    "failed": t.failed,
                    "waiting": t.waiting,
                }
                for t in runner.templates
            ],
            "proxy": runner.driver.describe() if runner.driver is not None else None,
            "consul": {"up": metrics.consul_up, "error": metrics.consul_error},
            "problems": dict(metrics.problem_items()),
            "history": metrics.history.export(REDACTOR.text),
        }
        return routes_view.document(snapshot, table, runner.store.held(), "local", self._fleet, extra)

    def version(self) -> str:
        """Changes whenever anything the document shows may have: the catalog the templates see
        (a new snapshot on every change), the grace, each write, proxy update, failure and
        warning. An unchanged version is answered 304 at the cost of this."""
        runner, m = self._runner, self._runner.metrics
        parts = (
            runner.store.generation, tuple(runner.store.held()), m.writes, m.reloads, m.runtime_updates,
            m.reload_failures, m.check_failures, tuple(m.problem_items()), m.consul_up, m.history.count(),
            runner.driver.proxy.master() if runner.driver is not None else None,
            int(time.time() // 30),  # the per-minute figures and "draining" age on their own
        )  # fmt: skip
        return '"' + hashlib.sha256(repr(parts).encode()).hexdigest()[:20] + '"'

    def answer(self, path: str, if_none_match: str = "") -> tuple[int, bytes, str, str] | None:
        """(status, body, content type, ETag) for the page's paths; None for any other path."""
        if path.split("?", 1)[0] in ("/routes", "/routes/"):
            return 200, PAGE.encode(), "text/html; charset=utf-8", ""
        if path.split("?", 1)[0] == "/api/routes":
            version = self.version()
            if if_none_match == version:
                return 304, b"", "application/json", version
            return 200, json.dumps(self.document(), sort_keys=True).encode(), "application/json", version
        return None
