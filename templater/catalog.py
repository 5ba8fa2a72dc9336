"""The Consul catalog as templates see it: pure values, sanitizing, empty-set grace.

Everything here is pure: it turns the JSON of `/v1/catalog/services`, `/v1/catalog/nodes`,
`/v1/catalog/node/<n>`, `/v1/catalog/service/<name>` and `/v1/health/state/any` into Instances,
leaving out (with a warning) any value that could inject configuration into a proxy file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2, MAINTENANCE: 3}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")
_TAG = re.compile(r"^[A-Za-z0-9._:=/@+-]{1,255}\Z")
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
# Values used as tokens in proxy files: host lists, paths, weights, flags.
_META_VALUE = re.compile(r"^[A-Za-z0-9._:/,=@+*~%!&?()\[\]-]{0,512}\Z")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
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


def valid_hostname(text: str) -> bool:
    """A DNS host name (no IP address, no wildcard)."""
    return bool(_HOSTNAME.match(text))


def valid_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(text))


def valid_name(text: str) -> bool:
    return bool(_NAME.match(text))


def clean_tags(tags: Iterable[Any] | None, where: str, warn: Any) -> tuple[str, ...]:
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


Row = dict[str, Any]  # one instance as `/v1/catalog/service/<name>` lists it, ROW_KEYS only
ROW_KEYS = (
    "Node",
    "Address",
    "ServiceID",
    "ServiceName",
    "ServiceAddress",
    "ServicePort",
    "ServiceTags",
    "ServiceMeta",
)


def service_row(entry: dict[str, Any]) -> Row:
    """A `/v1/catalog/service/<name>` entry cut down to what instances are built from.

    Both reads give the same row for the same instance (empty meta is {}, not None), so a full
    read can be compared with targeted ones."""
    row = {k: entry.get(k) for k in ROW_KEYS}
    row["ServiceTags"] = row["ServiceTags"] or []
    row["ServiceMeta"] = row["ServiceMeta"] or {}
    return row


def sorted_rows(rows: Iterable[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (str(r.get("Node")), str(r.get("ServiceID"))))


def rows_from_node(node_name: str, catalog: dict[str, Any] | None) -> list[Row]:
    """`/v1/catalog/node/<name>` output as rows in the `/v1/catalog/service/<name>` shape."""
    node_info: dict[str, Any] = (catalog or {}).get("Node") or {}
    rows = []
    for sid, svc in ((catalog or {}).get("Services") or {}).items():
        rows.append(
            service_row(
                {
                    "Node": node_name,
                    "Address": node_info.get("Address"),
                    "ServiceID": sid,
                    "ServiceName": svc.get("Service"),
                    "ServiceAddress": svc.get("Address"),
                    "ServicePort": svc.get("Port"),
                    "ServiceTags": svc.get("Tags"),
                    "ServiceMeta": svc.get("Meta"),
                }
            )
        )
    return rows


def group_rows(rows: Iterable[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(str(row.get("ServiceName", "")), []).append(row)
    return {name: sorted_rows(group) for name, group in grouped.items()}


def clean_services(services: Mapping[str, Any], warn: Any) -> dict[str, tuple[str, ...]]:
    """`/v1/catalog/services` (name -> tags) without unsafe names and tags."""
    kept = {}
    for name, tags in sorted(services.items()):
        if not valid_name(name):
            warn(f"left out service name={name!r}: not a safe name")
            continue
        kept[name] = clean_tags(tags, f"service={name}", warn)
    return kept


def clean_nodes(nodes: Iterable[dict[str, Any]], warn: Any) -> tuple[Node, ...]:
    """`/v1/catalog/nodes` as Nodes, leaving out unsafe names and addresses."""
    kept = []
    for node in sorted(nodes, key=lambda n: str(n.get("Node", ""))):
        name, address = str(node.get("Node", "")), str(node.get("Address", ""))
        if not valid_name(name) or not valid_address(address):
            warn(f"left out node node={name!r} address={address!r}: not a safe name or address")
            continue
        kept.append(Node(name, address, clean_meta(node.get("Meta"), f"node={name}", warn)))
    return tuple(kept)


def build_instances(name: str, rows: Iterable[Row], warn: Any) -> tuple[Instance, ...]:
    """One service's rows as Instances (status passing until health is applied), sanitized."""
    instances = []
    for row in rows:
        sid = row.get("ServiceID")
        node_name, node_address = str(row.get("Node", "")), str(row.get("Address", ""))
        where = f"service={name} id={sid!r}"
        if not valid_name(node_name) or not valid_address(node_address):
            warn(f"left out instance {where} node={node_name!r} address={node_address!r}: unsafe node")
            continue
        if not isinstance(sid, str) or not _TAG.match(sid):
            warn(f"left out instance service={name} id={sid!r}: unsafe id")
            continue
        address = str(row.get("ServiceAddress") or node_address)
        port = row.get("ServicePort")
        if not valid_address(address):
            warn(f"left out instance {where} address={address!r}: not an IP or host name")
            continue
        if not isinstance(port, int) or not 0 < port < 65536:
            warn(f"left out instance {where} port={port!r}: not a port")
            continue
        instances.append(
            Instance(
                id=sid,
                name=name,
                address=address,
                port=port,
                node=node_name,
                node_address=node_address,
                tags=clean_tags(row.get("ServiceTags"), where, warn),
                meta=clean_meta(row.get("ServiceMeta"), where, warn),
            )
        )
    return tuple(sorted(instances, key=lambda i: (i.node, i.id)))


def check_signatures(checks: Iterable[dict[str, Any]]) -> dict[str, frozenset[tuple[str, ...]]]:
    """Per service, which instances have which checks, from `/v1/health/state/any`. Pure.

    A service whose signature moved gained or lost an instance with checks (or its tags
    changed): it is read again. Status and output are left out, so a check that flaps costs no
    read; health is applied from the same data without one."""
    found: dict[str, set[tuple[str, ...]]] = {}
    for check in checks:
        name = check.get("ServiceName")
        if not name or str(check.get("CheckID", "")).startswith("_service_maintenance:"):
            continue
        found.setdefault(str(name), set()).add(
            (
                str(check.get("Node", "")),
                str(check.get("ServiceID", "")),
                str(check.get("CheckID", "")),
                str(check.get("CreateIndex", "")),
                ",".join(str(t) for t in check.get("ServiceTags") or ()),
            )
        )
    return {name: frozenset(sig) for name, sig in found.items()}


def behind_checks(signature: frozenset[tuple[str, ...]], rows: Iterable[Row]) -> set[tuple[str, str]]:
    """Instances (node, service ID) that the checks show and a read of the service does not:
    the read was answered by a server that has not applied that registration yet (a stale read
    during a leader change). Pure."""
    listed = {(str(r["Node"]), str(r["ServiceID"])) for r in rows}
    return {(sig[0], sig[1]) for sig in signature} - listed


@dataclass(frozen=True)
class Health:
    """The checks of `/v1/health/state/any`, aggregated per node and per (node, service id)."""

    nodes: Mapping[str, str] = field(default_factory=dict)
    services: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def status(self, node: str, sid: str) -> str:
        node_status = self.nodes.get(node, PASSING)
        service_status = self.services.get((node, sid), PASSING)
        return node_status if _SEVERITY[node_status] >= _SEVERITY[service_status] else service_status


def health_index(checks: Iterable[dict[str, Any]]) -> Health:
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
    return Health(
        {k: aggregate(v) for k, v in node_checks.items()},
        {k: aggregate(v) for k, v in service_checks.items()},
    )


def with_health(instances: tuple[Instance, ...], health: Health) -> tuple[Instance, ...]:
    """The instances with their status; the same tuple when every one is passing."""
    statuses = [health.status(i.node, i.id) for i in instances]
    if all(s == PASSING for s in statuses):
        return instances
    return tuple(i if s == i.status else replace(i, status=s) for i, s in zip(instances, statuses, strict=True))


def instances_with_health(
    services: Mapping[str, Any], built: Mapping[str, tuple[Instance, ...]], health: Health
) -> dict[str, tuple[Instance, ...]]:
    """The instances of the (cleaned) services, with their status; services with none left out."""
    return {name: with_health(built[name], health) for name in services if built.get(name)}


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
