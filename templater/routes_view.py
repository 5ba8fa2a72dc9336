"""The routes page's data: what this host's proxy sends where, and why. Pure.

Built from the catalog the templates see (every instance of a routed service, whatever its
state), the routing table of the bundled templates (templater.routes: which service won which
host and path, the servers and their weights, the warnings), the services the empty grace
holds, and the `ingress` registrations of every host's proxy (the fleet). The JSON API serves
this document as it is; the page is drawn from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from templater.catalog import MAINTENANCE, PASSING, Instance, Snapshot
from templater.route_options import Options
from templater.routes import Route, Table

_WARNING = re.compile(r"^service (?P<name>[^ :]+): ")


def warning_service(text: str) -> str:
    """The service a routing warning names ('service web: ...'), '' when none."""
    found = _WARNING.match(text)
    return found["name"] if found else ""


def instance_state(instance: Instance, routed: bool, held: bool) -> str:
    """passing, warning, critical, draining (maintenance: sidecar-stop, the drain plugin, the
    registrar on a stop or a pause), or held (gone from Consul, kept by the empty grace)."""
    if instance.status == MAINTENANCE:
        return "draining"
    if held and instance.status == PASSING and routed:
        return "held"
    return instance.status


def _options(options: Options) -> dict[str, Any]:
    shown = {}
    for key, value in vars(options).items():
        if key != "errors" and value not in (None, "", (), False, 0):
            shown[key] = list(value) if isinstance(value, tuple) else value
    return shown


def route_entry(route: Route, everyone: Sequence[Instance], dc: str, held: bool, warnings: list[str]) -> dict[str, Any]:
    servers = {s.instance.id: s for s in route.servers}
    listed: list[dict[str, Any]] = []
    seen: set[str] = set()
    own = [] if route.failover else list(everyone)
    for inst in [*own, *(route.instances if route.failover else ())]:
        if inst.id in seen:
            continue
        seen.add(inst.id)
        server = servers.get(inst.id)
        listed.append(
            {
                "id": inst.id,
                "address": inst.address,
                "port": inst.port,
                "node": inst.node,
                "datacenter": "failover" if route.failover else dc,
                "state": instance_state(inst, server is not None, held),
                "status": inst.status,
                "routed": server is not None,
                "server": server.name if server else "",
                "weight": server.weight if server else 0,
                "container": inst.meta.get("container_name", ""),
            }
        )
    listed.sort(key=lambda i: (not i["routed"], i["node"], i["id"]))
    return {
        "service": route.name,
        "hosts": list(route.hosts) or ["*"],
        "path": route.location,
        "http": route.http,
        "tcp_port": route.tcp_port,
        "sni_hosts": list(route.sni_hosts),
        "basic_auth_users": None if route.auth is None else len(route.auth),  # how many, never who
        "sticky": route.sticky,
        "check": route.check,
        "failover": route.failover,
        "held": held,
        "options": _options(route.options),
        "passing": len(route.servers),
        "instances": listed,
        "warnings": warnings,
    }


def fleet_entry(inst: Instance) -> dict[str, Any]:
    return {
        "node": inst.node,
        "address": inst.address or inst.node_address,
        "port": inst.port,
        "status": inst.status,
        "proxy": inst.meta.get("proxy", ""),
        "version": inst.meta.get("proxy_version", ""),
        "page": inst.meta.get("routes_page", ""),
    }


def document(
    snapshot: Snapshot | None,
    table: Table | None,
    held: Iterable[str],
    dc: str,
    fleet_service: str,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The page's JSON. extra: the proxy, the history and the problems, as they are."""
    held_set = set(held)
    by_service: dict[str, list[str]] = {}
    for text in table.warnings if table else ():
        by_service.setdefault(warning_service(text), []).append(text)
    routes = []
    routed_names = set()
    instances = snapshot.instances if snapshot else {}
    for route in table.every if table else ():
        routed_names.add(route.name)
        entry = route_entry(
            route, instances.get(route.name, ()), dc, route.name in held_set, by_service.get(route.name, [])
        )
        routes.append(entry)
    left_out = [
        {"service": name, "warnings": texts} for name, texts in sorted(by_service.items()) if name not in routed_names
    ]
    fleet = [fleet_entry(i) for i in instances.get(fleet_service, ())] if fleet_service else []
    fleet.sort(key=lambda f: (f["node"], f["address"]))
    return {
        "datacenter": dc,
        "catalog": snapshot is not None,
        "routes": routes,
        "left_out": left_out,
        "held": sorted(held_set),
        "fleet": fleet,
        **extra,
    }
