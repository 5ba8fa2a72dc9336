"""Pure templater logic: index rules, grace, snapshot building, rendering, flags."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest

from templater.catalog import (
    Grace,
    Instance,
    Snapshot,
    aggregate,
    build_instances,
    clean_nodes,
    valid_address,
    valid_hostname,
    valid_name,
)
from templater.catalog_index import CatalogIndex
from templater.deps import KV as KVDep
from templater.deps import Catalog
from templater.errors import TemplateError
from templater.render import (
    by_meta,
    by_tag,
    compile_template,
    group_by,
    haproxy_quote,
    ident,
    make_environment,
    nginx_quote,
    render,
    server_names,
)
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
    node = {
        "n1": {
            "Node": {"Address": "10.0.0.1"},
            "Services": {
                "w1": {
                    "Service": "web",
                    "Port": 80,
                    "Address": "",
                    "Tags": ["v1", "bad\ntag"],
                    "Meta": {"http_host": "a.com"},
                },
                "w2": {"Service": "web", "Port": 81, "Address": "10.0.0.2;drop", "Tags": [], "Meta": {}},
                "w3": {
                    "Service": "web",
                    "Port": 82,
                    "Address": "10.0.0.3",
                    "Tags": ["t\n"],
                    "Meta": {"x": "a\x1bb", "http_path": "/api\n", "y\n": "1"},
                },
                "w4\n": {"Service": "web", "Port": 83, "Address": "10.0.0.4\n", "Tags": [], "Meta": {}},
            },
        }
    }
    node["n1"]["Services"]["e1"] = {"Service": "evil\nname", "Port": 1, "Address": "", "Tags": [], "Meta": {}}
    node["n1"]["Services"]["t1"] = {"Service": "trailing\n", "Port": 1, "Address": "", "Tags": [], "Meta": {}}
    checks = [
        {"Node": "n1", "CheckID": "service:w3", "ServiceID": "w3", "ServiceName": "web", "Status": "critical"},
        {
            "Node": "n1",
            "CheckID": "_service_maintenance:w1",
            "ServiceID": "w1",
            "ServiceName": "web",
            "Status": "critical",
        },
    ]
    index = CatalogIndex(warnings.append)
    index.load(node, checks)
    index.take_changed()
    kept, instances = index.services, index.instances
    nodes = [{"Node": "n1", "Address": "10.0.0.1"}, {"Node": "bad node", "Address": "10.0.0.9"}]
    assert list(kept) == ["web"] and kept["web"] == ("v1",)
    assert [n.name for n in clean_nodes(nodes, warnings.append)] == ["n1"] and any("bad node" in w for w in warnings)
    by_id = {i.id: i for i in instances["web"]}
    assert set(by_id) == {"w1", "w3"}
    assert by_id["w1"].address == "10.0.0.1" and by_id["w1"].status == "maintenance"
    assert by_id["w3"].status == "critical" and by_id["w3"].meta == {} and by_id["w3"].tags == ()
    # a trailing newline is not let through ("$" would match before it)
    assert any("'/api\\n'" in w for w in warnings) and any("trailing" in w for w in warnings)
    assert not valid_name("web\n") and not valid_hostname("a.example.com\n") and not valid_address("10.0.0.4\n")
    assert any("w2" in w for w in warnings) and any("evil" in w for w in warnings)
    assert aggregate(["passing", "warning"]) == "warning"


def test_grace_keeps_what_has_not_come_back_until_all_are_back_or_it_ends():
    """After Consul lost its state, instances come back one at a time (issue 21, point 1)."""
    grace = Grace(10)
    before = Snapshot(services={"web": ()}, instances={"web": (inst("a"), inst("b"))})
    shown, _ = grace.apply(before, Snapshot({}, {}), now=100.0)
    part = Snapshot({"web": ()}, {"web": (inst("a", port=81),)}, changed=frozenset({"web"}))
    shown, deadline = grace.apply(shown, part, now=101.0)
    assert shown.instances["web"] == (inst("a", port=81), inst("b")) and deadline == 110.0
    assert shown.changed == {"web"}
    whole = Snapshot({"web": ()}, {"web": (inst("a", port=81), inst("b"))}, changed=frozenset({"web"}))
    shown, deadline = grace.apply(shown, whole, now=102.0)
    assert grace.holding() == [] and deadline is None
    shown, _ = grace.apply(shown, Snapshot({}, {}, changed=frozenset({"web"})), now=103.0)
    shown, _ = grace.apply(shown, part, now=104.0)
    shown, _ = grace.apply(shown, part, now=113.5)  # the grace ran out: b has gone
    assert shown.instances["web"] == (inst("a", port=81),)


class View:
    def __init__(self, snap: Snapshot | None) -> None:
        self.snap = snap

    def catalog(self, dc: str) -> Snapshot | None:
        return self.snap

    def kv(self, key: str):
        return [{"Key": "cfg/a", "Value": "aGk="}] if key == "kv.key(cfg/a)" else None


def test_missing_key_holds_the_render_back_and_key_or_default_does_not():
    env = make_environment()

    class KV(View):
        def kv(self, key: str):
            return [] if "gone" in key else None if "later" in key else [{"Key": "a", "Value": "aGk="}]

    held = render(compile_template(env, "t.j2", "[{{ key('gone') }}]"), "t.j2", KV(Snapshot()), {}, {})
    assert not held.complete and held.missing == {KVDep("gone")}
    default = render(compile_template(env, "t.j2", "[{{ key_or_default('gone', 'd') }}]"), "t.j2", KV(None), {}, {})
    assert default.complete and default.text == "[d]"
    later = render(compile_template(env, "t.j2", "[{{ key('later') }}]"), "t.j2", KV(None), {}, {})
    assert not later.complete


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
    assert result.used == {Catalog(), KVDep("cfg/a")} and {d.key for d in result.used} == {
        "catalog(local)",
        "kv.key(cfg/a)",
    }
    pending = render(t, "t.j2", View(None), {}, {})
    assert not pending.complete and Catalog() in pending.missing
    # functions called in a loop and a block (Jinja passes them its loop variables), entries
    # read as attributes and items, and the shared services() list copied for each render
    looped = compile_template(
        env, "l.j2",
        "{% for s in services() %}{% if true %}{{ s.name }}={{ s['tags'] | length }}:"
        "{% for i in service(s.name, state='any') %}{{ i.meta.w | default('-') }}{% endfor %}{% endif %}{% endfor %}"
        "{% set all = services() %}{% set _ = all.append(1) %}{{ services() | length }}",
    )  # fmt: skip
    snap.instances["web"] = (replace(inst("a"), meta=MappingProxyType({"w": "3"})), inst("b"))
    assert render(looped, "l.j2", View(snap), {}, {}).text == "web=0:3-1"


def test_render_errors_name_template_and_line():
    env = make_environment()
    with pytest.raises(TemplateError, match=r"t\.j2:3"):
        render(compile_template(env, "t.j2", "a\nb\n{{ nope }}\n"), "t.j2", View(Snapshot()), {}, {})
    with pytest.raises(TemplateError, match=r"t\.j2:2: syntax error"):
        compile_template(env, "t.j2", "a\n{% if %}\n")
    with pytest.raises(TemplateError, match=r"SecurityError|unsafe"):
        render(compile_template(env, "t.j2", "{{ ''.__class__.__mro__ }}"), "t.j2", View(Snapshot()), {}, {})


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ service.__globals__ }}",
    "{{ env.__func__.__globals__['os'] }}",
    "{{ services.__self__.view }}",
    "{{ (1).__class__.__base__.__subclasses__() }}",
    "{{ vars.__class__.__init__.__globals__ }}",
    "{{ '{0.__class__.__mro__}'.format(1) }}",
    "{{ '{0.__globals__}'.format(service) }}",
    "{{ '%s'.format_map({}) }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{% include '/etc/passwd' %}",
    "{% import '/etc/hostname' as h %}",
    "{{ self.__init__.__globals__ }}",
    "{{ warn.__self__.env_vars }}",
]


@pytest.mark.parametrize("payload", ESCAPES)
def test_sandbox_escapes_fail_the_render(payload):
    """Templates are data from Consul's users: no attribute walk, format-string trick, include or
    import reaches Python internals, files or the recorder's state; each fails the render."""
    env = make_environment()
    secret = {"CONSUL_HTTP_TOKEN": "s3cret"}
    try:
        compiled = compile_template(env, "t.j2", payload)
        out = render(compiled, "t.j2", View(Snapshot()), {}, secret).text
    except TemplateError as err:
        assert "s3cret" not in str(err)
        return
    # a few payloads render harmlessly (undefined attributes come out empty): nothing leaks
    assert "s3cret" not in out and "uid=" not in out and "root:" not in out and "<class" not in out, out


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


def test_ident_keeps_safe_names_and_never_merges_two():
    assert ident("h1:web-1:8080") == "h1:web-1:8080"
    assert ident("x_1") == "x_1"
    assert ident("x/1") != ident("x_1") and ident("x/1").startswith("x_1-")
    assert ident("x/1") == ident("x/1")  # stable across renders


def test_server_names_unique_for_same_id_on_two_nodes():
    insts = [
        {"id": "x/1", "node": "a"},
        {"id": "x_1", "node": "a"},
        {"id": "x_1", "node": "b"},
        {"id": "x_1", "node": "b"},
    ]
    names = [name for name, _ in server_names(insts)]
    assert len(set(names)) == 4, names
    assert names[1] == "x_1"


def test_int_between_clamps_and_defaults_with_warnings():
    env = make_environment()
    source = "{% for w in vars.ws.split() %}{{ w | int_between(0, 256, 1, 'w') }}{{ ' ' if not loop.last }}{% endfor %}"
    out = render(compile_template(env, "t.j2", source), "t.j2", View(Snapshot()), {"ws": "1000 abc -3 7"}, {})
    assert out.text == "256 1 0 7"
    assert len(out.warnings) == 3 and "w='1000' is outside 0-256" in out.warnings[0]


def test_quote_filters_escape_or_refuse():
    assert haproxy_quote('a"b$c#d\\e') == '"a\\"b\\$c\\#d\\\\e"'
    assert nginx_quote('say "hi"') == '"say \\"hi\\""'
    for bad in ("a\nb", "a\rb", "a\x00"):
        with pytest.raises(ValueError):
            haproxy_quote(bad)
        with pytest.raises(ValueError):
            nginx_quote(bad)
    with pytest.raises(ValueError):
        nginx_quote("${secret}")
    env = make_environment()
    with pytest.raises(TemplateError, match=r"t\.j2:2.*line break"):
        render(
            compile_template(env, "t.j2", "x\n{{ vars.v | haproxy_quote }}\n"),
            "t.j2",
            View(Snapshot()),
            {"v": "a\nb"},
            {},
        )


def test_hostname_and_url_path_tests():
    env = make_environment()
    t = compile_template(env, "t.j2", "{{ h is hostname }} {{ p is url_path }}")
    for h, p, want in [
        ("a.example.com", "/api", "True True"),
        ("bad host", "api", "False False"),
        ("*.example.com", "/a/b-c_d.e~f", "True True"),
        ("a;b", "/a{b}", "False False"),
        ("a.example.com\n", "/a\n", "False False"),
    ]:
        assert t.render(h=h, p=p) == want, (h, p)


def test_built_instances_are_the_instances_the_dataclass_makes():
    """build_instances makes its Instances without the frozen dataclass's __init__ (a third of
    building a node's answer at 30,000 instances): equal, with the same hash, and frozen."""
    import dataclasses

    row = {
        "Node": "n1", "Address": "10.0.0.1", "ServiceID": "web-1", "ServiceName": "web", "ServiceAddress": "",
        "ServicePort": 8080, "ServiceTags": ["b", "a"], "ServiceMeta": {"z": "1", "http_host": "a.test"},
    }  # fmt: skip
    (built,) = build_instances("web", [row], print)
    meta = MappingProxyType({"http_host": "a.test", "z": "1"})
    made = Instance("web-1", "web", "10.0.0.1", 8080, "n1", "10.0.0.1", ("b", "a"), meta)
    assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
    assert list(built.meta) == ["http_host", "z"] and built.status == "passing"
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.port = 1  # type: ignore[misc]
    assert replace(built, status="critical").status == "critical"
