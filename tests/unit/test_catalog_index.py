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
    check_modified: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, check id) -> index
    index: int = 10

    def write(self, key: tuple[str, str], value: tuple[str, int, str | None] | None) -> None:
        self.index += 1
        if value is None:
            self.instances.pop(key, None)
            self.modified.pop(key, None)
        else:
            old = self.instances.get(key)
            self.instances[key] = value
            # the service entry itself changed; a check comes and goes with its service's
            # registration (as the registrar registers them)
            if old is None or old[:2] != value[:2] or (old[2] is None) != (value[2] is None):
                self.modified[key] = self.index
            if old is None or old[2] != value[2]:
                self.check_modified[(key[0], f"service:{key[1]}")] = self.index

    def set_node_check(self, node: str, status: str) -> None:
        self.index += 1
        self.node_checks[node] = status
        self.check_modified[(node, "serfHealth")] = self.index

    def service_check(self, node: str, sid: str) -> dict[str, Any]:
        name, _port, status = self.instances[(node, sid)]
        check_id = f"service:{sid}"
        return {"Node": node, "CheckID": check_id, "Name": f"{name} check", "ServiceID": sid, "ServiceName": name,
                "Status": status, "ModifyIndex": self.check_modified.get((node, check_id), 0)}  # fmt: skip

    def node_check(self, node: str) -> dict[str, Any]:
        return {"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "ServiceID": "",
                "Status": self.node_checks[node],
                "ModifyIndex": self.check_modified.get((node, "serfHealth"), 0)}  # fmt: skip

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

    def all_checks(self) -> list[dict[str, Any]]:
        """`/v1/health/state/any`."""
        found = [self.service_check(n, sid) for (n, sid), (_s, _p, status) in self.instances.items() if status]
        return found + [self.node_check(n) for n in self.node_checks]

    def checks(self) -> list[dict[str, Any]]:
        """`/v1/health/state/critical` and `/v1/health/state/warning`, together."""
        return [c for c in self.all_checks() if c["Status"] != "passing"]

    def service(self, name: str) -> list[dict[str, Any]]:
        """`/v1/health/service/<name>`."""
        return [
            {
                "Node": {"Node": n, "Address": "10.0.0.1"},
                "Service": self.entry(n, sid),
                "Checks": ([self.node_check(n)] if n in self.node_checks else [])
                + ([self.service_check(n, sid)] if status else []),
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


def fresh(world: World, with_checks: bool = False) -> CatalogIndex:
    rebuilt = CatalogIndex(lambda _m: None)
    rebuilt.load(world.nodes(), world.checks(), world.all_checks() if with_checks else None)
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
@given(st.lists(OPS, max_size=30), st.booleans())
def test_incremental_index_equals_a_rebuild_after_any_sequence_of_changes(ops, with_checks):
    """With with_checks, each instance's checks (`.Checks`) are kept too, and equal too."""
    world = World()
    if with_checks:
        for node in ("n1", "n2", "n3"):
            world.set_node_check(node, "passing")
    index = fresh(world, with_checks)
    for op in ops:
        if op[0] == "put":
            _, node, sid, name, port, status = op
            world.write((node, sid), (name, port, status))
        elif op[0] == "del":
            _, node, sid = op
            world.write((node, sid), None)
        else:
            _, node, status = op
            world.set_node_check(node, status)
            node = None  # a node check moves no node's service list
        catch_up(index, world, node)
        rebuilt = fresh(world, with_checks)
        assert index.instances == rebuilt.instances
        # every instance's node has its serfHealth check: each lists it (and its own, if any)
        assert all(bool(i.checks) == with_checks for found in index.instances.values() for i in found)
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


def test_each_instances_checks_follow_the_newest_report_of_each():
    world = World()
    world.set_node_check("n1", "passing")
    world.write(("n1", "a"), ("web", 1, "passing"))
    index = fresh(world, with_checks=True)
    index.take_changed()
    [a] = index.instances["web"]
    assert [(c.check_id, c.status, c.name) for c in a.checks] == [
        ("serfHealth", "passing", "Serf Health Status"),  # the node's first, as Consul lists them
        ("service:a", "passing", "web check"),
    ]
    sent_before, seq_before, index_before = world.service("web"), index.checks_seq, world.index
    world.write(("n1", "a"), ("web", 1, "critical"))
    index.checks_answer(world.checks())
    index.take_changed()
    assert index.instances["web"][0].checks[1].status == "critical"
    # a read sent before the check failed answers after it: the newer report stays
    index.service_answer("web", sent_before, index_before, seq_before)
    index.take_changed()
    assert [c.status for c in index.instances["web"][0].checks] == ["passing", "critical"]
    # passing again: believed with the service's read, as the instance's status is
    world.write(("n1", "a"), ("web", 1, "passing"))
    assert index.checks_answer(world.checks()) == {"web"}
    index.service_answer("web", world.service("web"), world.index, index.checks_seq)
    index.take_changed()
    assert [c.status for c in index.instances["web"][0].checks] == ["passing", "passing"]
    # a node check that leaves the lists is passing at once (no service read names it)
    world.set_node_check("n1", "critical")
    index.checks_answer(world.checks())
    index.take_changed()
    assert index.instances["web"][0].checks[0].status == "critical"
    world.set_node_check("n1", "passing")
    index.checks_answer(world.checks())
    assert index.take_changed() == {"web"}
    assert index.instances["web"][0].checks[0].status == "passing"
    # no longer kept: instances carry none, and the snapshot says so
    index.keep_checks(False)
    index.take_changed()
    assert index.instances["web"][0].checks == () and not index.snapshot(None).checks


def test_kept_checks_are_text_on_one_line():
    warnings: list[str] = []
    index = CatalogIndex(warnings.append)
    node = {"Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Services": [{"ID": "a", "Service": "web", "Port": 80, "Address": "", "Tags": [], "Meta": {}}]}  # fmt: skip
    checks = [
        {"Node": "n1", "CheckID": "service:a", "ServiceID": "a", "ServiceName": "web", "Status": "passing",
         "Name": "web\nbackend", "Output": "HTTP GET: 200 OK\r\nbody\x00" + "x" * 5000},
        {"Node": "n1", "CheckID": "bad\nid", "ServiceID": "a", "ServiceName": "web", "Status": "passing"},
    ]  # fmt: skip
    index.load({"n1": node}, [], checks)
    index.take_changed()
    [check] = index.instances["web"][0].checks
    assert check.name == "web backend" and check.output.startswith("HTTP GET: 200 OK  body ")
    assert len(check.output) == 4096
    assert any("'bad\\nid'" in w for w in warnings)
