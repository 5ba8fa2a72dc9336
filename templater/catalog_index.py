"""A dc's catalog kept up to date by what changed: the pure half of the catalog source.

Three kinds of answer come in, each applied here without I/O:
- a node's services (`/v1/catalog/node-services/<n>`, one blocking query per node): which instances
  exist on that node. It names the services to read again (an instance came, moved or changed)
  and removes instances that left at once.
- the checks that are not passing (`/v1/health/state/critical` and `/v1/health/state/warning`,
  a blocking query each per dc, taken together): per instance and per node, what is wrong now. A worse status is
  believed at once; a better one (a check that left the list: passing now, or deregistered
  with its instance) only after the service is read again, so an instance being removed is
  never routed to in between.
- a service (`/v1/health/service/<name>`): its instances with their checks, the truth for that
  service as of the answer's index.

Work per answer follows what it changed: a node answer costs a walk of that node's services,
a service answer that service, a checks answer the checks that are not passing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from templater.catalog import (
    CRITICAL,
    MAINTENANCE,
    PASSING,
    Instance,
    Node,
    Row,
    Snapshot,
    aggregate,
    build_instances,
    clean_nodes,
    listing,
    node_services,
    rows_from_node,
    service_row,
    severity,
    valid_name,
)
from templater.check_book import Changed, CheckBook

Warn = Callable[[str], None]
InstanceKey = tuple[str, str]  # (node, service id)
NodeEntry = tuple[str, int]  # (service name, ModifyIndex) of one instance in a node's answer


def check_status(check: Mapping[str, Any]) -> str:
    """A check's status, with Consul's maintenance checks (critical) read as maintenance."""
    status = str(check.get("Status", CRITICAL))
    check_id = str(check.get("CheckID", ""))
    if status == CRITICAL and (check_id.startswith("_service_maintenance:") or check_id == "_node_maintenance"):
        return MAINTENANCE
    return status


def bad_statuses(checks: Iterable[Mapping[str, Any]]) -> tuple[dict[str, dict[InstanceKey, str]], dict[str, str]]:
    """Checks that are not passing, aggregated: per service, (node, id) -> status; per node. Pure."""
    services: dict[str, dict[InstanceKey, list[str]]] = {}
    nodes: dict[str, list[str]] = {}
    for check in checks:
        status = check_status(check)
        if status == PASSING:
            continue
        node = str(check.get("Node", ""))
        sid = str(check.get("ServiceID") or "")
        if sid:
            name = str(check.get("ServiceName", ""))
            services.setdefault(name, {}).setdefault((node, sid), []).append(status)
        else:
            nodes.setdefault(node, []).append(status)
    return (
        {name: {k: aggregate(v) for k, v in found.items()} for name, found in services.items()},
        {node: aggregate(v) for node, v in nodes.items()},
    )


def node_entries(data: Mapping[str, Any] | None) -> dict[str, NodeEntry]:
    """A node's answer (node_services) as service id -> (service name, ModifyIndex). Pure."""
    return {
        str(sid): (str(svc.get("Service", "")), int(svc.get("ModifyIndex") or 0)) for sid, svc in node_services(data)
    }


def health_rows(entries: Iterable[Any]) -> tuple[list[Row], dict[InstanceKey, int]]:
    """A `/v1/health/service/<name>` answer as rows (the `/v1/catalog/service` shape) and each
    instance's ModifyIndex. Pure."""
    rows: list[Row] = []
    modified: dict[InstanceKey, int] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        node = entry.get("Node") or {}
        svc = entry.get("Service") or {}
        row = service_row(
            {
                "Node": node.get("Node"),
                "Address": node.get("Address"),
                "ServiceID": svc.get("ID"),
                "ServiceName": svc.get("Service"),
                "ServiceAddress": svc.get("Address"),
                "ServicePort": svc.get("Port"),
                "ServiceTags": svc.get("Tags"),
                "ServiceMeta": svc.get("Meta"),
            }
        )
        rows.append(row)
        modified[(str(row["Node"]), str(row["ServiceID"]))] = int(svc.get("ModifyIndex") or 0)
    return rows, modified


def health_checks(entries: Iterable[Any]) -> list[Mapping[str, Any]]:
    """The service-level checks of a `/v1/health/service/<name>` answer (node checks come from
    the dc's checks watch). Pure."""
    return [
        check
        for entry in entries
        if isinstance(entry, dict)
        for check in entry.get("Checks") or []
        if isinstance(check, dict) and check.get("ServiceID")
    ]


@dataclass(frozen=True)
class ServiceRead:
    """What applying a service answer found."""

    changed: bool
    behind: frozenset[InstanceKey]  # instances the node watches show newer than this answer


class CatalogIndex:
    """One dc's instances, health and nodes; changes in, a Snapshot and changed names out."""

    def __init__(self, warn: Warn) -> None:
        self._warn = warn
        self.node_rows: dict[str, dict[str, NodeEntry]] = {}  # node -> sid -> (name, ModifyIndex)
        self._node_address: dict[str, str] = {}
        self._node_status: dict[str, str] = {}  # nodes with a check that is not passing
        self._by_name: dict[str, set[InstanceKey]] = {}  # service -> instances the node watches list
        self._bad: dict[str, dict[InstanceKey, str]] = {}  # service -> its instances not passing, applied
        self._watch_bad: dict[str, dict[InstanceKey, str]] = {}  # the same in the last checks answer
        self.checks_seq = 0  # checks answers taken
        self._read_index: dict[str, int] = {}  # service -> index of its last read taken
        self._built: dict[str, tuple[Instance, ...]] = {}  # sanitized, status from service checks
        self.instances: dict[str, tuple[Instance, ...]] = {}  # with node status: what templates see
        self.services: dict[str, tuple[str, ...]] = {}
        self.nodes: tuple[Node, ...] = ()
        self._changed: set[str] = set()
        self._nodes_moved = False
        self._listing: list[Mapping[str, Any]] | None = None
        self._book: CheckBook | None = None  # each instance's checks, while a template reads them

    # -- answers in

    def load(
        self, nodes: Mapping[str, dict[str, Any] | None], checks: Sequence[Mapping[str, Any]],
        all_checks: Sequence[Any] | None = None,
    ) -> None:  # fmt: skip
        """Everything at once (the first read, or the safety read): every node's services and
        the checks that are not passing, read after them; with all_checks (every check, read
        last), each instance's checks too."""
        if all_checks is not None:
            self._book = CheckBook(self._warn)
            self._book.load(all_checks)
        rows: dict[str, list[Row]] = {}
        for node, data in nodes.items():
            self.node_rows[node] = node_entries(data)
            self._node_address[node] = str(((data or {}).get("Node") or {}).get("Address", ""))
            for row in rows_from_node(node, data):
                rows.setdefault(str(row.get("ServiceName", "")), []).append(row)
        for node in set(self.node_rows) - set(nodes):
            del self.node_rows[node]
            self._node_address.pop(node, None)
        self._bad, self._node_status = bad_statuses(checks)
        self._watch_bad = {name: dict(found) for name, found in self._bad.items()}
        self.checks_seq += 1
        self._reindex_names()
        for name in set(self._built) | set(rows):
            self._build(name, rows.get(name, []))
        self._changed.update(self._built, self.instances, rows)

    def keep_checks(self, on: bool) -> None:
        """Start keeping each instance's checks (load_checks() completes the book), or stop."""
        if on == (self._book is not None):
            return
        self._book = CheckBook(self._warn) if on else None
        self._changed.update(self._built)

    def load_checks(self, all_checks: Sequence[Any]) -> None:
        """Every check (`/v1/health/state/any`), read after keep_checks(True)."""
        if self._book is not None:
            self._book.load(all_checks)
            self._changed.update(self._built)

    @property
    def checks_kept(self) -> bool:
        return self._book is not None and self._book.loaded

    def _checks_changed(self, changed: Changed) -> None:
        keys, nodes = changed
        for node, sid in keys:
            entry = self.node_rows.get(node, {}).get(sid)
            if entry is not None:
                self._changed.add(entry[0])
        for node in nodes:
            self._changed.update(self._names_on(node))

    def node_answer(self, node: str, data: Mapping[str, Any] | None) -> set[str]:
        """A node's services changed: instances that left go now; the services to read again."""
        new = node_entries(data)
        old = self.node_rows.get(node, {})
        address = str(((data or {}).get("Node") or {}).get("Address", ""))
        moved_node = node in self._node_address and self._node_address[node] != address
        self._node_address[node] = address
        self.node_rows[node] = new
        to_read = {name for sid, (name, mod) in new.items() if moved_node or old.get(sid) != (name, mod)}
        for sid, (name, _mod) in old.items():
            if new.get(sid, ("", 0))[0] != name:
                self._drop_instance(name, (node, sid))
        for sid, (name, _mod) in new.items():
            self._by_name.setdefault(name, set()).add((node, sid))
        return to_read

    def node_gone(self, node: str) -> None:
        """A node left the catalog: its instances go with it."""
        for sid, (name, _mod) in self.node_rows.pop(node, {}).items():
            self._drop_instance(name, (node, sid))
        self._node_address.pop(node, None)
        if self._book is not None:
            self._book.drop_node(node)
        if self._node_status.pop(node, None) is not None:
            self._changed.update(self._names_on(node))

    def checks_answer(self, checks: Sequence[Mapping[str, Any]]) -> set[str]:
        """The checks that are not passing now. A worse status is taken at once; the services
        where one got better are returned, to be read again (its instance may be going)."""
        bad, node_status = bad_statuses(checks)
        self.checks_seq += 1
        if self._book is not None:
            self._checks_changed(self._book.not_passing(checks))
        for node in set(node_status) | set(self._node_status):
            if node_status.get(node) != self._node_status.get(node):
                self._changed.update(self._names_on(node))
        self._node_status = node_status
        to_read = set()
        for name in set(bad) | set(self._watch_bad):
            if bad.get(name) != self._watch_bad.get(name):
                applied = self._bad.get(name, {})
                better, merged = took_worse(applied, bad.get(name, {}))
                if better:
                    to_read.add(name)
                if merged != applied:
                    self._set_bad(name, merged)
        self._watch_bad = bad
        return to_read

    def service_answer(self, name: str, entries: list[Any], index: int, since_seq: int) -> ServiceRead:
        """A service read, sent when checks_seq was since_seq: its instances and their checks.

        Indexes of service reads are the service's own (comparable with each other only): an
        answer older than one already taken is a lagging server's and is dropped. A checks
        answer that came in while the read was under way may be newer: its worse statuses stay."""
        if index < self._read_index.get(name, 0):
            return ServiceRead(False, frozenset())
        rows, modified = health_rows(entries)
        if self._book is not None:
            self._checks_changed(self._book.service_read(entries, index))
        listed = self._by_name.get(name, set())
        behind = frozenset(
            key
            for key in listed
            if key not in modified or modified[key] < self.node_rows.get(key[0], {}).get(key[1], ("", 0))[1]
        )
        # the node watches decide which instances exist: one they no longer list has gone
        rows = [r for r in rows if (str(r["Node"]), str(r["ServiceID"])) in listed]
        bad = bad_statuses(health_checks(entries))[0].get(name, {})
        if self.checks_seq > since_seq:
            for key, status in self._watch_bad.get(name, {}).items():
                bad[key] = _worst(status, bad.get(key))
        before = self._built.get(name)
        if bad:
            self._bad[name] = bad
        else:
            self._bad.pop(name, None)
        self._build(name, rows)
        self._read_index[name] = index
        return ServiceRead(self._built.get(name) != before, behind)

    def set_nodes(self, nodes: list[dict[str, Any]]) -> None:
        kept = clean_nodes(nodes, self._warn)
        if kept != self.nodes:
            self.nodes = kept
            self._nodes_moved = True

    def forget_read_indexes(self) -> None:
        """Consul lost its state (an index went backwards): service indexes start again too."""
        self._read_index.clear()

    # -- out

    def nodes_changed(self) -> bool:
        """Whether the node list changed since the last call."""
        moved, self._nodes_moved = self._nodes_moved, False
        return moved

    def take_changed(self) -> frozenset[str]:
        """The services whose instances or tags changed since the last call; their entries
        (and only theirs) are brought up to date first."""
        changed, self._changed = frozenset(self._changed), set()
        for name in changed:
            self._publish(name)
        return changed

    def snapshot(self, changed: frozenset[str] | None) -> Snapshot:
        # copies of the maps (a pointer per service): a render keeps its snapshot while this moves
        # on; services() is built again only when a service came, went or changed its tags
        if self._listing is None:
            self._listing = listing(self.services)
        return Snapshot(dict(self.services), dict(self.instances), self.nodes, changed, self._listing, self.checks_kept)

    # -- state

    def _names_on(self, node: str) -> set[str]:
        return {name for name, _mod in self.node_rows.get(node, {}).values()}

    def _reindex_names(self) -> None:
        self._by_name = {}
        for node, entries in self.node_rows.items():
            for sid, (name, _mod) in entries.items():
                self._by_name.setdefault(name, set()).add((node, sid))

    def _drop_instance(self, name: str, key: InstanceKey) -> None:
        listed = self._by_name.get(name)
        if listed is not None:
            listed.discard(key)
            if not listed:
                del self._by_name[name]
        if self._book is not None:
            self._book.drop_instance(key)
        built = self._built.get(name, ())
        kept = tuple(i for i in built if (i.node, i.id) != key)
        if len(kept) != len(built):
            self._built[name] = kept
        self._changed.add(name)

    def _set_bad(self, name: str, bad: dict[InstanceKey, str]) -> None:
        if bad:
            self._bad[name] = bad
        else:
            self._bad.pop(name, None)
        self._set_built(name, self._built.get(name, ()))

    def _build(self, name: str, rows: list[Row]) -> None:
        self._set_built(name, build_instances(name, rows, self._warn))

    def _set_built(self, name: str, instances: tuple[Instance, ...]) -> None:
        bad = self._bad.get(name, {})
        built = tuple(_with_status(i, bad.get((i.node, i.id), PASSING)) for i in instances)
        if built != self._built.get(name) or name not in self.services:
            self._changed.add(name)
        self._built[name] = built

    def _publish(self, name: str) -> None:
        built = self._built.get(name, ())
        if not built:
            self._built.pop(name, None)
            self.instances.pop(name, None)
        else:
            book = self._book if self.checks_kept else None
            self.instances[name] = with_health(built, self._node_status, book.of if book is not None else None)
        if name not in self._by_name:
            if self.services.pop(name, None) is not None:
                self._listing = None
            self._read_index.pop(name, None)
        elif valid_name(name):
            tags = tuple(sorted({t for i in built for t in i.tags}))
            if self.services.get(name) != tags:
                self.services[name] = tags
                self._listing = None
        elif name not in self.services:
            self._warn(f"left out service name={name!r}: not a safe name")


def with_health(
    built: tuple[Instance, ...], node_status: Mapping[str, str], checks_of: Callable[[str, str], Any] | None
) -> tuple[Instance, ...]:
    """A service's instances as templates see them: each with its node's status when worse, and
    with its checks (checks_of) while they are kept."""
    if checks_of is not None:
        return tuple(
            replace(i, status=_worst(i.status, node_status.get(i.node)), checks=checks_of(i.node, i.id)) for i in built
        )
    return tuple(_with_status(i, _worst(i.status, node_status.get(i.node))) for i in built)


def took_worse(applied: dict[InstanceKey, str], new: dict[InstanceKey, str]) -> tuple[bool, dict[InstanceKey, str]]:
    """A service's instances not passing: as applied, and as a checks answer has them now.
    Whether one got better (believed only after its service is read again), and the statuses
    with every worse one taken at once."""
    better = any(severity(new.get(key, PASSING)) < severity(status) for key, status in applied.items())
    merged = dict(applied)
    for key, status in new.items():
        merged[key] = _worst(status, applied.get(key))
    return better, merged


def _worst(status: str, node_status: str | None) -> str:
    if node_status is None or severity(status) >= severity(node_status):
        return status
    return node_status


def _with_status(instance: Instance, status: str) -> Instance:
    return instance if instance.status == status else replace(instance, status=status)
