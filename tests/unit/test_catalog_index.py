"""The incremental catalog index: answers in, the same catalog out as a rebuild from scratch.

A small in-memory Consul (`World`) produces the answers a real one gives: a node's services,
the checks that are not passing, a service with its checks, each with raft indexes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from templater.catalog import node_services, rows_from_node
from templater.catalog_index import CatalogIndex, bad_statuses, check_status, node_entries


@dataclass
class World:
    """Instances (node, sid) -> (service, port, check status or None), raft-indexed."""

    instances: dict[tuple[str, str], tuple[str, int, str | None]] = field(default_factory=dict)
    modified: dict[tuple[str, str], int] = field(default_factory=dict)
    node_checks: dict[str, str] = field(default_factory=dict)  # node -> serfHealth status
    index: int = 10

    def write(self, key: tuple[str, str], value: tuple[str, int, str | None] | None) -> None:
        self.index += 1
        if value is None:
            self.instances.pop(key, None)
            self.modified.pop(key, None)
        else:
            old = self.instances.get(key)
            self.instances[key] = value
            if old is None or old[:2] != value[:2]:
                self.modified[key] = self.index  # the service entry itself changed

    def entry(self, node: str, sid: str) -> dict[str, Any]:
        """One instance as Consul lists it (a node's services, a service's health)."""
        name, port, _status = self.instances[(node, sid)]
        tags, modified = [name[:1]], self.modified[(node, sid)]
        return {
            "ID": sid,
            "Service": name,
            "Port": port,
            "Address": "",
            "Tags": tags,
            "Meta": {},
            "ModifyIndex": modified,
        }

    def node(self, node: str) -> dict[str, Any]:
        """`/v1/catalog/node-services/<node>`, what the templater reads."""
        services = [self.entry(n, sid) for (n, sid) in self.instances if n == node]
        return {"Node": {"Node": node, "Address": "10.0.0.1"}, "Services": services}

    def nodes(self) -> dict[str, Any]:
        names = {n for n, _ in self.instances} | set(self.node_checks) | {"n1", "n2", "n3"}
        return {n: self.node(n) for n in sorted(names)}

    def checks(self) -> list[dict[str, Any]]:
        """`/v1/health/state/critical` and `/v1/health/state/warning`, together."""
        found = [
            {"Node": n, "CheckID": f"service:{sid}", "ServiceID": sid, "ServiceName": name, "Status": status}
            for (n, sid), (name, _p, status) in self.instances.items()
            if status not in (None, "passing")
        ]
        found += [
            {"Node": n, "CheckID": "serfHealth", "ServiceID": "", "Status": s} for n, s in self.node_checks.items()
        ]
        return [c for c in found if c["Status"] != "passing"]

    def service(self, name: str) -> list[dict[str, Any]]:
        """`/v1/health/service/<name>`."""
        return [
            {
                "Node": {"Node": n, "Address": "10.0.0.1"},
                "Service": self.entry(n, sid),
                "Checks": [
                    {"Node": n, "CheckID": f"service:{sid}", "ServiceID": sid, "ServiceName": name, "Status": status}
                ]
                if status
                else [],
            }
            for (n, sid), (svc, port, status) in sorted(self.instances.items())
            if svc == name
        ]


def catch_up(index: CatalogIndex, world: World, node: str | None) -> None:
    """Deliver what the watches would: the changed node's answer, the checks, then the reads."""
    to_read = index.node_answer(node, world.node(node)) if node else set()
    to_read |= index.checks_answer(world.checks())
    for name in sorted(to_read):
        index.service_answer(name, world.service(name), world.index, index.checks_seq)
    index.take_changed()


def fresh(world: World) -> CatalogIndex:
    rebuilt = CatalogIndex(lambda _m: None)
    rebuilt.load(world.nodes(), world.checks())
    rebuilt.take_changed()
    return rebuilt


NODES = st.sampled_from(["n1", "n2", "n3"])
SIDS = st.sampled_from(["a", "b", "c", "d"])
STATUS = st.sampled_from([None, "passing", "warning", "critical"])
OPS = st.one_of(
    st.tuples(st.just("put"), NODES, SIDS, st.sampled_from(["web", "api", "db"]), st.integers(1, 3), STATUS),
    st.tuples(st.just("del"), NODES, SIDS),
    st.tuples(st.just("node"), NODES, st.sampled_from(["passing", "critical"])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=30))
def test_incremental_index_equals_a_rebuild_after_any_sequence_of_changes(ops):
    world = World()
    index = fresh(world)
    for op in ops:
        if op[0] == "put":
            _, node, sid, name, port, status = op
            world.write((node, sid), (name, port, status))
        elif op[0] == "del":
            _, node, sid = op
            world.write((node, sid), None)
        else:
            _, node, status = op
            world.index += 1
            world.node_checks[node] = status
            node = None  # a node check moves no node's service list
        catch_up(index, world, node)
        rebuilt = fresh(world)
        assert index.instances == rebuilt.instances
        assert index.services == rebuilt.services


def test_a_worse_status_is_believed_at_once_a_better_one_after_a_read():
    world = World()
    world.write(("n1", "a"), ("web", 1, "passing"))
    index = fresh(world)
    world.write(("n1", "a"), ("web", 1, "critical"))
    assert index.checks_answer(world.checks()) == set()  # no read needed to believe it
    index.take_changed()
    assert index.instances["web"][0].status == "critical"
    # the check leaves the list: passing now, or deregistered with its instance; until the
    # service is read, the instance stays critical and is never routed to
    world.write(("n1", "a"), None)
    assert index.checks_answer(world.checks()) == {"web"}
    index.take_changed()
    assert index.instances["web"][0].status == "critical"
    index.service_answer("web", world.service("web"), world.index, index.checks_seq)
    index.take_changed()
    assert "web" not in index.instances


def test_a_read_from_a_lagging_server_is_behind_and_an_older_one_is_dropped():
    world = World()
    world.write(("n1", "a"), ("web", 1, "passing"))
    index = fresh(world)
    old_answer = world.service("web")
    world.write(("n1", "b"), ("web", 2, "passing"))
    assert index.node_answer("n1", world.node("n1")) == {"web"}
    read = index.service_answer("web", old_answer, world.index - 1, index.checks_seq)
    assert read.behind == {("n1", "b")}  # the node watch shows it, the read does not yet
    index.take_changed()
    assert [i.id for i in index.instances["web"]] == ["a"]
    assert index.service_answer("web", world.service("web"), world.index, index.checks_seq).behind == frozenset()
    assert index.service_answer("web", old_answer, world.index - 1, index.checks_seq).changed is False
    index.take_changed()
    assert [i.id for i in index.instances["web"]] == ["a", "b"]


def test_a_change_touches_only_its_service():
    world = World()
    for n in range(50):
        world.write(("n1", f"s{n}"), (f"svc{n}", 1, "passing"))
    index = fresh(world)
    world.write(("n2", "x"), ("svc7", 2, None))
    catch_up_changed = index.node_answer("n2", world.node("n2"))
    assert catch_up_changed == {"svc7"}
    index.service_answer("svc7", world.service("svc7"), world.index, index.checks_seq)
    assert index.take_changed() == {"svc7"}
    snapshot = index.snapshot(frozenset({"svc7"}))
    assert snapshot.changed == {"svc7"} and len(snapshot.instances["svc7"]) == 2


def test_node_status_applies_to_its_instances_and_maintenance_reads_as_such():
    world = World()
    world.write(("n1", "a"), ("web", 1, "passing"))
    world.write(("n2", "b"), ("web", 2, "passing"))
    index = fresh(world)
    world.node_checks["n2"] = "critical"
    index.checks_answer(world.checks())
    assert index.take_changed() == {"web"}
    assert [(i.id, i.status) for i in index.instances["web"]] == [("a", "passing"), ("b", "critical")]
    maint = {
        "Node": "n1",
        "CheckID": "_service_maintenance:a",
        "ServiceID": "a",
        "ServiceName": "web",
        "Status": "critical",
    }
    assert check_status(maint) == "maintenance"
    assert bad_statuses([maint])[0] == {"web": {("n1", "a"): "maintenance"}}


def test_unsafe_values_are_left_out_with_a_warning_the_rest_is_kept():
    warnings: list[str] = []
    index = CatalogIndex(warnings.append)
    node = {
        "Node": {"Node": "n1", "Address": "10.0.0.1"},
        "Services": {
            "w1": {
                "Service": "web",
                "Port": 80,
                "Address": "",
                "Tags": ["v1", "bad\ntag", "urlprefix-/api strip=/api"],
                "Meta": {"x": "a\u2028b", "description": "the billing API, v2", "rule": "Host(`a.test`)"},
            },
            "w2": {"Service": "web", "Port": 0, "Address": "", "Tags": [], "Meta": {}},
            "e1": {"Service": "evil\nname", "Port": 81, "Address": "", "Tags": [], "Meta": {}},
        },
    }
    index.load({"n1": node}, [])
    index.take_changed()
    # text as Consul holds it reaches templates; a line break or control character never does
    assert list(index.services) == ["web"] and index.services["web"] == ("urlprefix-/api strip=/api", "v1")
    [w1] = index.instances["web"]
    assert dict(w1.meta) == {"description": "the billing API, v2", "rule": "Host(`a.test`)"}
    assert [i.id for i in index.instances["web"]] == ["w1"]
    assert any("'bad\\ntag'" in w and "line break" in w for w in warnings) and any("port=0" in w for w in warnings)
    assert any("evil" in w for w in warnings) and any("'a\\u2028b'" in w for w in warnings)


def test_both_shapes_of_a_nodes_services_give_the_same_rows():
    """`/v1/catalog/node-services/<n>` lists a node's services, `/v1/catalog/node/<n>` maps them
    by id: the same rows and entries either way, and a node Consul does not know is empty."""
    world = World()
    world.write(("n1", "web-1"), ("web", 80, None))
    world.write(("n1", "api-1"), ("api", 81, "critical"))
    listed = world.node("n1")
    mapped = {"Node": listed["Node"], "Services": {svc["ID"]: svc for svc in listed["Services"]}}
    assert rows_from_node("n1", listed) == rows_from_node("n1", mapped)
    assert [r["ServiceID"] for r in rows_from_node("n1", listed)] == ["web-1", "api-1"]
    assert node_entries(listed) == node_entries(mapped) == {"web-1": ("web", 11), "api-1": ("api", 12)}
    assert rows_from_node("gone", {"Node": None, "Services": None}) == [] == list(node_services(None))
