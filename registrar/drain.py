"""sidecar-stop: drain a container's services in Consul, then stop it (a preStop hook for Docker).

`docker stop` sends the stop signal at once, and the registrar hears of it (the `kill` event)
only as the container gets it. A backend that closes its listener on SIGTERM (Go's
`http.Server.Shutdown`, gunicorn, uvicorn) then refuses or resets what the proxies send it in
the moment before they see the registrar's maintenance; behind Docker's userland proxy, or with
a connection waiting in the backend's accept queue, that is a failed POST no proxy may resend.
This command puts the container's services in maintenance first (the proxies of every host drop
them), waits `--drain`, and only then stops the container. The registrar never lifts a
maintenance it did not set, and deregisters the services when the container is gone.

Where the engine runs the drain plugin (sidecar-drain, registrar.drain_guard), plain docker stop
and every other client drain the same way, and this command says so: it is needed only on
engines without the plugin. It still works there (the plugin finds the services already in
maintenance and does not wait again).

    sidecar-stop [--consul URL] [--token-file F] [--docker URL] [--drain 2s] [-t SECONDS] CONTAINER...
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registrar.consul_registry import ConsulRegistry
from registrar.docker_events import DockerSource, default_docker_url
from registrar.model import Held, now_text
from sidecar.consul_conn import add_consul_arguments, consul_settings_from
from sidecar.durations import parse_duration
from sidecar.errors import SidecarError

PLUGIN_PREFIX = "consul-sidecar-drain"  # registrar.drain_guard's default plugin name, and the tests'
PLUGIN_DIR = Path("/run/docker/plugins")


def services_of(agent_services: Mapping[str, Held], container_id: str) -> list[str]:
    """The IDs of the services the registrar registered for this container (meta container_id)."""
    short = container_id[:12]
    return sorted(sid for sid, held in agent_services.items() if held.meta.get("container_id") == short)


def stop_timeout(inspect: Mapping[str, Any], flag: int | None) -> int:
    """-t, else the container's own stop timeout (docker run --stop-timeout), else Docker's 10 s."""
    if flag is not None:
        return flag
    configured = (inspect.get("Config") or {}).get("StopTimeout")
    return int(configured) if isinstance(configured, int) and configured >= 0 else 10


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar-stop",
        description="Put a container's services in Consul maintenance, let every proxy drop them, then stop it.",
    )
    add_consul_arguments(p)
    p.add_argument(
        "--docker",
        default=default_docker_url(dict(os.environ), os.path.exists),
        help="Docker engine URL (DOCKER_HOST; else /var/run/docker.sock, or /tmp/docker.sock as registrator mounts it)",
    )
    p.add_argument("--drain", default="2s", help="wait this long between the maintenance and the stop signal")
    p.add_argument("-t", "--time", type=int, default=None, help="seconds to wait for it to stop before killing it")
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="name or ID")
    return p


def answering_plugins(directory: Path = PLUGIN_DIR) -> list[str]:
    """The drain plugins whose socket answers here (dockerd's plugin directory), by name. The
    engine's `docker info` lists only the plugins it started with, not one added by a reload."""
    found = []
    for path in sorted(directory.glob(f"{PLUGIN_PREFIX}*.sock")):
        conn = _UnixHTTP(str(path))
        try:
            conn.request("POST", "/Plugin.Activate", body=b"", headers={"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError):
            continue
        finally:
            conn.close()
        if isinstance(answer, dict) and "authz" in (answer.get("Implements") or []):
            found.append(path.name[: -len(".sock")])
    return found


class _UnixHTTP(http.client.HTTPConnection):
    """HTTP over a unix socket, as the engine talks to its plugins."""

    def __init__(self, path: str) -> None:
        super().__init__("plugin", timeout=0.5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def plugin_note(docker: DockerSource) -> str | None:
    """A note when the engine runs the drain plugin (its name starts consul-sidecar-drain)."""
    try:
        listed = docker.authorization_plugins()
    except SidecarError:
        listed = []
    ours = [p for p in listed if p.startswith(PLUGIN_PREFIX)] or answering_plugins()
    if not ours:
        return None
    return (f"this engine runs the drain plugin ({ours[0]}): plain docker stop, docker-compose down and "
            "every other client drain first; sidecar-stop is not needed here")  # fmt: skip


def drain_and_stop(consul: ConsulRegistry, docker: DockerSource, name: str, drain: float, timeout: int | None) -> str:
    """One container. Raises SidecarError; on a failed stop the maintenance is lifted again."""
    info = docker.inspect(name)
    if info is None:
        raise SidecarError(f"no such container: {name}")
    container_id, shown = str(info["Id"]), str(info.get("Name", name)).lstrip("/")
    if not (info.get("State") or {}).get("Running"):
        return f"{shown}: not running"
    sids = services_of(consul.agent_state(checks=False).services, container_id)
    reason = f"Draining: sidecar-stop at {now_text()}"
    for sid in sids:
        consul.maintenance(sid, True, reason)
    started = time.monotonic()
    if sids:
        time.sleep(drain)
    try:
        docker.stop(container_id, stop_timeout(info, timeout))
    except SidecarError:
        for sid in sids:  # still running: routable again rather than drained for good
            consul.maintenance(sid, False)
        raise
    took = time.monotonic() - started
    if not sids:
        return f"{shown}: no services registered for it (no drain), stopped in {took:.1f} s"
    return f"{shown}: {len(sids)} service(s) drained for {drain:g} s, stopped {took:.1f} s after the maintenance"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        drain = parse_duration(args.drain)
    except ValueError as err:
        print(f"sidecar-stop: --drain {args.drain!r}: {err}", file=sys.stderr)
        return 2
    consul = ConsulRegistry(consul_settings_from(args))
    docker = DockerSource(args.docker)
    note = plugin_note(docker)
    if note:
        print(f"sidecar-stop: note: {note}", file=sys.stderr, flush=True)
    failed = 0
    for name in args.containers:
        try:
            print(f"sidecar-stop: {drain_and_stop(consul, docker, name, drain, args.time)}", flush=True)
        except SidecarError as err:
            print(f"sidecar-stop: {name}: {err}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
