"""External DNS planning: pure, no server."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from templater.catalog import CRITICAL, MAINTENANCE, PASSING, Instance, Snapshot
from templater.dns_records import Naming, applied, check_template, desired, name_problem, plan, valid_domain

NAMING = Naming("example.test.", "prod")
OWNER = NAMING.owner_txt


def inst(name: str, iid: str, address: str, port: int = 80, status: str = PASSING, **meta: str) -> Instance:
    return Instance(iid, name, address, port, "node-" + iid, "127.0.0.1", meta=MappingProxyType(meta), status=status)


def snap(*instances: Instance) -> Snapshot:
    out = Snapshot()
    for i in instances:
        out.instances[i.name] = (*out.instances.get(i.name, ()), i)
        out.services[i.name] = ()
    return out


def test_routed_service_gets_the_passing_proxies_addresses():
    s = snap(
        inst("ingress", "a", "127.0.2.1"),
        inst("ingress", "b", "127.0.2.2", status=CRITICAL),
        inst("ingress", "c", "::1"),
        inst("ingress", "d", "lb.example.test"),  # a host name: no address record
        inst("web", "w1", "10.0.0.5", http_host="web.example.test"),
        inst("worker", "k1", "10.0.0.6"),  # not routed
    )
    want = desired(s, NAMING)
    assert want.names == {
        "web.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "AAAA": frozenset({"::1"}), "TXT": frozenset({OWNER})}
    }
    assert want.warnings == [
        "dns: ingress instance d on node-d: address 'lb.example.test' is not an IP address: left out"
    ]


def test_no_passing_proxy_keeps_the_name_without_addresses():
    want = desired(snap(inst("ingress", "a", "127.0.2.1", status=MAINTENANCE),
                        inst("web", "w1", "10.0.0.5", http_host="h")), NAMING)  # fmt: skip
    assert want.names == {"web.prod.example.test.": {"TXT": frozenset({OWNER})}}


def test_bad_names_and_contested_names_are_left_out_with_a_warning():
    naming = Naming("example.test.", "prod", template="{service}.{zone}")  # not under the suffix
    want = desired(snap(inst("web", "w", "1.2.3.4", http_host="h")), naming)
    assert want.names == {} and "not under prod.example.test." in want.warnings[0]
    s = snap(inst("Web_1", "w", "1.2.3.4", http_host="h"), inst("db", "d", "1.2.3.5", http_host="h", dns_name="db"))
    want = desired(s, NAMING)
    assert any("Web_1" in w and "not a DNS label" in w for w in want.warnings)
    assert any("db.prod.example.test. is already another service's" in w for w in want.warnings)
    assert list(want.names) == ["db.prod.example.test."]


def test_dns_name_publishes_passing_instances_with_srv_and_unique_labels():
    s = snap(
        inst("db", "1", "127.0.3.1", 5432, container_name="pg"),
        inst("db", "2", "127.0.3.2", 5433, container_name="pg"),  # same name on another host
        inst("db", "3", "127.0.3.3", 5434, status=CRITICAL, container_name="pg-3"),
        *(inst("db", str(n), "127.0.3.9", 1, dns_name="pg") for n in [9]),
    )
    want = desired(s, NAMING).names
    base = want["pg.prod.example.test."]
    assert base["A"] == frozenset({"127.0.3.1", "127.0.3.2", "127.0.3.9"})
    targets = sorted(r.split()[3] for r in base["SRV"])
    assert len(targets) == len(set(targets)) == 3
    assert all(t.endswith(".pg.prod.example.test.") and t in want for t in targets)
    assert not any("127.0.3.3" in str(v) for v in want.values())


def test_plan_creates_restores_removes_and_never_touches_foreign_names():
    want = {
        "new.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "mine.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "taken.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "same.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
    }
    zone = {
        "prod.example.test.": {"TXT": frozenset({OWNER})},  # the suffix itself: never ours
        "mine.prod.example.test.": {
            "A": frozenset({"127.0.9.7"}),
            "SRV": frozenset({"1 1 1 x."}),
            "TXT": frozenset({OWNER, '"note"'}),
        },
        "taken.prod.example.test.": {"A": frozenset({"127.0.9.9"})},
        "same.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "gone.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "theirs.prod.example.test.": {"A": frozenset({"127.0.9.1"}), "TXT": frozenset({'"owner=x"'})},
        "gone.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},  # outside the suffix
    }
    result = plan(want, zone, NAMING)
    by_name = {c.name: c for c in result.changes}
    assert sorted(by_name) == ["gone.prod.example.test.", "mine.prod.example.test.", "new.prod.example.test."]
    assert by_name["new.prod.example.test."].create and by_name["new.prod.example.test."].put == {
        "A": frozenset({"127.0.2.1"})
    }
    mine = by_name["mine.prod.example.test."]
    assert not mine.create and mine.put == {"A": frozenset({"127.0.2.1"})} and mine.drop == ("SRV",)
    gone = by_name["gone.prod.example.test."]
    assert gone.drop == ("A",) and gone.drop_owner
    assert result.foreign == ["taken.prod.example.test."]
    assert result.summary() == (
        "1 created, 1 changed, 1 removed (mine.prod.example.test., new.prod.example.test., gone.prod.example.test.)"
    )
    assert mine.text() == "change mine.prod.example.test. A=127.0.2.1 -SRV"
    assert gone.text() == "remove gone.prod.example.test."
    assert not plan({}, {"x.example.test.": {"TXT": frozenset({OWNER})}}, NAMING)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a.prod.example.test.", None),
        ("prod.example.test.", "not under"),
        ("a.b.example.test.", "not under"),
        ("-a.prod.example.test.", "not a DNS label"),
        ("a" * 64 + ".prod.example.test.", "not a DNS label"),
        ("a..prod.example.test.", "not a DNS label"),
        ("a\n.prod.example.test.", "not a DNS label"),
        ("a b.prod.example.test.", "not a DNS label"),
    ],
)
def test_name_problems(name, problem):
    found = name_problem(name, "prod.example.test.")
    assert (found is None) if problem is None else (problem in str(found))


def test_template_and_domain_checks():
    check_template("{service}-{dc}.{environment}.{zone}")
    for bad in ("{nope}.{zone}", "{service.__class__}", "{service!r}", "{service:>99}", "{0}"):
        with pytest.raises(ValueError, match="is not one of the fields"):
            check_template(bad)
    assert valid_domain("example.test.") and not valid_domain(".") and not valid_domain("ex_ample.test.")


def test_applied_changes_make_the_zone_the_plan_wanted():
    want = {
        "new.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "mine.prod.example.test.": {"AAAA": frozenset({"::1"}), "TXT": frozenset({OWNER})},
    }
    zone = {
        "mine.prod.example.test.": {"A": frozenset({"127.0.9.7"}), "TXT": frozenset({OWNER, '"note"'})},
        "gone.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "kept.prod.example.test.": {"MX": frozenset({"10 mx."}), "TXT": frozenset({OWNER})},
    }
    after = applied(zone, plan(want, zone, NAMING).changes, NAMING)
    assert after == {
        "new.prod.example.test.": {"A": frozenset({"127.0.2.1"}), "TXT": frozenset({OWNER})},
        "mine.prod.example.test.": {"AAAA": frozenset({"::1"}), "TXT": frozenset({OWNER, '"note"'})},
        "kept.prod.example.test.": {"MX": frozenset({"10 mx."})},  # ours no more; the MX was never ours
    }
    assert not plan(want, after, NAMING)
