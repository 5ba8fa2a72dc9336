"""Pure templater logic: index rules, grace, snapshot building, rendering, flags."""

from __future__ import annotations

import pytest

from templater.catalog import (
    Grace,
    Instance,
    Snapshot,
    aggregate,
    build_instances,
    changed_services,
    clean_nodes,
    clean_services,
    group_rows,
    health_index,
    instances_with_health,
    rows_from_node,
    summarize,
)
from templater.errors import TemplateError
from templater.render import by_meta, by_tag, compile_template, group_by, make_environment, render
from templater.settings import SettingsError, parse_template, parse_wait
from templater.watch import next_index


def test_next_index_rules():
    assert next_index(0, 0) == 1  # never below 1
    assert next_index(5, 9) == 9
    assert next_index(9, 5) == 0  # went backwards: reset
    assert next_index(9, 9) == 9


def inst(sid: str, port: int = 80) -> Instance:
    return Instance(sid, "web", "127.0.0.1", port, "n1", "127.0.0.1")


def test_grace_holds_an_emptied_set_then_believes_it():
    grace = Grace(10)
    before = Snapshot(services={"web": ()}, instances={"web": (inst("a"),)})
    empty = Snapshot(services={}, instances={})
    shown, deadline = grace.apply(before, empty, now=100.0)
    assert shown.instances["web"] == (inst("a"),) and "web" in shown.services
    assert deadline == 110.0
    shown2, _ = grace.apply(shown, empty, now=105.0)
    assert shown2.instances["web"] == (inst("a"),)
    shown3, deadline3 = grace.apply(shown2, empty, now=110.5)
    assert "web" not in shown3.instances and deadline3 is None
    # a partial drop is believed at once; a set coming back ends the hold
    partial = Snapshot(services={"web": ()}, instances={"web": (inst("b"),)})
    assert grace.apply(before, partial, now=1.0)[0].instances["web"] == (inst("b"),)


def test_catalog_joins_health_and_sanitizes():
    warnings: list[str] = []
    services = {"web": ["v1", "bad tag"], "evil\nname": []}
    node = {
        "n1": {
            "Node": {"Address": "10.0.0.1"},
            "Services": {
                "w1": {"Service": "web", "Port": 80, "Address": "", "Tags": ["v1"], "Meta": {"http_host": "a.com"}},
                "w2": {"Service": "web", "Port": 81, "Address": "10.0.0.2;drop", "Tags": [], "Meta": {}},
                "w3": {"Service": "web", "Port": 82, "Address": "10.0.0.3", "Tags": [], "Meta": {"x": "a b"}},
            },
        }
    }
    checks = [
        {"Node": "n1", "CheckID": "serfHealth", "ServiceID": "", "Status": "passing"},
        {"Node": "n1", "CheckID": "service:w3", "ServiceID": "w3", "Status": "critical"},
        {"Node": "n1", "CheckID": "_service_maintenance:w1", "ServiceID": "w1", "Status": "critical"},
    ]
    rows = group_rows(rows_from_node("n1", node["n1"]))
    nodes = [{"Node": "n1", "Address": "10.0.0.1"}, {"Node": "bad node", "Address": "10.0.0.9"}]
    kept = clean_services(services, warnings.append)
    built = {name: build_instances(name, rows.get(name, []), warnings.append) for name in kept}
    instances = instances_with_health(kept, built, health_index(checks))
    assert list(kept) == ["web"] and kept["web"] == ("v1",)
    assert [n.name for n in clean_nodes(nodes, warnings.append)] == ["n1"] and any("bad node" in w for w in warnings)
    by_id = {i.id: i for i in instances["web"]}
    assert set(by_id) == {"w1", "w3"}
    assert by_id["w1"].address == "10.0.0.1" and by_id["w1"].status == "maintenance"
    assert by_id["w3"].status == "critical" and by_id["w3"].meta == {}
    assert any("w2" in w for w in warnings) and any("evil" in w for w in warnings)
    assert aggregate(["passing", "warning"]) == "warning"


def test_changed_services_from_the_summary_and_the_tags():
    old = summarize([{"Name": "web", "InstanceCount": 2}, {"Name": "api", "InstanceCount": 1}])
    new = summarize([{"Name": "web", "InstanceCount": 3}, {"Name": "api", "InstanceCount": 1}])
    assert changed_services(old, new, {"web": [], "api": []}, {"web": [], "api": []}) == {"web"}
    # tags moved with the same counts; a service gone; a new one
    assert changed_services(old, old, {"web": [], "api": []}, {"web": ["v2"], "api": []}) == {"web"}
    assert changed_services(old, summarize([new["web"]]), {"web": [], "api": []}, {"web": []}) == {"web", "api"}
    assert changed_services({}, {}, {}, {"db": []}) == {"db"}
    assert changed_services(old, old, {"web": []}, {"web": []}) == set()


class View:
    def __init__(self, snap: Snapshot | None) -> None:
        self.snap = snap

    def catalog(self, dc: str) -> Snapshot | None:
        return self.snap

    def kv(self, key: str):
        return [{"Key": "cfg/a", "Value": "aGk="}] if key == "kv.key(cfg/a)" else None


def test_render_records_deps_missing_and_filters():
    env = make_environment()
    snap = Snapshot(
        services={"web": ()},
        instances={"web": (inst("a"), Instance("b", "web", "127.0.0.1", 81, "n1", "127.0.0.1", status="critical"))},
    )
    t = compile_template(
        env, "t.j2", "{{ service('web')|length }} {{ service('web', state='any')|length }} {{ key('cfg/a') }}"
    )
    result = render(t, "t.j2", View(snap), {}, {})
    assert result.text == "1 2 hi" and result.complete
    assert result.used == {"catalog(local)", "kv.key(cfg/a)"}
    pending = render(t, "t.j2", View(None), {}, {})
    assert not pending.complete and "catalog(local)" in pending.missing


def test_render_errors_name_template_and_line():
    env = make_environment()
    with pytest.raises(TemplateError, match=r"t\.j2:3"):
        render(compile_template(env, "t.j2", "a\nb\n{{ nope }}\n"), "t.j2", View(Snapshot()), {}, {})
    with pytest.raises(TemplateError, match=r"t\.j2:2: syntax error"):
        compile_template(env, "t.j2", "a\n{% if %}\n")
    with pytest.raises(TemplateError, match=r"SecurityError|unsafe"):
        render(compile_template(env, "t.j2", "{{ ''.__class__.__mro__ }}"), "t.j2", View(Snapshot()), {}, {})


def test_filters():
    a = {"tags": ["x"], "meta": {"http_host": "a.com"}}
    b = {"tags": [], "meta": {"http_host": "b.com"}}
    assert by_tag([a, b], "x") == [a]
    assert by_meta([a, b], "http_host", "b.com") == [b]
    assert group_by([a, b], "meta.http_host") == {"a.com": [a], "b.com": [b]}


def test_flag_parsing():
    spec = parse_template("in.j2:/etc/out.cfg:systemctl reload x:y")
    assert spec.command == "systemctl reload x:y" and str(spec.dest) == "/etc/out.cfg"
    assert parse_wait("2s") == (2, 8) and parse_wait("100ms:1s") == (0.1, 1)
    with pytest.raises(SettingsError):
        parse_template("only-source")
    with pytest.raises(SettingsError):
        parse_wait("5s:1s")
