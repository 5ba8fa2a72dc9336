"""The Consul catalog as templates see it: pure values, sanitizing, empty-set grace.

Everything here is pure: it turns the JSON of `/v1/catalog/nodes`, `/v1/catalog/node/<n>` and
`/v1/health/service/<name>` rows into Instances and Nodes, leaving out (with a warning) any
value that could inject configuration into a proxy file. catalog_index keeps them up to date.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sidecar.text import UNSAFE

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2, MAINTENANCE: 3}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")
_ID = re.compile(r"^[A-Za-z0-9._:=/@+-]{1,255}\Z")  # an instance id: part of server names and logs
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
TAG_MAX, META_VALUE_MAX = 1024, 512
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
    # its node's checks and its own, kept only while a template reads them (consul-template's
    # `.Checks`; CatalogIndex.keep_checks): otherwise empty, and only the aggregated status is kept
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Check:
    """One health check of an instance or of its node ("" service_id), as `.Checks` lists it."""

    node: str
    check_id: str
    name: str
    status: str
    service_id: str = ""
    service_name: str = ""
    notes: str = ""
    output: str = ""
    type: str = ""
    modify_index: int = field(default=0, compare=False)  # which of two reports of it is newer


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
    # the services whose entries differ from the snapshot before this one; None: any may
    changed: frozenset[str] | None = None
    listing: list[Mapping[str, Any]] | None = field(default=None, compare=False, repr=False)  # services()
    checks: bool = False  # whether instances carry their checks (Instance.checks)


def listing(services: Mapping[str, tuple[str, ...]]) -> list[Mapping[str, Any]]:
    """What `services()` returns: read-only entries in name order."""
    return [MappingProxyType({"name": name, "tags": tags}) for name, tags in sorted(services.items())]


@functools.lru_cache(maxsize=65536)
def valid_hostname(text: str) -> bool:
    """A DNS host name (no IP address, no wildcard)."""
    return bool(_HOSTNAME.match(text))


@functools.lru_cache(maxsize=65536)  # a catalog has few addresses and many instances on them
def valid_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(text))


@functools.lru_cache(maxsize=65536)  # node and service names: many instances share each
def valid_name(text: str) -> bool:
    return bool(_NAME.match(text))


@functools.lru_cache(maxsize=4096)
def _meta_key(key: str) -> bool:
    return bool(_META_KEY.match(key))


def _unwritable(value: Any, longest: int) -> str:
    """Why a tag or meta value cannot reach a template ("" when it can). Text as Consul holds it
    does (`urlprefix-/api strip=/api`, a rule with backticks, a description with spaces): what a
    template writes into a proxy file is validated or quoted where it is written (routes(),
    haproxy_quote, nginx_quote). A line break or control character never reaches one."""
    if not isinstance(value, str):
        return "not text"
    if UNSAFE.search(value):
        return "a control character or line break"
    return f"longer than {longest} characters" if len(value) > longest else ""


CHECK_TEXT_MAX = 4096  # Consul's own limit on a check's output


def check_text(value: Any) -> str:
    """A check's name, notes or output as templates get it: text, every line break and control
    character a space (a script's output has several lines), at most CHECK_TEXT_MAX characters."""
    return UNSAFE.sub(" ", value if isinstance(value, str) else "")[:CHECK_TEXT_MAX]


def clean_check(raw: Mapping[str, Any], warn: Any) -> Check | None:
    """A check from Consul's JSON (a health answer's `Checks`, `/v1/health/state/<s>`), or None
    with a warning when its node, id or service id could not be named safely."""
    node, check_id, sid = raw.get("Node"), raw.get("CheckID"), raw.get("ServiceID") or ""
    if not (isinstance(node, str) and valid_name(node) and isinstance(check_id, str) and _ID.match(check_id)
            and isinstance(sid, str) and (sid == "" or _ID.match(sid))):  # fmt: skip
        warn(f"left out check node={node!r} check={check_id!r} service_id={sid!r}: unsafe name or id")
        return None
    status = str(raw.get("Status", CRITICAL))
    return Check(
        node, check_id, check_text(raw.get("Name")), status if status in _SEVERITY else CRITICAL, sid,
        check_text(raw.get("ServiceName")), check_text(raw.get("Notes")), check_text(raw.get("Output")),
        check_text(raw.get("Type")), int(raw.get("ModifyIndex") or 0),
    )  # fmt: skip


Where = str | Callable[[], str]  # what a warning names, or how to say it (made only for a warning)


def _say(where: Where) -> str:
    return where if isinstance(where, str) else where()


def clean_tags(tags: Iterable[Any] | None, where: Where, warn: Any) -> tuple[str, ...]:
    kept = []
    for tag in tags or ():
        why = _unwritable(tag, TAG_MAX) or ("empty" if tag == "" else "")
        if why:
            warn(f"left out tag {_say(where)} tag={tag!r}: {why}")
        else:
            kept.append(tag)
    return tuple(kept)


_EMPTY_META: Mapping[str, str] = MappingProxyType({})


def clean_meta(meta: dict[str, Any] | None, where: Where, warn: Any) -> Mapping[str, str]:
    if not meta:
        return _EMPTY_META
    kept = {}
    for key, value in sorted(meta.items(), key=lambda item: str(item[0])):
        why = _unwritable(value, META_VALUE_MAX) or ("" if _meta_key(str(key)) else "not a meta key")
        if why:
            warn(f"left out meta {_say(where)} key={key!r} value={value!r}: {why}")
        else:
            kept[str(key)] = value
    return MappingProxyType(kept)


def severity(status: str) -> int:
    """How bad a status is: passing 0 ... maintenance 3; anything unknown counts as critical."""
    return _SEVERITY.get(status, 2)


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


def node_services(catalog: Mapping[str, Any] | None) -> Iterable[tuple[Any, dict[str, Any]]]:
    """A node's services as (id, service): from `/v1/catalog/node-services/<name>` (a list; what
    the templater reads: Consul answers it faster, a third less at 30,000 services, as it need not
    sort a map's keys) or `/v1/catalog/node/<name>` (a map by id)."""
    services = (catalog or {}).get("Services") or ()
    if isinstance(services, dict):
        return ((sid, svc) for sid, svc in services.items() if isinstance(svc, dict))
    return ((svc.get("ID"), svc) for svc in services if isinstance(svc, dict))


def rows_from_node(node_name: str, catalog: dict[str, Any] | None) -> list[Row]:
    """A node's services (node_services) as rows in the `/v1/catalog/service/<name>` shape (the
    same row as service_row gives for the same instance)."""
    node_address = ((catalog or {}).get("Node") or {}).get("Address")
    return [
        {
            "Node": node_name,
            "Address": node_address,
            "ServiceID": sid,
            "ServiceName": svc.get("Service"),
            "ServiceAddress": svc.get("Address"),
            "ServicePort": svc.get("Port"),
            "ServiceTags": svc.get("Tags") or [],
            "ServiceMeta": svc.get("Meta") or {},
        }
        for sid, svc in node_services(catalog)
    ]


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

        def where(sid: Any = sid) -> str:
            return f"service={name} id={sid!r}"

        if not valid_name(node_name) or not valid_address(node_address):
            warn(f"left out instance {where()} node={node_name!r} address={node_address!r}: unsafe node")
            continue
        if not isinstance(sid, str) or not _ID.match(sid):
            warn(f"left out instance service={name} id={sid!r}: unsafe id")
            continue
        address = str(row.get("ServiceAddress") or node_address)
        port = row.get("ServicePort")
        if not valid_address(address):
            warn(f"left out instance {where()} address={address!r}: not an IP or host name")
            continue
        if not isinstance(port, int) or not 0 < port < 65536:
            warn(f"left out instance {where()} port={port!r}: not a port")
            continue
        instance = _new(Instance)  # as Instance(...) makes it, without a setattr call per field
        instance.__dict__.update(
            id=sid,
            name=name,
            address=address,
            port=port,
            node=node_name,
            node_address=node_address,
            tags=clean_tags(row.get("ServiceTags"), where, warn),
            meta=clean_meta(row.get("ServiceMeta"), where, warn),
            status=PASSING,
            checks=(),
        )
        instances.append(instance)
    return tuple(sorted(instances, key=_by_node_and_id))


# Building the instances of a node's answer makes tens of thousands at once (30,000 at 10,000
# services x 3); the frozen dataclass's __init__ sets each field through object.__setattr__,
# a third of that build. A unit test checks the result equals Instance(...).
_new = object.__new__


def _by_node_and_id(instance: Instance) -> tuple[str, str]:
    return instance.node, instance.id


def _covers(new: tuple[Instance, ...], old: tuple[Instance, ...]) -> bool:
    """Every instance of old is in new (by node and id)."""
    keys = {(i.node, i.id) for i in new}
    return all((i.node, i.id) in keys for i in old)


@dataclass
class Grace:
    """Holds a service's instances when its set drops to nothing at once.

    A Consul agent that restarts and loses its state reports every service as gone until the
    registrars restore them; believing that would empty every backend. An emptied set is held
    for `seconds` before it is believed, and while it comes back in parts the missing instances
    stay; any other change is believed at once.
    """

    seconds: float
    held_since: dict[str, float] = field(default_factory=dict)

    def apply(self, previous: Snapshot | None, new: Snapshot, now: float) -> tuple[Snapshot, float | None]:
        """The snapshot to render, and when to look again (None: nothing is held).

        Only the services new names as changed, and those held, are looked at."""
        if previous is None or self.seconds <= 0:
            self.held_since.clear()
            return new, None
        held_before = set(self.held_since)
        names = set(previous.instances) if new.changed is None else set(new.changed) | held_before
        holds: dict[str, tuple[Instance, ...]] = {}
        next_deadline: float | None = None
        for name in sorted(names):
            old_instances = previous.instances.get(name)
            back = new.instances.get(name, ())
            if not old_instances or (back and name not in self.held_since) or _covers(back, old_instances):
                self.held_since.pop(name, None)
                continue
            since = self.held_since.setdefault(name, now)
            if now - since < self.seconds:
                # coming back in parts (the registrars restore them one by one): what is back,
                # and the rest as it was, until all are back or the grace ends
                keys = {(i.node, i.id) for i in back}
                kept = [*back, *(i for i in old_instances if (i.node, i.id) not in keys)]
                holds[name] = tuple(sorted(kept, key=lambda i: (i.node, i.id)))
                deadline = since + self.seconds
                next_deadline = deadline if next_deadline is None else min(next_deadline, deadline)
            else:
                self.held_since.pop(name, None)
        changed = None if new.changed is None else new.changed | held_before | set(self.held_since)
        if not holds:  # nothing held: new as it is (no copy of its 10,000-entry maps per change)
            return (new if changed == new.changed else dataclasses.replace(new, changed=changed)), None
        result = Snapshot(dict(new.services), dict(new.instances), new.nodes, changed, checks=new.checks)
        for name, instances in holds.items():
            result.instances[name] = instances
            result.services.setdefault(name, previous.services.get(name, ()))
        if result.services.keys() == new.services.keys():  # nothing held in: the same listing
            result.listing = new.listing
        return result, next_deadline

    def holding(self) -> list[str]:
        return sorted(self.held_since)
