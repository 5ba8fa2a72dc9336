"""The drain plugin's worker: a Docker authorization plugin that drains before a container stops.

The engine asks it before every API call and waits for the answer. Every call but the stopping
ones (registrar.authz) is allowed at once, without I/O. For a stop of a container with services
on the local Consul agent, the worker puts those services in maintenance (every host's proxy
drops them), waits the drain time, and only then allows the call: the container gets its signal
when no proxy sends it anything. A container without services is allowed at once.

It never refuses a call: Consul down or slow, a bad answer, anything unexpected ends the wait
(bounded by --consul-wait) with one log line saying why draining was skipped, and the call goes
ahead. After the call (AuthZRes) a failed stop or a restart lifts the maintenance it set.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from registrar import authz
from registrar.consul_registry import Registry
from registrar.errors import ConsulRejected
from registrar.model import now_text
from sidecar.logs import kv

log = logging.getLogger("registrar.drain")

ACTIVATE = "/Plugin.Activate"
REQUEST = "/AuthZPlugin.AuthZReq"
RESPONSE = "/AuthZPlugin.AuthZRes"
MAX_BODY = 1 << 20  # the engine sends request bodies too; stops have none worth reading


@dataclass(frozen=True)
class DrainSettings:
    drain: float  # seconds between the maintenance and the allowed stop
    consul_wait: float  # at most this long for the agent's answers, then the stop goes ahead


def bounded(call: Callable[[], Any], seconds: float) -> Any:
    """call() in its own thread, waited for at most seconds; TimeoutError after that (the thread
    is left to finish on its own: a hung Consul never holds a Docker call)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the waiting thread
            box["error"] = err

    thread = threading.Thread(target=run, name="drain-consul", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer from Consul within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Drainer:
    """What the plugin does with each request; registry is the local agent."""

    def __init__(self, registry: Registry, settings: DrainSettings, leave: Callable[[str], None]) -> None:
        """leave(why) takes the plugin out of the engine: called before the plugin's own
        container is stopped, so that the engine never waits on a plugin it has just ended."""
        self._registry = registry
        self._settings = settings
        self._leave = leave
        self.own_id = ""  # the plugin's own container, when it runs in one, and its name
        self.own_name = ""
        self._lock = threading.Lock()
        self._held: dict[authz.Stopping, list[str]] = {}  # maintenance set, until the answer
        self.busy = 0  # stopping calls not answered yet

    def _maintain(self, stop: authz.Stopping) -> list[str]:
        state = self._registry.agent_state(services=True, checks=True)
        found = authz.services_of(stop.ref, state.services)
        sids = [sid for sid in found if sid not in state.maintenance]
        if found != sids:
            log.debug(
                "in maintenance already %s", kv(call=str(stop), services=",".join(sorted(set(found) - set(sids))))
            )
        why = authz.reason(stop, now_text())
        for sid in sids:
            self._registry.maintenance(sid, True, why)
        return sids

    def _lift(self, sids: list[str]) -> None:
        for sid in sids:
            try:
                self._registry.maintenance(sid, False)
            except ConsulRejected as err:  # gone with the container (registered afresh when it starts)
                if "404" not in str(err):
                    raise

    def request(self, body: dict[str, Any]) -> dict[str, object]:
        stop = authz.stopping(str(body.get("RequestMethod") or ""), str(body.get("RequestUri") or ""))
        if stop is None:
            return authz.allow()
        with self._lock:
            self.busy += 1
        try:
            return self._drain(stop)
        finally:
            with self._lock:
                self.busy -= 1

    def _drain(self, stop: authz.Stopping) -> dict[str, object]:
        if self.own_id and authz.names_self(stop.ref, self.own_id, self.own_name):
            try:
                why = f"docker {stop.action} of its own container"
                bounded(lambda: self._leave(why), self._settings.consul_wait)
            except Exception as err:
                log.error("could not leave the engine before its own stop %s", kv(call=str(stop), why=str(err)))
            return authz.allow()
        started = time.monotonic()
        try:
            sids: list[str] = bounded(lambda: self._maintain(stop), self._settings.consul_wait)
        except Exception as err:  # never refuse a call: go ahead undrained, and say why
            log.warning("draining skipped %s", kv(call=str(stop), why=str(err) or type(err).__name__))
            return authz.allow()
        if not sids:
            log.debug("nothing to drain %s", kv(call=str(stop)))
            return authz.allow()
        with self._lock:
            self._held[stop] = sids
        time.sleep(max(0.0, self._settings.drain - (time.monotonic() - started)))
        log.info("drained %s", kv(call=str(stop), services=",".join(sids), took=f"{time.monotonic() - started:.2f}s"))
        return authz.allow()

    def response(self, body: dict[str, Any]) -> dict[str, object]:
        stop = authz.stopping(str(body.get("RequestMethod") or ""), str(body.get("RequestUri") or ""))
        if stop is None:
            return authz.allow()
        with self._lock:
            sids = self._held.pop(stop, [])
        status = int(body.get("ResponseStatusCode") or 0)
        failed = status >= 400
        if sids and (failed or stop.action == "restart"):  # still or again running: routable
            try:
                bounded(lambda: self._lift(sids), self._settings.consul_wait)
            except Exception as err:
                log.warning("maintenance left on %s", kv(call=str(stop), services=",".join(sids), why=str(err)))
            else:
                log.info("undrained %s", kv(call=str(stop), status=status, services=",".join(sids)))
        return authz.allow()


def _handler(drainer: Drainer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # the engine keeps its connection

        def address_string(self) -> str:
            return "engine"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(min(length, MAX_BODY)) if length else b""
            if length > MAX_BODY:  # drain the rest unread
                left = length - MAX_BODY
                while left > 0:
                    left -= len(self.rfile.read(min(left, 1 << 16)) or b"x" * left)
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            if self.path == ACTIVATE:
                answer: dict[str, object] = {"Implements": ["authz"]}
            elif self.path == REQUEST:
                answer = drainer.request(body)
            elif self.path == RESPONSE:
                answer = drainer.response(body)
            else:
                answer = {"Err": f"unknown call {self.path}"}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.docker.plugins.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, listener: socket.socket, handler: type[BaseHTTPRequestHandler], beat: Callable[[], None]):
        super().__init__("", handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self._beat = beat

    def service_actions(self) -> None:
        self._beat()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went before its answer (a probe, the engine giving up) is said in
        one debug line; anything else in one warning with its traceback."""
        err = sys.exc_info()[1]
        if isinstance(err, (BrokenPipeError, ConnectionResetError)):
            log.debug("client gone before its answer: %s", err)
            return
        log.warning("request failed", exc_info=True)


def serve(listener: socket.socket, drainer: Drainer, heartbeat_fd: int | None, stop: threading.Event) -> bool:
    """Answer the engine on a socket the guard listens on, until stop or the guard is gone;
    write a byte to heartbeat_fd on every turn of the loop (the guard restarts a worker whose
    loop stalls). Whether it ended because the guard is gone."""
    guard = os.getppid()
    gone = threading.Event()

    def beat() -> None:
        if heartbeat_fd is not None:
            try:
                os.write(heartbeat_fd, b".")
            except BlockingIOError:
                pass
            except OSError:  # the pipe's other end closed with the guard
                gone.set()
            if os.getppid() != guard:
                gone.set()
        if (stop.is_set() or gone.is_set()) and not ending.is_set():
            ending.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    ending = threading.Event()
    server = _Server(listener, _handler(drainer), beat)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return gone.is_set()
