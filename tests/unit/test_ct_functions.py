"""consul-template's functions in Go templates, through the same render as the Jinja templates."""

from __future__ import annotations

import base64
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest

from templater.catalog import Check, Instance, Node, Snapshot, listing
from templater.ct_functions import service_query
from templater.deps import KV, Checks
from templater.errors import TemplateError
from templater.render import compile_go, render


def inst(
    sid: str, name: str = "web", port: int = 80, status: str = "passing", node: str = "n1", **meta: str
) -> Instance:
    return Instance(sid, name, "10.0.0.1", port, node, "10.0.0.9", ("prod", "v2"), MappingProxyType(meta), status)


INSTANCES = {
    "web": (
        inst("web-1", http_host="a.test"),
        inst("web-2", port=81, status="warning"),
        inst("web-3", port=82, status="critical"),
    ),
    "api": (inst("api-1", "api", 90, node="n2"),),
}
SNAPSHOT = Snapshot(
    {"web": ("prod", "v2"), "api": ("prod", "v2")},
    dict(INSTANCES),
    (Node("n1", "10.0.0.9", MappingProxyType({"rack": "r1"})), Node("n2", "10.0.0.8", MappingProxyType({}))),
    None,
    listing({"web": ("prod", "v2"), "api": ("prod", "v2")}),
)
KEYS = {"cfg/a": "1", "cfg/b/c": "2", "cfg/b/d": "3", "json": '{"x": [1, 2]}'}


class View:
    def catalog(self, dc: str) -> Snapshot | None:
        return SNAPSHOT if dc in ("", None) else None

    def kv(self, key: str) -> list[Any] | None:
        if key == "catalog.datacenters":
            return ["dc1", "dc2"]
        if key == "agent.node":
            return ["n2"]
        path = key.split("(", 1)[1].rstrip(")")
        recurse = key.startswith("kv.tree")
        found = [k for k in KEYS if (k.startswith(path) if recurse else k == path)]
        return [{"Key": k, "Value": base64.b64encode(KEYS[k].encode()).decode()} for k in sorted(found)]


def go(source: str, strict: bool = True, view: Any = None) -> Any:
    return render(
        compile_go("t.ctmpl", source, ("{{", "}}"), strict), "t.ctmpl", view or View(), {}, {"APP": "x"}, ("APP",)
    )


def text(source: str) -> str:
    result = go(source)
    assert result.complete, result.missing
    return str(result.text)


def test_service_and_its_fields_as_consul_template_names_them():
    assert text('{{ range service "web" }}{{ .ID }} {{ .Address }}:{{ .Port }} {{ .Status }} {{ .Node }} '
                '{{ .NodeAddress }} {{ .NodeMeta.rack }} {{ .ServiceMeta.http_host }} {{ .Tags }}{{ end }}') == (
        "web-1 10.0.0.1:80 passing n1 10.0.0.9 r1 a.test [prod v2]")  # fmt: skip
    assert text('{{ range service "web|passing,warning" }}{{ .ID }} {{ end }}') == "web-1 web-2 "
    assert text('{{ range service "web|any" }}{{ .ID }} {{ end }}') == "web-1 web-2 web-3 "
    assert text('{{ range service "v2.web" }}{{ .ID }} {{ end }}{{ range service "nope.web" }}x{{ end }}') == "web-1 "
    assert text('{{ if (index (service "web") 0).Tags.Contains "prod" }}yes{{ end }}') == "yes"
    assert text("{{ range services }}{{ .Name }}:{{ .Tags }} {{ end }}") == "api:[prod v2] web:[prod v2] "
    assert text("{{ range nodes }}{{ .Node }}={{ .Address }} {{ end }}") == "n1=10.0.0.9 n2=10.0.0.8 "
    assert text('{{ with node "n2" }}{{ .Node.Address }} {{ range .Services }}{{ .ID }}{{ end }}{{ end }}') == (
        "10.0.0.8 api-1"
    )
    assert service_query("tag.name@dc2~near|passing,warning") == ("name", "tag", "dc2", {"passing", "warning"})
    assert service_query("web") == ("web", None, None, {"passing"})


def test_keys_hold_the_render_until_they_exist():
    assert text('{{ key "cfg/a" }} {{ keyOrDefault "nope" "d" }} {{ keyExists "cfg/a" }} {{ keyExists "nope" }}') == (
        "1 d true false"
    )
    assert text('{{ range ls "cfg" }}{{ .Key }}={{ .Value }} {{ end }}|{{ range tree "cfg/b" }}{{ .Key }}:{{ .Path }} '
                '{{ end }}') == "a=1 |c:cfg/b/c d:cfg/b/d "  # fmt: skip
    held = go('[{{ key "nope" }}]')
    assert not held.complete and KV("nope") in held.missing
    held = go('{{ range safeLs "empty" }}x{{ end }}')
    assert not held.complete
    waiting = go('{{ (index (service "other@dc2") 0).Address }}')  # not fetched yet: an index error waits too
    assert not waiting.complete


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('{{ "a,b" | split "," | join "-" }}', "a-b"),
        ('{{ if .Missing | not }}{{ end }}{{ contains "b" (split "," "a,b") }}', "true"),
        ('{{ in (split "," "a,b") "c" }} {{ containsAll (split "," "a,b") (split "," "b,a,c") }}', "false true"),
        (
            '{{ containsAny (split "," "x,b") (split "," "a,b") }} {{ containsNone (split "," "x") (split "," "a") }}',
            "true true",
        ),
        ('{{ containsNotAll (split "," "a,x") (split "," "a,b") }}', "true"),
        (
            '{{ "a-b-c" | replaceAll "-" "_" }} {{ "x1y22" | regexReplaceAll "[0-9]+" "#" }} '
            '{{ regexMatch "^a" "abc" }}',
            "a_b_c x#y# true",
        ),
        (
            '{{ "  pad  " | trimSpace }}|{{ toUpper "a" }}{{ toLower "B" }} {{ toTitle "hello world" }}',
            "pad|Ab Hello World",
        ),
        (
            "{{ 5 | add 2 }} {{ 5 | subtract 2 }} {{ 5 | multiply 2 }} {{ 10 | divide 4 }} {{ 10 | modulo 4 }} "
            "{{ minimum 3 5 }} {{ maximum 3 5 }}",
            "7 3 10 2 2 3 5",
        ),
        ("{{ range loop 3 }}{{ . }}{{ end }} {{ range loop 2 4 }}{{ . }}{{ end }}", "012 23"),
        ('{{ parseInt "42" | add 1 }} {{ parseBool "true" }} {{ parseFloat "1.5" }}', "43 true 1.5"),
        ('{{ (key "json" | parseJSON).x }} {{ toJSON (split "," "a,b") }}', '[1 2] ["a","b"]'),
        (
            '{{ "hi" | base64Encode }} {{ "aGk=" | base64Decode }} {{ "x" | sha256Hex | printf "%.8s" }} '
            '{{ md5sum "x" }}',
            "aGk= hi 2d711642 9dd4e461268c8034f5c8564e155c67a6",
        ),
        ('{{ "a\\nb" | indent 2 }}', "  a\n  b"),
        ('{{ $t := tree "cfg" | explode }}{{ $t.b.c }} {{ $t.a }}', "2 1"),
        ('{{ range $k, $v := service "web|any" | byTag }}{{ $k }}={{ len $v }} {{ end }}', "prod=3 v2=3 "),
        (
            '{{ range $k, $v := service "web|any" | byMeta "http_host" }}[{{ $k }}]={{ len $v }} {{ end }}',
            "[]=2 [a.test]=1 ",
        ),
        ('{{ range $k, $v := tree "cfg" | byKey }}{{ $k }}:{{ range $v }}{{ .Key }}{{ end }}{{ end }}', "b:cd"),
        (
            '{{ with $s := scratch }}{{ $s.Set "a" 1 }}{{ $s.SetX "a" 2 }}{{ $s.Get "a" }} {{ $s.Key "a" }} '
            '{{ $s.MapSet "m" "k" "v" }}{{ $s.MapValues "m" }}{{ end }}',
            "1 true [v]",
        ),
        ('{{ env "APP" }}', "x"),
        ("{{ datacenters }} {{ range datacenters true }}{{ . }};{{ end }}", "[dc1 dc2] dc1;dc2;"),
        ("{{ with node }}{{ .Node.Node }} {{ .Node.Address }} {{ len .Services }}{{ end }}", "n2 10.0.0.8 1"),
    ],
)
def test_consul_templates_helpers_and_their_argument_orders(source: str, expected: str):
    assert text(source) == expected


def test_the_parser_knows_exactly_the_functions_a_render_hands_out():
    """KNOWN (what a template may name, checked when it is parsed) and the function map agree."""
    from templater.ct_functions import KNOWN, function_map
    from templater.gotemplate.execute import BUILTINS

    context = {"service": None, "services": None, "nodes": None, "checks_of": None}
    assert set(BUILTINS) | set(function_map(context)) == KNOWN


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ('{{ file "/etc/passwd" }}', "function file is disabled"),
        ('{{ secret "kv/x" }}', "function secret is disabled: Vault is not supported"),
        ('{{ env "HOME" }}', "not allowed; name it in --env-allow"),
        ('{{ range service "web" }}{{ .Nope }}{{ end }}', "can't evaluate field Nope in type HealthService"),
        ("{{ nope }}", 'function "nope" not defined'),
        ('{{ service "web" "any" }}', 'give its options after a "|"'),
    ],
)
def test_what_consul_template_refuses_or_we_do_fails_naming_it(source: str, said: str):
    with pytest.raises(TemplateError) as err:
        go(source)
    assert said in str(err.value) and "t.ctmpl" in str(err.value)


def test_a_missing_map_key_fails_unless_error_on_missing_key_is_false():
    source = '{{ range service "web" }}[{{ .ServiceMeta.nope }}]{{ end }}'
    with pytest.raises(TemplateError, match='map has no entry for key "nope"'):
        go(source)
    assert go(source, strict=False).text == "[<no value>]"


def test_timestamp_now_in_utc():
    import time

    year, unix = text('{{ timestamp "2006" }} {{ timestamp "unix" }}').split()
    assert year == time.strftime("%Y", time.gmtime()) and abs(int(unix) - time.time()) < 5
    assert text("{{ timestamp }}").endswith("Z") and len(text("{{ timestamp }}")) == 20


def test_checks_are_each_instances_checks_read_once_the_catalog_keeps_them():
    source = (
        '{{ range service "web|any" }}{{ .ID }}:{{ range .Checks }} {{ .CheckID }}={{ .Status }}{{ end }}'
        ' ({{ .Checks.AggregatedStatus }}, {{ len .Checks }}){{ "\\n" }}{{ end }}'
    )
    waiting = go(source)  # the catalog does not keep them yet: the render waits, naming the dependency
    assert not waiting.complete and Checks("") in waiting.missing and Checks("") in waiting.used
    serf = Check("n1", "serfHealth", "Serf Health Status", "passing")
    maint = Check("n1", "_service_maintenance:web-3", "Service Maintenance Mode", "critical", "web-3", "web")
    own = {i.id: Check("n1", f"service:{i.id}", "web http", i.status, i.id, "web", output="HTTP GET: 200")
           for i in INSTANCES["web"]}  # fmt: skip
    kept = {"web": tuple(replace(i, checks=(serf, own[i.id], *([maint] if i.id == "web-3" else [])))
                         for i in INSTANCES["web"])}  # fmt: skip

    class Kept(View):
        def catalog(self, dc: str) -> Snapshot | None:
            return replace(SNAPSHOT, instances={**SNAPSHOT.instances, **kept}, checks=True) if dc == "" else None

    result = go(source, view=Kept())
    assert result.complete
    assert result.text == (
        "web-1: serfHealth=passing service:web-1=passing (passing, 2)\n"
        "web-2: serfHealth=passing service:web-2=warning (warning, 2)\n"
        "web-3: serfHealth=passing service:web-3=critical _service_maintenance:web-3=critical (maintenance, 3)\n"
    )
    fields = go('{{ with index (service "web") 0 }}{{ with index .Checks 1 }}{{ .Node }} {{ .Name }} {{ .Output }} '
                '{{ .ServiceID }} {{ .ServiceName }} {{ .ServiceTags }}{{ end }}{{ end }}', view=Kept())  # fmt: skip
    assert fields.text == "n1 web http HTTP GET: 200 web-1 web [prod v2]"
    # a Jinja template reads them through checks_of(instance), recorded and waited for the same way
    from templater.render import compile_template, make_environment

    source = ("{% for i in service('web', state='any') %}{{ i.id }}"
              "{% for c in checks_of(i) %} {{ c.check_id }}={{ c.status }}{% endfor %};{% endfor %}")  # fmt: skip
    jinja = compile_template(make_environment(), "t", source)
    assert render(jinja, "t", Kept(), {}, {}).text == (
        "web-1 serfHealth=passing service:web-1=passing;web-2 serfHealth=passing service:web-2=warning;"
        "web-3 serfHealth=passing service:web-3=critical _service_maintenance:web-3=critical;"
    )
    assert Checks("") in render(jinja, "t", View(), {}, {}).missing
