"""What a Docker authorization request asks, for the drain plugin. Pure.

The engine hands every API call to its authorization plugins (AuthZPlugin.AuthZReq) before it
acts on it, and waits for the answer. Four calls end a running container's process:
`POST /containers/{ref}/stop`, `/restart`, `/kill` (with a terminating signal; KILL when none)
and `DELETE /containers/{ref}?force=1`. docker stop, docker restart, docker rm -f, docker kill,
docker-compose down and every other client of the engine go through them.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from registrar.intents import TERMINATING
from registrar.model import Held
from sidecar.signals import parse_signal

_PATH = re.compile(r"^(?:/v[0-9][0-9.]*)?/containers/(?P<ref>[^/]+)(?P<tail>/stop|/restart|/kill)?/?$")
_HEX = re.compile(r"^[0-9a-f]+$")
DRAIN_MARK = "(consul-sidecar-drain)"  # ends the reason of every maintenance the plugin sets


@dataclass(frozen=True)
class Stopping:
    """A call that stops a container: ref as the client wrote it (a name, an ID or a prefix)."""

    ref: str
    action: str  # stop, restart, kill, remove

    def __str__(self) -> str:
        return f"{self.action} {self.ref}"


def _true(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


def stopping(method: str, uri: str) -> Stopping | None:
    """The stop a request asks for, or None (every other call, and a kill with a signal the
    process may handle, such as HUP for a reload)."""
    split = urllib.parse.urlsplit(uri)
    matched = _PATH.match(split.path)
    if matched is None:
        return None
    ref = urllib.parse.unquote(matched["ref"]).lstrip("/")
    query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
    tail = matched["tail"] or ""
    method = method.upper()
    if method == "POST" and tail in ("/stop", "/restart"):
        return Stopping(ref, tail[1:])
    if method == "POST" and tail == "/kill":
        number = parse_signal(query.get("signal") or "KILL")
        return Stopping(ref, "kill") if number in TERMINATING else None
    if method == "DELETE" and not tail and _true(query.get("force", "")):
        return Stopping(ref, "remove")
    return None


def services_of(ref: str, services: Mapping[str, Held]) -> list[str]:
    """The IDs of the services the registrar registered for the container a client named, as
    Docker resolves a reference: its name, else its ID or a prefix of it."""
    ours = {sid: held for sid, held in services.items() if held.meta.get("container_id")}
    by_name = sorted(sid for sid, held in ours.items() if held.meta.get("container_name") == ref)
    if by_name:
        return by_name
    wanted = ref.lower()
    if not _HEX.match(wanted):
        return []
    found = []
    for sid, held in ours.items():
        short = held.meta["container_id"].lower()  # the registrar keeps the first 12 digits
        if short.startswith(wanted) if len(wanted) <= len(short) else wanted.startswith(short):
            found.append(sid)
    return sorted(found)


_OWN = re.compile(r"/containers/([0-9a-f]{64})/(?:resolv\.conf|hostname|hosts) ")


def own_container_id(mountinfo: str) -> str | None:
    """This process's container, from /proc/self/mountinfo (Docker bind-mounts the container's
    resolv.conf, hostname and hosts from its directory, with host networking too); None outside."""
    found = _OWN.search(mountinfo)
    return found[1] if found else None


def names_self(ref: str, own_id: str, own_name: str) -> bool:
    """Whether a client's reference is the plugin's own container (by name, ID or prefix)."""
    wanted = ref.lower()
    if own_name and ref == own_name:
        return True
    return len(wanted) >= 1 and _HEX.match(wanted) is not None and own_id.startswith(wanted)


def reason(stop: Stopping, at: str) -> str:
    """The maintenance reason shown in the Consul UI. Not the registrar's mark: the registrar's
    periodic check never lifts it (the drain would end early); the container's end removes it
    with its services, and the registrar lifts it when the container starts again."""
    return f"Draining: docker {stop.action} of {stop.ref} at {at} {DRAIN_MARK}"


def allow() -> dict[str, object]:
    return {"Allow": True}
