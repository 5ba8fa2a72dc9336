"""Each instance's health checks, one by one, for templates that read them (consul-template's
`.Checks`): the pure bookkeeping CatalogIndex keeps only while such a template runs.

Without it the catalog keeps an instance's aggregated status alone, from the two watches of the
checks that are not passing: a passing check is never read. With it, these feed the book:
- `/v1/health/state/any`, read once when the book is opened (and at the safety read): every check;
- the watches of the checks that are not passing: a report newer than the one kept (by its
  ModifyIndex) is taken at once; a node check that left both lists is passing now;
- a service's read (`/v1/health/service/<name>`): its instances' checks as it lists them. A
  service check that got better is believed only then, as its status is.
A passing check registered or deregistered with no other change to its instance shows at the
next read of its service, or at the safety read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from templater.catalog import PASSING, Check, clean_check

InstanceKey = tuple[str, str]  # (node, service id)
Changed = tuple[set[InstanceKey], set[str]]  # the instances and the nodes whose checks changed


class CheckBook:
    def __init__(self, warn: Callable[[str], None]) -> None:
        self._warn = warn
        self.loaded = False  # every check read once: until then templates wait for the book
        self._service: dict[InstanceKey, dict[str, Check]] = {}
        self._node: dict[str, dict[str, Check]] = {}
        self._bad_nodes: set[tuple[str, str]] = set()  # node checks the watches list as not passing

    def _clean(self, raw: Iterable[Any]) -> list[Check]:
        return [c for c in (clean_check(r, self._warn) for r in raw if isinstance(r, Mapping)) if c is not None]

    def _kept(self, check: Check) -> Check | None:
        if check.service_id:
            return self._service.get((check.node, check.service_id), {}).get(check.check_id)
        return self._node.get(check.node, {}).get(check.check_id)

    def _put(self, check: Check, changed: Changed | None = None) -> None:
        """check, unless the kept report of it is newer; changed gets what it changed."""
        kept = self._kept(check)
        if kept is not None and kept.modify_index > check.modify_index:
            return
        if check.service_id:
            self._service.setdefault((check.node, check.service_id), {})[check.check_id] = check
            if changed is not None and kept != check:
                changed[0].add((check.node, check.service_id))
        else:
            self._node.setdefault(check.node, {})[check.check_id] = check
            if changed is not None and kept != check:
                changed[1].add(check.node)

    def load(self, raw: Iterable[Any]) -> None:
        """Every check (`/v1/health/state/any`). Reports taken since the book opened stay where
        they are newer: they came in while this answer was on its way."""
        for check in self._clean(raw):
            self._put(check)
        self._bad_nodes = {(c.node, c.check_id) for n in self._node.values() for c in n.values() if c.status != PASSING}
        self.loaded = True

    def not_passing(self, raw: Iterable[Any]) -> Changed:
        """The checks that are not passing now, both watches' answers together."""
        changed: Changed = (set(), set())
        bad_nodes = set()
        for check in self._clean(raw):
            self._put(check, changed)
            if not check.service_id:
                bad_nodes.add((check.node, check.check_id))
        for node, check_id in self._bad_nodes - bad_nodes:
            kept = self._node.get(node, {}).get(check_id)
            if kept is not None and kept.status != PASSING:
                self._node[node][check_id] = replace(kept, status=PASSING, output="")
                changed[1].add(node)
        self._bad_nodes = bad_nodes
        return changed

    def service_read(self, entries: Iterable[Any], index: int) -> Changed:
        """A service's health answer as of index: the checks of each instance it lists; a kept
        check it lacks is gone, unless reported after index. Its nodes' checks where newer."""
        changed: Changed = (set(), set())
        listed: dict[InstanceKey, dict[str, Check]] = {}
        for entry in entries:
            if not isinstance(entry, Mapping):
                continue
            node, svc = entry.get("Node") or {}, entry.get("Service") or {}
            if isinstance(node, Mapping) and isinstance(svc, Mapping):
                listed.setdefault((str(node.get("Node", "")), str(svc.get("ID", ""))), {})
            for check in self._clean(entry.get("Checks") or []):
                if check.service_id:
                    listed.setdefault((check.node, check.service_id), {})[check.check_id] = check
                else:
                    self._put(check, changed)
        for key, fresh in listed.items():
            kept = self._service.get(key, {})
            for check_id, check in kept.items():
                answered = fresh.get(check_id)
                newest = index if answered is None else answered.modify_index
                if check.modify_index > newest:
                    fresh[check_id] = check
            if fresh != kept:
                changed[0].add(key)
            self._service[key] = fresh
        return changed

    def drop_instance(self, key: InstanceKey) -> None:
        self._service.pop(key, None)

    def drop_node(self, node: str) -> None:
        self._node.pop(node, None)
        self._bad_nodes = {k for k in self._bad_nodes if k[0] != node}

    def of(self, node: str, service_id: str) -> tuple[Check, ...]:
        """An instance's checks as Consul's health answer lists them: its node's, then its own."""
        node_checks = self._node.get(node, {})
        own = self._service.get((node, service_id), {})
        return (*(node_checks[k] for k in sorted(node_checks)), *(own[k] for k in sorted(own)))
