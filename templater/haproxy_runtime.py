"""HAProxy without reloads where possible: apply server changes through the runtime API.

When a new configuration differs from the running one only in `server` lines of existing
backends, the difference is applied on the admin socket: new servers are added, removed ones
are set to drain (no new connections, in-flight ones finish) and deleted once they have no
sessions left or after the drain timeout; weight changes are set. Anything else, or any
command HAProxy refuses, falls back to a graceful reload with the server state saved first.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from templater.errors import ProxyError
from templater.status import Metrics

log = logging.getLogger("templater.haproxy")

_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|peers|resolvers|userlist|program|cache)\b\s*(\S*)")
_SOCKET = re.compile(r"^\s*stats socket\s+(\S+)")
_STATE_FILE = re.compile(r"^\s*server-state-file\s+(\S+)")
# dynamic servers in HAProxy 2.6 refuse these keywords; their servers change through a reload
_NOT_DYNAMIC = ("cookie", "track")


@dataclass(frozen=True)
class Parsed:
    structure: tuple[str, ...]
    servers: dict[str, dict[str, str]]  # backend -> server name -> the rest of its line
    socket_path: str | None
    state_file: str | None


def parse(config: str) -> Parsed:
    """Split a configuration into everything but backend server lines, and those lines. Pure."""
    structure: list[str] = []
    servers: dict[str, dict[str, str]] = {}
    backend: str | None = None
    socket_path = state_file = None
    for line in config.splitlines():
        section = _SECTION.match(line)
        if section:
            backend = section.group(2) if section.group(1) == "backend" else None
            if backend is not None:
                servers.setdefault(backend, {})
        stripped = line.strip()
        if backend is not None and stripped.startswith("server "):
            parts = stripped.split(None, 2)
            if len(parts) == 3:
                servers[backend][parts[1]] = parts[2]
                continue
        if match := _SOCKET.match(line):
            socket_path = match.group(1)
        if match := _STATE_FILE.match(line):
            state_file = match.group(1)
        structure.append(line)
    return Parsed(tuple(structure), servers, socket_path, state_file)


@dataclass
class Ops:
    add: list[tuple[str, str, str]] = field(default_factory=list)  # backend, server, rest
    drain: list[tuple[str, str]] = field(default_factory=list)
    weight: list[tuple[str, str, str]] = field(default_factory=list)
    revive: list[tuple[str, str]] = field(default_factory=list)  # draining servers wanted again


def _weight(rest: str) -> str | None:
    match = re.search(r"\bweight\s+(\d+)", rest)
    return match.group(1) if match else None


def _without_weight(rest: str) -> list[str]:
    return re.sub(r"\bweight\s+\d+", "", rest).split()


def diff(old: Parsed, new: Parsed, draining: set[tuple[str, str]]) -> Ops | None:
    """The runtime operations that turn old into new, or None when a reload is needed. Pure."""
    if old.structure != new.structure or set(old.servers) != set(new.servers):
        return None
    ops = Ops()
    for backend, wanted in new.servers.items():
        current = old.servers[backend]
        for name, rest in wanted.items():
            if name not in current:
                if (backend, name) in draining:
                    return None  # the old definition may differ; let a reload sort it out
                if any(re.search(rf"\b{k}\b", rest) for k in _NOT_DYNAMIC):
                    return None
                ops.add.append((backend, name, rest))
            elif current[name] != rest:
                if _without_weight(current[name]) != _without_weight(rest) or _weight(rest) is None:
                    return None
                ops.weight.append((backend, name, _weight(rest) or "1"))
            elif (backend, name) in draining:
                ops.revive.append((backend, name))
        for name in current:
            if name not in wanted:
                ops.drain.append((backend, name))
    return ops


class AdminSocket:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def send(self, command: str) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(command.encode() + b"\n")
                chunks = []
                while data := sock.recv(65536):
                    chunks.append(data)
        except OSError as err:
            raise ProxyError(f"haproxy admin socket {self.path}: {command!r}: {err}") from err
        return b"".join(chunks).decode(errors="replace")


RELOAD_SETTLE = 5.0
_OK = ("", "New server registered.", "Server deleted.")


class RuntimeHook:
    """Runner hook for --proxy haproxy: runtime updates and drains, state kept across reloads."""

    def __init__(self, config: Path, drain_timeout: float, metrics: Metrics) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.metrics = metrics
        self._lock = threading.Lock()
        self._draining: dict[tuple[str, str], float] = {}
        self._socket: AdminSocket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain_loop, name="haproxy-drain", daemon=True)
        self._thread.start()

    def _cli(self, command: str) -> str:
        if self._socket is None:
            raise ProxyError("haproxy admin socket unknown: the configuration has no `stats socket` line")
        answer = self._socket.send(command).strip()
        log.debug("haproxy cli %s -> %s", command, answer)
        return answer

    def apply(self, old: str | None, new: str) -> bool:
        parsed_new = parse(new)
        if parsed_new.socket_path:
            self._socket = AdminSocket(parsed_new.socket_path)
        if old is None or self._socket is None:
            self.save_state(parsed_new)
            return False
        with self._lock:
            ops = diff(parse(old), parsed_new, set(self._draining))
        if ops is None:
            self.save_state(parsed_new)
            return False
        try:
            self._run(ops)
        except ProxyError as err:
            log.warning("runtime update refused, reloading instead: %s", err)
            self.save_state(parsed_new)
            return False
        return True

    def _run(self, ops: Ops) -> None:
        for backend, name, rest in ops.add:
            answer = self._cli(f"add server {backend}/{name} {rest}")
            if answer not in _OK:
                raise ProxyError(f"add server {backend}/{name}: {answer}")
            if re.search(r"\bcheck\b", rest):
                self._cli(f"enable health {backend}/{name}")
            self._cli(f"enable server {backend}/{name}")
            log.info("haproxy runtime added %s/%s %s", backend, name, rest)
        for backend, name, weight in ops.weight:
            self._cli(f"set weight {backend}/{name} {weight}")
            log.info("haproxy runtime weight %s/%s %s", backend, name, weight)
        for backend, name in ops.revive:
            self._cli(f"set server {backend}/{name} state ready")
            with self._lock:
                self._draining.pop((backend, name), None)
        for backend, name in ops.drain:
            self._cli(f"set server {backend}/{name} state drain")
            with self._lock:
                self._draining[(backend, name)] = time.monotonic() + self.drain_timeout
            log.info("haproxy draining %s/%s timeout=%.0fs", backend, name, self.drain_timeout)

    def save_state(self, parsed: Parsed) -> None:
        """Dump server state where the new configuration loads it from, just before a reload."""
        if not parsed.state_file or self._socket is None:
            return
        try:
            state = self._cli("show servers state")
        except ProxyError:
            return
        with contextlib.suppress(OSError):
            Path(parsed.state_file).write_text(state + "\n")

    def after_reload(self, new: str) -> None:
        """Wait until the new worker answers on the socket with the new backends.

        The reload is asynchronous: until the new worker has bound the admin socket, the old
        one answers, and it knows nothing of new backends.
        """
        parsed = parse(new)
        if parsed.socket_path:
            self._socket = AdminSocket(parsed.socket_path)
        with self._lock:
            self._draining.clear()  # the new worker never had them; the old one finishes them
        wanted = set(parsed.servers)
        deadline = time.monotonic() + RELOAD_SETTLE
        while time.monotonic() < deadline:
            try:
                answer = self._cli("show backend")
                if wanted <= set(answer.split()):
                    return
            except ProxyError:
                pass
            time.sleep(0.02)
        log.warning("haproxy did not show the new backends within %.0f s of the reload", RELOAD_SETTLE)

    def _sessions(self) -> dict[tuple[str, str], int]:
        table = self._cli("show stat -1 4 -1")
        counts = {}
        for row in table.splitlines():
            if row.startswith("#") or not row:
                continue
            cols = row.split(",")
            if len(cols) > 4 and cols[4].isdigit():
                counts[(cols[0], cols[1])] = int(cols[4])
        return counts

    def _drain_loop(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                draining = dict(self._draining)
            if not draining:
                continue
            try:
                sessions = self._sessions()
                now = time.monotonic()
                for (backend, name), deadline in draining.items():
                    if sessions.get((backend, name), 0) > 0 and now < deadline:
                        continue
                    if sessions.get((backend, name), 0) > 0:
                        self._cli(f"shutdown sessions server {backend}/{name}")
                    self._cli(f"set server {backend}/{name} state maint")
                    answer = self._cli(f"del server {backend}/{name}")
                    with self._lock:
                        self._draining.pop((backend, name), None)
                    self.metrics.add(runtime_updates=1)
                    log.info("haproxy removed %s/%s after drain: %s", backend, name, answer or "ok")
            except ProxyError as err:
                log.warning("drain check failed: %s", err)

    def stop(self) -> None:
        self._stop.set()
