"""HAProxy without reloads where possible: apply server changes through the runtime API.

When a new configuration differs from the running one only in `server` lines of existing
backends, the difference is applied on the admin socket: new servers are added, removed ones
are set to drain (no new connections, in-flight ones finish) and deleted once they have no
sessions left or after the drain timeout; weight changes are set. Anything else, or any
command HAProxy refuses, falls back to a graceful reload with the server state saved first.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from templater.errors import ProxyError
from templater.status import Metrics

log = logging.getLogger("templater.haproxy")

_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|peers|resolvers|userlist|program|cache)\b\s*(\S*)")
_SOCKET = re.compile(r"^\s*stats socket\s+(\S+)")
_STATE_FILE = re.compile(r"^\s*server-state-file\s+(\S+)")
# dynamic servers in HAProxy 2.6 refuse these keywords; their servers change through a reload
_NOT_DYNAMIC = ("cookie", "track")


@dataclass(frozen=True)
class _Piece:
    """One section of a configuration, parsed."""

    structure: tuple[str, ...]
    servers: dict[str, dict[str, str]]
    default_server: dict[str, str]
    defaults_after: str  # the `default-server` settings of defaults sections, after this one
    socket_path: str | None
    state_file: str | None


@dataclass(frozen=True)
class Parsed:
    """A configuration section by section: everything but backend server lines, and those lines."""

    pieces: tuple[_Piece, ...]
    starts: tuple[int, ...]  # where each piece begins in the text; the first at 0
    owner: dict[str, _Piece]  # backend -> the piece that defines it (the last one, if several do)
    twice: bool = False  # a backend is defined more than once (HAProxy refuses the file)

    def servers_of(self, backend: str) -> dict[str, str]:
        piece = self.owner.get(backend)
        return piece.servers[backend] if piece is not None else {}

    @cached_property
    def servers(self) -> dict[str, dict[str, str]]:  # backend -> server name -> the rest of its line
        return _merged(self.pieces, "servers")

    @cached_property
    def default_server(self) -> dict[str, str]:
        """backend -> the `default-server` settings in force there (defaults section, then
        backend); HAProxy 2.6 does not apply them to servers added at runtime, so `add server`
        repeats them."""
        return _merged(self.pieces, "default_server")

    @cached_property
    def structure(self) -> tuple[str, ...]:
        return _structure(self.pieces)

    @cached_property
    def socket_path(self) -> str | None:
        return next((p.socket_path for p in reversed(self.pieces) if p.socket_path), None)

    @cached_property
    def state_file(self) -> str | None:
        return next((p.state_file for p in reversed(self.pieces) if p.state_file), None)


def _merged(pieces: Iterable[_Piece], name: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for piece in pieces:
        merged.update(getattr(piece, name))
    return merged


def _structure(pieces: Iterable[_Piece]) -> tuple[str, ...]:
    return tuple(itertools.chain.from_iterable(p.structure for p in pieces))


_STARTS = re.compile(r"(?m)^(?=(?:global|defaults|frontend|backend|listen|peers|resolvers|userlist|program|cache)\b)")
# a section starts where a line starts with a keyword and a word boundary: text[start - 1] and
# text[start:start + _KEYWORD_SPAN] decide it
_KEYWORD_SPAN = 10


def parse(config: str) -> Parsed:
    """Split a configuration into everything but backend server lines, and those lines. Pure."""
    pieces, starts = _parse_sections(config, "")
    owner: dict[str, _Piece] = {}
    return Parsed(pieces, starts, owner, not _add_owners(owner, pieces))


Known = dict[tuple[str, str], _Piece]  # (defaults in force, a section's text) -> its parse


def _parse_sections(
    config: str, defaults: str, known: Known | None = None
) -> tuple[tuple[_Piece, ...], tuple[int, ...]]:
    """The sections of a text that starts at a section (or at the start of the configuration);
    defaults: the `default-server` settings in force before it; known: sections parsed before."""
    bounds = [0, *(m.start() for m in _STARTS.finditer(config) if m.start()), len(config)]
    pieces = []
    for start, end in itertools.pairwise(bounds):
        chunk = config[start:end]
        piece = known.get((defaults, chunk)) if known else None
        if piece is None:
            piece = _parse_piece(chunk, defaults)
        pieces.append(piece)
        defaults = piece.defaults_after
    return tuple(pieces), tuple(bounds[:-1])


def _add_owners(owner: dict[str, _Piece], pieces: Iterable[_Piece]) -> bool:
    """Record the pieces as their backends' owners; False when a backend already had one."""
    unique = True
    for piece in pieces:
        for backend in piece.servers:
            unique &= backend not in owner
            owner[backend] = piece
    return unique


@dataclass(frozen=True)
class Reparsed:
    """A new configuration parsed from the old one's parse: the sections between the first and
    the last changed character were parsed again, the others are the old ones (the same objects)."""

    parsed: Parsed
    old: tuple[_Piece, ...]  # the old sections that were replaced
    new: tuple[_Piece, ...]  # what replaced them


def reparse(old_text: str, old: Parsed, new_text: str) -> Reparsed:
    """parse(new_text), given parse(old_text): the cost of the sections that changed, and of
    comparing the texts (at the speed of memory). Equal to parse(new_text). Pure."""
    prefix = common_prefix(old_text, new_text)
    suffix = common_suffix(old_text, new_text, min(len(old_text), len(new_text)) - prefix)
    first = max(0, bisect.bisect_right(old.starts, prefix - _KEYWORD_SPAN - 1) - 1)
    last = bisect.bisect_right(old.starts, len(old_text) - suffix)  # the first section left as it was
    begin, end, shift = old.starts[first], _end(old, last - 1, old_text), len(new_text) - len(old_text)
    before = _defaults_before(old, first)
    replaced = old.pieces[first:last]
    # several changes far apart: the sections between them are kept, by their text
    known = {
        (_defaults_before(old, k), old_text[old.starts[k] : _end(old, k, old_text)]): old.pieces[k]
        for k in range(first, last)
    }
    pieces, starts = _parse_sections(new_text[begin : end + shift], before, known if last - first > 1 else None)
    owner = dict(old.owner)
    for backend in _merged(replaced, "servers"):
        del owner[backend]
    inherited = last == len(old.pieces) or pieces[-1].defaults_after == replaced[-1].defaults_after
    if old.twice or not inherited or not _add_owners(owner, pieces):
        # a defaults section changed what the sections after it inherit, or a backend is
        # defined twice: all of it parsed again
        full = parse(new_text)
        return Reparsed(full, old.pieces, full.pieces)
    parsed = Parsed(
        old.pieces[:first] + pieces + old.pieces[last:],
        old.starts[:first] + tuple(begin + s for s in starts) + tuple(s + shift for s in old.starts[last:]),
        owner,
    )
    return Reparsed(parsed, replaced, pieces)


def _end(parsed: Parsed, k: int, text: str) -> int:
    """Where section k of a parse of text ends."""
    return parsed.starts[k + 1] if k + 1 < len(parsed.starts) else len(text)


def _defaults_before(parsed: Parsed, k: int) -> str:
    return parsed.pieces[k - 1].defaults_after if k else ""


_BLOCK = 1 << 16


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of two texts. Pure."""
    return _common(lambda x, lo, hi: x[lo:hi], a, b, min(len(a), len(b)))


def common_suffix(a: str, b: str, limit: int) -> int:
    """The length of the longest common suffix of two texts, at most limit. Pure."""
    return _common(lambda x, lo, hi: x[len(x) - hi : len(x) - lo], a, b, limit)


def _common(part: Callable[[str, int, int], str], a: str, b: str, limit: int) -> int:
    """How far part(a, 0, n) == part(b, 0, n) holds, n at most limit: compared a block at a
    time (at the speed of memory), then within the first block that differs, halving."""
    low = 0
    while low < limit and part(a, low, min(low + _BLOCK, limit)) == part(b, low, min(low + _BLOCK, limit)):
        low = min(low + _BLOCK, limit)
    high = min(low + _BLOCK, limit)  # the first difference is before high, if there is one
    while low < high:
        middle = (low + high + 1) // 2
        if part(a, low, middle) == part(b, low, middle):
            low = middle
        else:
            high = middle - 1
    return low


def _parse_piece(chunk: str, defaults_params: str) -> _Piece:
    structure: list[str] = []
    servers: dict[str, dict[str, str]] = {}
    default_server: dict[str, str] = {}
    in_defaults = False
    backend: str | None = None
    socket_path = state_file = None
    for line in chunk.splitlines():
        section = _SECTION.match(line)
        if section:
            in_defaults = section.group(1) == "defaults"
            if in_defaults:
                defaults_params = ""  # a new defaults section resets what the previous one set
            backend = section.group(2) if section.group(1) == "backend" else None
            if backend is not None:
                servers.setdefault(backend, {})
                default_server[backend] = defaults_params
        stripped = line.strip()
        if stripped.startswith("default-server "):
            params = stripped.split(None, 1)[1].split("#", 1)[0].strip()
            if in_defaults:
                defaults_params = f"{defaults_params} {params}".strip()
            elif backend is not None:
                default_server[backend] = f"{default_server[backend]} {params}".strip()
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
    return _Piece(tuple(structure), servers, default_server, defaults_params, socket_path, state_file)


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


def diff(old: Parsed, new: Parsed, draining: set[tuple[str, str]], region: Reparsed | None = None) -> Ops | None:
    """The runtime operations that turn old into new, or None when a reload is needed. Pure.

    region: new as reparsed from old; only its replaced sections are compared (the others are
    the same objects in both)."""
    old_part, new_part = (region.old, region.new) if region is not None else (old.pieces, new.pieces)
    if _structure(old_part) != _structure(new_part):
        return None
    before, after = _merged(old_part, "servers"), _merged(new_part, "servers")
    mine = {id(piece) for piece in new_part}
    if set(before) != set(after) or any(id(new.owner[b]) not in mine for b in after):
        return None  # backends added or removed, or one defined twice (HAProxy refuses that)
    ops = Ops()
    for backend, wanted in after.items():
        current = before[backend]
        if wanted is current:  # a section kept from the last parse: nothing in it moved
            continue
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
    # a draining server that both configurations list, in a section outside the region
    ops.revive.extend(
        (backend, name)
        for backend, name in sorted(draining)
        if backend not in after and name in new.servers_of(backend) and name in old.servers_of(backend)
    )
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


RELOAD_SETTLE = 10.0
_ADDED = "New server registered."
_DELETED = "Server deleted."


_STATIC_ONLY = re.compile(r"(?:^|\s)init-addr\s+\S+")  # refused for a dynamic server (resolved when added)


def add_command(backend: str, name: str, rest: str, defaults: str) -> str:
    """`add server` with the backend's default-server settings first: the server's own win. Pure."""
    address, _, params = rest.partition(" ")
    args = " ".join(part for part in (address, _STATIC_ONLY.sub("", defaults).strip(), params.strip()) if part)
    return f"add server {backend}/{name} {args}"


def session_counts(table: str) -> dict[tuple[str, str], int]:
    """Current sessions per (backend, server) from `show stat` CSV. Pure."""
    lines = [line for line in table.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        return {}
    reader = csv.DictReader([lines[0][2:], *lines[1:]])
    counts = {}
    for row in reader:
        scur = row.get("scur") or ""
        if scur.isdigit():
            counts[(row.get("pxname") or "", row.get("svname") or "")] = int(scur)
    return counts


class Outcome:
    """What apply() did: APPLIED (every line accepted), SKIPPED (needs a reload), REFUSED (HAProxy
    refused a line: the running state may differ from any file until the next reload)."""

    APPLIED = "applied"
    SKIPPED = "skipped"
    REFUSED = "refused"


class RuntimeHook:
    """Runner hook for --proxy haproxy: runtime updates and drains, state kept across reloads."""

    def __init__(self, config: Path, drain_timeout: float, metrics: Metrics) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.metrics = metrics
        self._lock = threading.Lock()
        self._draining: dict[tuple[str, str], float] = {}
        self._refused_deletes: set[tuple[str, str]] = set()
        self._socket: AdminSocket | None = None
        self._parsed: tuple[str, Parsed] | None = None  # the last text parsed, and its parse
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain_loop, name="haproxy-drain", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def draining(self) -> int:
        """Servers being drained now (a warning in the proxy's own Consul check)."""
        with self._lock:
            return len(self._draining)

    def _cli(self, command: str) -> str:
        if self._socket is None:
            raise ProxyError("haproxy admin socket unknown: the configuration has no `stats socket` line")
        answer = self._socket.send(command).strip()
        log.debug("haproxy cli %s -> %s", command, answer)
        return answer

    def _expect(self, command: str, ok: str = "") -> None:
        """Run a command and raise ProxyError unless HAProxy answered exactly `ok`."""
        answer = self._cli(command)
        if answer != ok:
            raise ProxyError(f"haproxy refused {command!r}: {answer or 'no answer'}")

    def _parse(self, text: str) -> Parsed:
        if self._parsed is not None and self._parsed[0] == text:
            return self._parsed[1]
        parsed = parse(text)
        self._parsed = (text, parsed)
        return parsed

    def _parse_change(self, old: str, new: str) -> tuple[Parsed, Reparsed]:
        """old's parse (kept from the last change, whose new text it is) and new's, reparsed from
        it: a configuration with thousands of backends where one changed parses one."""
        parsed_old = self._parse(old)
        change = reparse(old, parsed_old, new)
        self._parsed = (new, change.parsed)
        return parsed_old, change

    def apply(self, old: str | None, new: str) -> str:
        """Apply a server-only change on the admin socket. An Outcome."""
        if old is None:
            parsed_new, parsed_old, change = self._parse(new), None, None
        else:
            parsed_old, change = self._parse_change(old, new)
            parsed_new = change.parsed
        if parsed_new.socket_path:
            self._socket = AdminSocket(parsed_new.socket_path)
        if parsed_old is None or self._socket is None:
            self.save_state(parsed_new)
            return Outcome.SKIPPED
        with self._lock:
            ops = diff(parsed_old, parsed_new, set(self._draining), change)
        if ops is None:
            self.save_state(parsed_new)
            return Outcome.SKIPPED
        try:
            self._run(ops, parsed_new)
        except ProxyError as err:
            log.warning("runtime update refused, writing the checked file and reloading instead: %s", err)
            self.save_state(parsed_new)
            return Outcome.REFUSED
        return Outcome.APPLIED

    def _run(self, ops: Ops, parsed: Parsed) -> None:
        for backend, name, rest in ops.add:
            self._expect(add_command(backend, name, rest, parsed.owner[backend].default_server[backend]), _ADDED)
            if re.search(r"\bcheck\b", rest):
                self._expect(f"enable health {backend}/{name}")
            self._expect(f"enable server {backend}/{name}")
            log.info("haproxy runtime added %s/%s %s", backend, name, rest)
        for backend, name, weight in ops.weight:
            self._expect(f"set weight {backend}/{name} {weight}")
            log.info("haproxy runtime weight %s/%s %s", backend, name, weight)
        for backend, name in ops.revive:
            self._expect(f"set server {backend}/{name} state ready")
            with self._lock:
                self._draining.pop((backend, name), None)
        for backend, name in ops.drain:
            self._expect(f"set server {backend}/{name} state drain")
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
            write_private(Path(parsed.state_file), keep_state_of_unmoved(state, parsed) + "\n")

    def worker_pid(self) -> int | None:
        """The pid of the worker that answers on the admin socket now."""
        try:
            match = re.search(r"^Pid: (\d+)$", self._cli("show info"), re.MULTILINE)
        except ProxyError:
            return None
        return int(match.group(1)) if match else None

    def after_reload(self, new: str, workers: set[int]) -> None:
        """Wait until a new worker (one of `workers`) answers on the socket with the new backends.

        The reload is asynchronous: until the new worker has bound the admin socket, the old
        one answers, and it knows nothing of new backends. Raises ProxyError when it does not.
        """
        parsed = self._parse(new)
        if parsed.socket_path:
            self._socket = AdminSocket(parsed.socket_path)
        if self._socket is None:
            return
        with self._lock:
            self._draining.clear()  # the new worker never had them; the old one finishes them
            self._refused_deletes.clear()
        wanted = set(parsed.servers)
        deadline = time.monotonic() + RELOAD_SETTLE
        while time.monotonic() < deadline:
            try:
                if self.worker_pid() in workers and wanted <= set(self._cli("show backend").split()):
                    return
            except ProxyError:
                pass
            time.sleep(0.02)
        raise ProxyError(f"haproxy: no new worker with the new backends answered within {RELOAD_SETTLE:.0f} s")

    def _drain_loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self._drain_step()
            except Exception:  # the drain thread never dies: a bug here must not leave servers behind
                log.exception("haproxy drain step failed; retrying")
                self._stop.wait(1.0)

    def _drain_step(self) -> None:
        with self._lock:
            draining = dict(self._draining)
        if not draining:
            return
        sessions: dict[tuple[str, str], int] = {}
        try:
            # the backends that have a server draining, not the whole proxy's table
            for backend in sorted({b for b, _ in draining}):
                sessions.update(session_counts(self._cli(f"show stat {backend} 4 -1")))
        except ProxyError as err:
            log.warning("drain check failed: %s", err)
            return
        now = time.monotonic()
        for (backend, name), deadline in draining.items():
            busy = sessions.get((backend, name), 0)
            if busy > 0 and now < deadline:
                continue
            try:
                if busy > 0:
                    self._cli(f"shutdown sessions server {backend}/{name}")
                self._expect(f"set server {backend}/{name} state maint")
                self._expect(f"del server {backend}/{name}", _DELETED)
            except ProxyError as err:
                # kept in the drain list and tried again; said once per server
                if (backend, name) not in self._refused_deletes:
                    self._refused_deletes.add((backend, name))
                    log.warning("haproxy could not remove %s/%s yet, will retry: %s", backend, name, err)
                continue
            with self._lock:
                self._draining.pop((backend, name), None)
                self._refused_deletes.discard((backend, name))
            self.metrics.add(runtime_updates=1)
            self.metrics.drain_seconds.observe(now - (deadline - self.drain_timeout))
            log.info("haproxy removed %s/%s after drain", backend, name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def write_private(path: Path, text: str) -> None:
    """Write text to path readable by its owner only (0600), through a temp file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask, or a file left by an older run
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def keep_state_of_unmoved(state: str, parsed: Parsed) -> str:
    """`show servers state` without the servers whose address or port the new configuration
    changes. HAProxy restores a server's saved port (and state) by name: a container that came
    back on a new port under the same name would be sent to its old, dead port. Pure."""
    lines = state.splitlines()
    header = next((line[1:].split() for line in lines if line.startswith("#")), [])
    try:
        be, name, addr, port = (header.index(c) for c in ("be_name", "srv_name", "srv_addr", "srv_port"))
    except ValueError:
        return state
    kept = []
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) <= max(be, name, addr, port):
            kept.append(line)
            continue
        configured = parsed.servers.get(fields[be], {}).get(fields[name], "").split()
        if configured and configured[0] == f"{fields[addr]}:{fields[port]}":
            kept.append(line)
    return "\n".join(kept)
