"""The Docker engine's own configuration file: put the drain plugin in its authorization chain,
or take it out, and have the engine reload it (SIGHUP; `authorization-plugins` is one of the
settings dockerd applies without a restart).

An authorization plugin the engine cannot reach fails every API call closed (the engine retries
for 30 s, then refuses the call). So the plugin adds itself only once it listens, and takes
itself out before it exits: Docker never waits on a plugin that is gone on purpose.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import SidecarError
from sidecar.logs import kv

log = logging.getLogger("registrar.drain")

KEY = "authorization-plugins"


def with_plugin(config: dict[str, object], name: str, enabled: bool) -> dict[str, object]:
    """The configuration with the plugin in (last, after any the operator has) or out. Pure."""
    current = config.get(KEY)
    plugins = [str(p) for p in current] if isinstance(current, list) else []
    plugins = [p for p in plugins if p != name] + ([name] if enabled else [])
    updated = dict(config)
    updated[KEY] = plugins
    return updated


def find_dockerd(proc: Path) -> int:
    """The one dockerd process (with `pid: host` in a container, the host's)."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "dockerd":
                    found.append(int(entry.name))
            except OSError:
                continue
    if len(found) != 1:
        raise SidecarError(f"engine pid auto: {len(found)} dockerd processes found (give --engine-pid)")
    return found[0]


@dataclass(frozen=True)
class EngineConfig:
    """dockerd's --config-file, and where its PID is found (a pid file, or a number)."""

    path: Path
    pid: str

    def engine_pid(self) -> int:
        text = self.pid
        if text == "auto":
            return find_dockerd(Path("/proc"))
        if not text.isdigit():
            try:
                text = Path(text).read_text().strip()
            except OSError as err:
                raise SidecarError(f"engine pid file {self.pid}: {err.strerror}") from err
        if not text.isdigit():
            raise SidecarError(f"engine pid {self.pid!r}: not a process ID")
        return int(text)

    def read(self) -> dict[str, object]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise SidecarError(f"engine config {self.path}: {err.strerror}") from err
        try:
            loaded = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            raise SidecarError(f"engine config {self.path}: not JSON ({err})") from err
        if not isinstance(loaded, dict):
            raise SidecarError(f"engine config {self.path}: not a JSON object")
        return loaded

    def set_plugin(self, name: str, enabled: bool) -> bool:
        """Write the file (atomically) and signal the engine when it changes; whether it did.
        Under a lock beside the file: plugins of one engine (tests, a restart) edit it in turn."""
        try:
            with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return self._set_plugin(name, enabled)
        except OSError as err:
            raise SidecarError(f"engine config {self.path}: {err.strerror}") from err

    def _set_plugin(self, name: str, enabled: bool) -> bool:
        config = self.read()
        updated = with_plugin(config, name, enabled)
        if updated.get(KEY) == config.get(KEY):
            return False
        pid = self.engine_pid()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(updated, out, indent=2)
                out.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            raise SidecarError(f"engine config {self.path}: {err.strerror}") from err
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as err:
            raise SidecarError(f"engine pid {pid}: {err.strerror}") from err
        log.info("engine config %s", kv(plugin=name, enabled=enabled, file=self.path, pid=pid))
        return True
