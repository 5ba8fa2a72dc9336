"""The Consul catalog as templates see it: pure values, sanitizing, empty-set grace.

Everything here is pure: it turns the JSON of `/v1/catalog/services`, `/v1/catalog/node/<n>`
and `/v1/health/state/any` into Instances, leaving out (with a warning) any value that could
inject configuration into a proxy file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2, MAINTENANCE: 3}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_TAG = re.compile(r"^[A-Za-z0-9._:=/@+-]{1,255}$")
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Values used as tokens in proxy files: host lists, paths, weights, flags.
_META_VALUE = re.compile(r"^[A-Za-z0-9._:/,=@+*~%!&?()\[\]-]{0,512}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True)
class Instance:
    """One service instance with its aggregated health, as `service()` returns it."""

    id: str
    name: str
    address: str
    port: int
    node: str
    node_address: str
    tags: tuple[str, ...] = ()
    # read-only, so templates get it as it is (no copy per render) and cannot change the store's data
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    status: str = PASSING


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)


@dataclass
class Snapshot:
    """Everything a dc's catalog holds that templates can use."""

    services: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> tags
    instances: dict[str, tuple[Instance, ...]] = field(default_factory=dict)
    nodes: tuple[Node, ...] = ()


def valid_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(text))


def valid_name(text: str) -> bool:
    return bool(_NAME.match(text))


def clean_tags(tags: Iterable[Any], where: str, warn: Any) -> tuple[str, ...]:
    kept = []
    for tag in tags or ():
        if isinstance(tag, str) and _TAG.match(tag):
            kept.append(tag)
        else:
            warn(f"left out tag {where} tag={tag!r}: not a safe token")
    return tuple(kept)


def clean_meta(meta: dict[str, Any] | None, where: str, warn: Any) -> Mapping[str, str]:
    kept = {}
    for key, value in sorted((meta or {}).items()):
        if isinstance(value, str) and _META_KEY.match(str(key)) and _META_VALUE.match(value):
            kept[str(key)] = value
        else:
            warn(f"left out meta {where} key={key!r} value={value!r}: not a safe token")
    return MappingProxyType(kept)


def aggregate(statuses: Iterable[str]) -> str:
    worst = PASSING
    for status in statuses:
        if _SEVERITY.get(status, 2) > _SEVERITY[worst]:
            worst = status if status in _SEVERITY else CRITICAL
    return worst


def build_snapshot(
    services: dict[str, list[str]],
    node_catalogs: dict[str, dict[str, Any]],
    checks: list[dict[str, Any]],
    warn: Any,
) -> Snapshot:
    """Join the catalog's node entries with the checks into instances, sanitizing as it goes.

    node_catalogs maps node name to `/v1/catalog/node/<name>` output ({"Node": .., "Services": ..}).
    """
    node_checks: dict[str, list[str]] = {}
    service_checks: dict[tuple[str, str], list[str]] = {}
    for check in checks or []:
        node = str(check.get("Node", ""))
        status = str(check.get("Status", CRITICAL))
        check_id = str(check.get("CheckID", ""))
        if check_id.startswith("_service_maintenance:") or check_id == "_node_maintenance":
            status = MAINTENANCE if status == CRITICAL else status
        sid = str(check.get("ServiceID") or "")
        if sid:
            service_checks.setdefault((node, sid), []).append(status)
        else:
            node_checks.setdefault(node, []).append(status)

    snapshot = Snapshot()
    for name, tags in sorted((services or {}).items()):
        if not valid_name(name):
            warn(f"left out service name={name!r}: not a safe name")
            continue
        snapshot.services[name] = clean_tags(tags, f"service={name}", warn)

    instances: dict[str, list[Instance]] = {}
    nodes = []
    for node_name, catalog in sorted(node_catalogs.items()):
        node_info: dict[str, Any] = (catalog or {}).get("Node") or {}
        node_address = str(node_info.get("Address", ""))
        if not valid_name(node_name) or not valid_address(node_address):
            warn(f"left out node node={node_name!r} address={node_address!r}: not a safe name or address")
            continue
        nodes.append(Node(node_name, node_address, clean_meta(node_info.get("Meta"), f"node={node_name}", warn)))
        for sid, svc in sorted(((catalog or {}).get("Services") or {}).items()):
            name = str(svc.get("Service", ""))
            if name not in snapshot.services:
                continue
            where = f"service={name} id={sid}"
            address = str(svc.get("Address") or node_address)
            port = svc.get("Port")
            if not valid_address(address):
                warn(f"left out instance {where} address={address!r}: not an IP or host name")
                continue
            if not isinstance(port, int) or not 0 < port < 65536:
                warn(f"left out instance {where} port={port!r}: not a port")
                continue
            if not _TAG.match(sid):
                warn(f"left out instance service={name} id={sid!r}: unsafe id")
                continue
            status = aggregate([*node_checks.get(node_name, []), *service_checks.get((node_name, sid), [])])
            instances.setdefault(name, []).append(
                Instance(
                    id=sid,
                    name=name,
                    address=address,
                    port=port,
                    node=node_name,
                    node_address=node_address,
                    tags=clean_tags(svc.get("Tags"), where, warn),
                    meta=clean_meta(svc.get("Meta"), where, warn),
                    status=status,
                )
            )
    snapshot.instances = {k: tuple(sorted(v, key=lambda i: (i.node, i.id))) for k, v in instances.items()}
    snapshot.nodes = tuple(nodes)
    return snapshot


@dataclass
class Grace:
    """Holds a service's instances when its set drops to nothing at once.

    A Consul agent that restarts and loses its state reports every service as gone until the
    registrars restore them; believing that would empty every backend. An emptied set is held
    for `seconds` before it is believed; any non-empty set is believed at once.
    """

    seconds: float
    held_since: dict[str, float] = field(default_factory=dict)

    def apply(self, previous: Snapshot | None, new: Snapshot, now: float) -> tuple[Snapshot, float | None]:
        """The snapshot to render, and when to look again (None: nothing is held)."""
        if previous is None or self.seconds <= 0:
            self.held_since.clear()
            return new, None
        result = Snapshot(services=dict(new.services), instances=dict(new.instances), nodes=new.nodes)
        next_deadline: float | None = None
        for name, old_instances in previous.instances.items():
            if not old_instances or new.instances.get(name):
                self.held_since.pop(name, None)
                continue
            since = self.held_since.setdefault(name, now)
            if now - since < self.seconds:
                result.instances[name] = old_instances
                result.services.setdefault(name, previous.services.get(name, ()))
                deadline = since + self.seconds
                next_deadline = deadline if next_deadline is None else min(next_deadline, deadline)
            else:
                self.held_since.pop(name, None)
        for name in list(self.held_since):
            if name not in previous.instances:
                self.held_since.pop(name, None)
        return result, next_deadline

    def holding(self) -> list[str]:
        return sorted(self.held_since)
