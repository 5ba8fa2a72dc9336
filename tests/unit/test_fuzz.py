"""Untrusted input, fuzzed (issue 21, point 8): labels, Consul data, KV values, HAProxy's replies.

Fixed seeds (derandomized), a few thousand examples in all. What must hold: no exception but
ours; a rendered proxy configuration never gets a line, a control character or an unbalanced
quote from the data; and a sample of them passes `haproxy -c` and `nginx -t`.
"""

from __future__ import annotations

import ipaddress
import random
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registrar.errors import LabelError
from registrar.spec import SpecSettings, services_for
from templater import route_options
from templater.catalog import Snapshot
from templater.catalog_index import CatalogIndex
from templater.errors import TemplateError
from templater.fragments import Fragments
from templater.haproxy_runtime import keep_state_of_unmoved, parse, session_counts
from templater.render import compile_template, haproxy_quote, make_environment, nginx_quote, render
from templater.routes import RouteMemo

ROOT = Path(__file__).resolve().parents[2]


def fuzz(examples: int) -> settings:
    return settings(
        derandomize=True, deadline=None, max_examples=examples, suppress_health_check=[HealthCheck.too_slow]
    )


# text as people and attackers write it: line breaks, quotes, braces, control and wide characters
NASTY = st.sampled_from(["\n", "\r", "\r\n", '"', "'", "`", "\\", "{{", "}}", "{%", "#", ";", " ", "\t", "\x00",
                         "\x1b", "\u2028", "\u0085", "é", "$", "%[", "${x}", "/", ",", "=", ":", "*."])  # fmt: skip
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=6)), max_size=8).map("".join)
PLAIN = st.sampled_from(["web", "api", "a.example.com", "/api", "1", "80", "true", "/health", "x_y-z"])
# and the classic injection: a valid value, a break, more (`/api` + newline + `server evil ...`)
VALUE = st.one_of(PLAIN, TEXT, st.builds(lambda a, n, b: a + n + b, PLAIN, NASTY, st.one_of(PLAIN, TEXT)))

LABEL_KEYS = st.sampled_from([
    "SERVICE_NAME", "SERVICE_TAGS", "SERVICE_ID", "SERVICE_IGNORE", "SERVICE_8080_NAME", "SERVICE_8080_TAGS",
    "SERVICE_HTTP_HOST", "SERVICE_HTTP_PATH", "SERVICE_WEIGHT", "SERVICE_CHECK_HTTP", "SERVICE_CHECK_TCP",
    "SERVICE_CHECK_INTERVAL", "SERVICE_CHECK_TIMEOUT", "SERVICE_CHECK_SCRIPT", "SERVICE_CHECK_TTL",
    "SERVICE_CHECK_HTTP_METHOD", "SERVICE_STICKY", "SERVICE_X", "SERVICE_9999_NAME", "SERVICE_",
    "SERVICE_8080_CHECK_HTTP", "SERVICE_REGION",
])  # fmt: skip


def hidden(text: str) -> bool:
    """A control character, a line or paragraph separator, or an invisible format character,
    by Unicode's own categories."""
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def container(labels: dict[str, str], env: list[str], ports: list[str]) -> dict[str, Any]:
    bindings = {p: [{"HostIp": "127.0.0.1", "HostPort": str(30000 + n)}] for n, p in enumerate(ports)}
    return {
        "Id": "c0ffee" * 10,
        "Name": "/fuzz-1",
        "Config": {"Image": "app:1", "Labels": labels, "Env": env, "ExposedPorts": {p: {} for p in ports}},
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {"Ports": bindings, "IPAddress": "172.17.0.5", "Networks": {}},
        "State": {"Running": True},
    }


PORTS = st.lists(st.sampled_from(["8080/tcp", "53/udp", "9999/tcp", "x/tcp", "70000/tcp"]), max_size=3, unique=True)


@fuzz(1500)
@given(st.dictionaries(st.one_of(LABEL_KEYS, TEXT), VALUE, max_size=8), st.lists(TEXT, max_size=3), PORTS)
def test_labels_and_env_give_services_or_our_errors(labels, env, ports):
    """Whatever the labels say, the parser returns services and LabelErrors; a service's name,
    id, tags and meta never carry a line break or a control character into Consul."""
    result = services_for(container(labels, env, ports), SpecSettings(hostname="h1"))
    assert all(isinstance(e, LabelError) and "fuzz-1" in str(e) for e in result.errors)
    for svc in result.services:
        for text in (svc.id, svc.name, *svc.tags, *svc.meta.keys(), *svc.meta.values()):
            assert not hidden(text), (text, labels)


def node_answer(services: list[dict[str, Any]], address: str) -> dict[str, Any]:
    return {"Node": {"Node": "n1", "Address": address}, "Services": {str(s["ID"]): s for s in services}}


SERVICE = st.fixed_dictionaries({
    "ID": st.one_of(PLAIN, TEXT),
    "Service": st.one_of(PLAIN, TEXT),
    "Tags": st.lists(VALUE, max_size=3),
    "Meta": st.dictionaries(st.sampled_from(["http_host", "http_path", "check_http", "sticky", "weight", "x",
                                             *route_options.KEYS]), VALUE, max_size=6),
    "Port": st.one_of(st.integers(-1, 70000), st.just("80")),
    "Address": st.one_of(st.just("127.0.0.1"), st.just(""), TEXT),
    "ModifyIndex": st.just(5),
})  # fmt: skip


class View:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def catalog(self, dc: str) -> Snapshot | None:
        return self.snapshot

    def kv(self, key: str) -> Any:
        return None


def bundled(name: str) -> Any:
    return compile_template(make_environment(), name, (ROOT / "templates" / name).read_text())


TEMPLATES = {name: bundled(name) for name in ("haproxy.cfg.j2", "nginx.conf.j2")}
VARS = {"runtime_dir": "/tmp/fuzz-runtime", "http_port": "8080", "bind_address": "127.0.0.1", "https_port": "8443"}


def render_catalog(name: str, services: list[dict[str, Any]], address: str = "127.0.0.1") -> str:
    index = CatalogIndex(lambda _message: None)
    index.load({"n1": node_answer(services, address)}, [])
    index.take_changed()  # publishes what the load built
    snapshot = index.snapshot(None)
    return render(TEMPLATES[name], name, View(snapshot), VARS, {}, (), Fragments(), RouteMemo()).text


BENIGN = [
    {"ID": f"{s}-{n}", "Service": s, "Tags": ["t"], "Port": 8000 + n, "Address": "127.0.0.1", "ModifyIndex": 5,
     "Meta": {"http_host": f"{s}.example.com", "check_http": "/health", "weight": "3", **extra}}
    for s, extra in (("web", {"sticky": "1"}), ("api", {"http_path": "/api"}), ("docs", {}),
                     # every per-route option (issue 24) with a good value: the lines it writes
                     ("opts", {"http_redirect_https": "true", "http_hsts": "31536000", "http_max_body": "10m",
                               "http_connect_timeout": "2s", "http_read_timeout": "5m", "http_allow": "10.0.0.0/8",
                               "http_deny": "10.1.0.0/16", "http_strip_path": "yes", "http_rate_limit": "50",
                               "http_path": "/o", "http_header_x_frame_options": "DENY",
                               "http_header_content_security_policy": "default-src 'self'; img-src * data:"}),
                     ("db", {"tcp_port": "15432", "sni_host": "db.example.com"}))
    for n in range(2)
]  # fmt: skip
# the first word of every line the templates write for well-behaved data: any other first word
# in a rendered file came from the data
FIRST_WORDS = {name: {line.split()[0] for line in render_catalog(name, BENIGN).splitlines() if line.strip()}
               for name in TEMPLATES}  # fmt: skip


def assert_no_injection(name: str, text: str) -> None:
    for line in text.splitlines():
        assert not hidden(line.replace("\t", " ")), repr(line)
        if line.strip():
            assert line.split()[0] in FIRST_WORDS[name], repr(line)
        unescaped = re.sub(r"\\.", "", line)
        assert unescaped.count('"') % 2 == 0, repr(line)
    assert not re.search(r"[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", text)


@fuzz(700)
@given(st.sampled_from(sorted(TEMPLATES)), st.lists(SERVICE, max_size=4), st.one_of(st.just("127.0.0.1"), TEXT))
def test_consul_data_never_injects_into_the_bundled_templates(name, services, address):
    """Names, ids, tags, meta, addresses and ports from Consul, hostile or broken, through the
    catalog's sanitizer and routes() into both bundled templates: a render or our error."""
    try:
        text = render_catalog(name, [*BENIGN[:2], *services], address)
    except TemplateError:
        return
    assert_no_injection(name, text)


@fuzz(1000)
@given(VALUE)
def test_the_quote_filters_give_one_quoted_token(value):
    """KV values through `haproxy_quote` / `nginx_quote`: one token, or an error naming the value."""
    for quote in (haproxy_quote, nginx_quote):
        try:
            quoted = quote(value)
        except ValueError as err:  # what cannot be quoted fails the render, naming the value
            assert repr(str(value)) in str(err)
            continue
        assert not hidden(quoted), repr(quoted)
        assert quoted.startswith('"') and quoted.endswith('"') and len(quoted) >= 2
        assert re.sub(r"\\.", "", quoted[1:-1]).count('"') == 0, repr(quoted)


@fuzz(500)
@given(st.lists(st.one_of(TEXT, st.sampled_from(["# pxname,svname,scur", "be,a,3", "be,BACKEND,", "1", ",,,"])),
                max_size=6).map("\n".join))  # fmt: skip
def test_haproxy_replies_parse_without_exceptions(reply):
    """`show stat`, `show servers state` and configuration text as HAProxy (or anyone) may send."""
    counts = session_counts(reply)
    assert all(isinstance(v, int) and v >= 0 for v in counts.values())
    parsed = parse(reply)
    keep_state_of_unmoved(reply, parsed)
    keep_state_of_unmoved("1\n# be_name srv_name srv_addr srv_port\n" + reply, parse("backend be\n" + reply))


PIECES = ["\n", "\r", '"', "'", "`", "\\", "{{", "#", ";", " ", "\x00", "\u2028", "%[", "${x}", "/", ",", "é"]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _samples(count: int) -> list[list[dict[str, Any]]]:
    """Hostile catalogs drawn with a fixed seed: the same ones every run."""
    rng = random.Random(1234)

    def text() -> str:
        return "".join(rng.choice([*PIECES, "a", "b.c", "1"]) for _ in range(rng.randint(1, 5)))

    def service(n: int) -> dict[str, Any]:
        meta = {"http_host": rng.choice(["h.example.com", "*.w.example.com", text()]),
                "http_path": rng.choice(["/x", "", text()]), "weight": rng.choice(["0", "999", text()]),
                "check_http": rng.choice(["/ok", text()]), "sticky": text(),
                "http_max_body": rng.choice(["1m", text()]), "http_allow": rng.choice(["10.0.0.0/8", text()]),
                "http_strip_path": rng.choice(["true", text()]), "http_hsts": rng.choice(["60", text()]),
                "http_rate_limit": rng.choice(["5", text()]), "http_read_timeout": rng.choice(["5s", text()]),
                "http_redirect_https": text(), "tcp_port": rng.choice(["15433", "15434", text()]),
                "http_header_referrer_policy": rng.choice(["no-referrer", text()]),
                "http_header_" + text(): text(), "sni_host": rng.choice(["s.example.com", text()])}  # fmt: skip
        return {"ID": rng.choice([f"s{n}", text()]), "Service": rng.choice(["web", "zz", text()]),
                "Tags": [text()], "Meta": meta, "Port": rng.choice([80, 0, 70000]),
                "Address": rng.choice(["127.0.0.1", "", text()]), "ModifyIndex": 5}  # fmt: skip

    return [[service(n) for n in range(rng.randint(1, 5))] for _ in range(count)]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_sample_of_hostile_renders_passes_the_proxy_check(name, tmp_path):
    binary = {"haproxy.cfg.j2": "haproxy", "nginx.conf.j2": "nginx"}[name]
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed (scripts/install-deps.sh installs it)")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    VARS["runtime_dir"] = str(runtime)
    try:
        for n, services in enumerate(_samples(8)):
            text = render_catalog(name, [*BENIGN, *services])
            config = tmp_path / f"{n}.cfg"
            config.write_text(text)
            argv = ["haproxy", "-c", "-f", str(config)] if binary == "haproxy" else ["nginx", "-t", "-c", str(config)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if proc.returncode != 0 and binary == "nginx":
                # NGINX resolves an instance's host-name address when it loads the file, and
                # refuses the file when one does not resolve (README: a known limit; HAProxy
                # starts such a server with no address). Nothing else may fail the check.
                names = {str(s["Address"]) for s in services if not _is_ip(str(s["Address"]))}
                emerg = re.findall(r"\[emerg\] [^\n]*", proc.stderr)
                unresolved = [e for e in emerg if any(f'host not found in upstream "{n}:' in e for n in names)]
                assert emerg and unresolved == emerg, (services, proc.stderr)
                # and the same catalog with those addresses resolvable passes the whole check
                resolvable = [dict(s, Address="127.0.0.1") if s["Address"] in names else s for s in services]
                config.write_text(render_catalog(name, [*BENIGN, *resolvable]))
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, (services, proc.stdout + proc.stderr)
    finally:
        VARS["runtime_dir"] = "/tmp/fuzz-runtime"
