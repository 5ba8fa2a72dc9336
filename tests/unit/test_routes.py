"""The routing table: claims per service, the contest for hosts and paths, versions, the memo."""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from templater.catalog import Instance
from templater.routes import ANY_HOST, Claim, RouteMemo, claim


def inst(sid: str, name: str, port: int = 80, status: str = "passing", node: str = "n1", **meta: str) -> Instance:
    return Instance(sid, name, "10.0.0.1", port, node, "10.0.0.1", meta=MappingProxyType(meta), status=status)


def test_a_claim_takes_the_first_meta_and_leaves_out_bad_values_with_warnings():
    c = claim("web", (inst("w1", "web", http_host="A.example.com, bad!, a.example.com", check_http="no path"),
                      inst("w2", "web", http_path="/api", sticky="1", weight="900")), ())  # fmt: skip
    assert c is not None
    assert c.hosts == ("a.example.com", "a.example.com") and c.path == "/api" and c.sticky and c.check == ""
    assert [s.weight for s in c.servers] == [1, 256]
    assert any("bad! is not a host name" in w for w in c.warnings)
    assert any("check_http no path is not a URL path" in w for w in c.warnings)
    assert c.server_warnings == ("service web instance w2 weight='900' is outside 0-256: using 256",)
    assert claim("plain", (inst("p1", "plain"),), ()) is None  # no routing meta: not a route
    bad_path = claim("x", (inst("x1", "x", http_path="/a b"),), ())
    assert bad_path is not None and bad_path.hosts == () and bad_path.path == ""
    # hosts asked for and none valid: not routed, never widened to every host by its path
    only_bad = {"y": (inst("y1", "y", http_host="bad!", http_path="/y"),)}
    assert RouteMemo().table(["y"], only_bad, {}).routes == ()


def test_failover_takes_the_other_dc_only_when_nothing_passes_here():
    here = (inst("a1", "a", status="critical", http_host="a.example.com"),)
    there = (inst("a9", "a", node="m1", http_host="a.example.com"),)
    c = claim("a", here, there)
    assert c is not None and c.failover and [i.id for i in c.instances] == ["a9"]
    back = claim("a", (inst("a1", "a", http_host="a.example.com"),), there)
    assert back is not None and not back.failover and [i.id for i in back.instances] == ["a1"]


def test_contested_hosts_and_paths_go_to_the_first_service_by_name():
    metas = {
        "b": {"http_host": "x.example.com"},
        "a": {"http_host": "x.example.com,y.example.com"},
        "c": {"http_path": "/api"},
        "d": {"http_path": "/api", "weight": "-1"},
        "e": {"http_host": "x.example.com", "http_path": "/api"},
    }
    here = {n: (inst(f"{n}1", n, **meta),) for n, meta in metas.items()}
    table = RouteMemo().table(sorted(here), here, {})
    assert [(r.name, r.hosts) for r in table.routes] == [
        ("a", ("x.example.com", "y.example.com")),
        ("c", ()),
        ("e", ("x.example.com",)),
    ]
    assert "service b: host x.example.com path / is routed to a already: left out" in table.warnings
    assert "service d: path /api is routed to c already: left out" in table.warnings
    assert not any("weight" in w for w in table.warnings)  # d won nothing: its weight is nobody's concern


def test_the_memo_keeps_unchanged_routes_and_their_versions():
    memo = RouteMemo()
    here = {n: (inst(f"{n}1", n, http_host=f"{n}.example.com"),) for n in ("a", "b", "c")}
    first = memo.table(sorted(here), here, {})
    again = memo.table(sorted(here), dict(here), {})
    assert [r.version for r in again.routes] == [r.version for r in first.routes]
    assert again.version == first.version and again.routes[0] is first.routes[0]
    here["b"] = (*here["b"], inst("b2", "b", port=81, http_host="b.example.com"))  # a new instance
    third = memo.table(sorted(here), here, {})
    assert third.version == first.version  # the same hosts and paths: the frontend is kept
    assert [r.version == o.version for r, o in zip(third.routes, first.routes, strict=True)] == [True, False, True]
    here["c"] = (inst("c1", "c", http_host="other.example.com"),)
    assert memo.table(sorted(here), here, {}).version != first.version  # a host moved


def test_by_host_puts_path_only_routes_under_the_default_server():
    memo = RouteMemo()
    here = {"a": (inst("a1", "a", http_path="/a"),), "b": (inst("b1", "b", http_host="b.example.com"),)}
    table = memo.table(sorted(here), here, {})
    assert [(h, [r.name for r in rs]) for h, rs in table.by_host()] == [("_default", ["a"]), ("b.example.com", ["b"])]
    assert ANY_HOST == "_default" and table.routes[0].location == "/a"


def contest(
    claims: list[Claim], reserved: frozenset[int] = frozenset()
) -> tuple[list[tuple[Claim, tuple[str, ...], bool, int, tuple[str, ...]]], list[str]]:
    """The contest done plainly, from scratch, in name order: the oracle the memo must equal.
    Each winner with the hosts it won, whether it routes HTTP, and its TCP port (0: none)."""
    taken: dict[tuple[str, str], str] = {}
    ports: dict[object, str] = {}
    won: list[tuple[Claim, tuple[str, ...], bool, int, tuple[str, ...]]] = []
    warnings: list[str] = []
    for c in claims:
        warnings.extend(c.warnings)
        port = 0
        if c.tcp_port:
            owner = ports.setdefault(c.tcp_port, c.name)
            if c.tcp_port in reserved:
                warnings.append(f"service {c.name}: tcp_port {c.tcp_port} is the proxy's own: no TCP listener")
            elif owner != c.name:
                warnings.append(f"service {c.name}: tcp_port {c.tcp_port} is routed to {owner} already: left out")
            else:
                port = c.tcp_port
        sni = []
        for host in c.sni_hosts:
            owner = ports.setdefault(f"sni:{host}", c.name)
            if owner == c.name:
                sni.append(host)
            else:
                warnings.append(f"service {c.name}: sni_host {host} is passed through to {owner} already: left out")
        mine = []
        for host in (c.hosts or (ANY_HOST,)) if c.hosts or c.path else ():
            key = (host, c.path or "/")
            owner = taken.setdefault(key, c.name)
            if owner == c.name:
                if host not in mine:
                    mine.append(host)
            elif c.hosts:
                warnings.append(
                    f"service {c.name}: host {host} path {c.path or '/'} is routed to {owner} already: left out"
                )
            else:
                warnings.append(f"service {c.name}: path {c.path} is routed to {owner} already: left out")
        if mine or port or sni:
            won.append((c, tuple(h for h in mine if h != ANY_HOST), bool(mine), port, tuple(sni)))
            warnings.extend(c.server_warnings)
    return won, warnings


NAMES = st.sampled_from(["a", "b", "c", "d"])
HOSTS = st.sampled_from(["", "x.example.com", "y.example.com", "x.example.com,y.example.com", "bad!"])
PATHS = st.sampled_from(["", "/", "/api", "/api/v2"])
TCP_PORTS = st.sampled_from(["", "", "5432", "5433", "8080", "99999"])
RESERVED = frozenset({8080})  # the proxy's own port
SNI = st.sampled_from(["", "", "x.example.com", "db.example.com,x.example.com", "*.bad"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, HOSTS, PATHS, TCP_PORTS, SNI, st.integers(-1, 2), st.booleans()), max_size=15))
def test_the_memo_gives_what_a_plain_contest_gives_after_any_changes(steps):
    """Services come, change and go (-1), the map changed in place; the names are the memo's
    own (the same tuple while the set stays, so the maps are compared as a whole) or a new
    list each time. HTTP routes and TCP ports alike."""
    memo = RouteMemo()
    here: dict[str, tuple[Instance, ...]] = {}
    for name, host, path, tcp, sni, count, own_names in steps:
        meta = {k: v for k, v in (("http_host", host), ("http_path", path), ("tcp_port", tcp), ("sni_host", sni)) if v}
        if count < 0:
            here.pop(name, None)
        else:
            here[name] = tuple(inst(f"{name}{n}", name, port=80 + n, **meta) for n in range(count))
        kept = memo.table(memo.names(here, {}) if own_names else sorted(here), here, {}, RESERVED)
        claims = [c for c in (claim(n, here[n], ()) for n in sorted(here)) if c is not None]
        won, warnings = contest(claims, RESERVED)
        strip = [(r.name, r.hosts, r.path, r.instances, r.servers, r.http, r.tcp_port, r.sni_hosts) for r in kept.every]
        assert strip == [(c.name, hosts, c.path if http else "", c.instances, c.servers, http, port, sni)
                         for c, hosts, http, port, sni in won]  # fmt: skip
        assert [r.name for r in kept.routes] == [c.name for c, _h, http, _p, _s in won if http]
        assert [(r.name, r.tcp_port) for r in kept.tcp] == [(c.name, p) for c, _h, _http, p, _s in won if p]
        assert [(r.name, r.sni_hosts) for r in kept.sni] == [(c.name, s) for c, _h, _http, _p, s in won if s]
        assert list(kept.warnings) == warnings
        # each host and path is won once at most
        keys = [(h, r.location) for r in kept.routes for h in r.hosts or (ANY_HOST,)]
        assert len(keys) == len(set(keys))


def test_route_options_are_validated_where_they_are_read():
    from templater.route_options import NONE, read

    assert read("web", [{"http_host": "a.test"}]) is NONE
    options = read(
        "web",
        [
            {"http_max_body": "10m", "http_allow": " 10.0.0.1/8 , ::1", "http_strip_path": "Yes", "http_hsts": "60"},
            {
                "http_max_body": "1k",
                "http_read_timeout": "1m30s",
                "http_connect_timeout": "250ms",
                "http_rate_limit": "7",
            },
        ],
    )
    assert options.max_body == 10 * 1024**2  # the first instance that has the key has its say
    assert options.allow == ("10.0.0.0/8", "::1/128") and options.strip_path and options.hsts == 60
    assert (options.read_timeout_ms, options.connect_timeout_ms, options.rate_limit) == (90_000, 250, 7)
    assert options.errors == () and options.any
    meta = {"http_max_body": "0", "http_allow": "10.0.0.0/8;x", "http_hsts": "-1", "http_rate_limit": "1e3",
            "http_redirect_https": "sure", "http_read_timeout": "48h", "http_strip_path": "false"}  # fmt: skip
    bad = read("web", [meta])
    assert bad == NONE  # every option left out (strip_path false is its default) ...
    assert len(bad.errors) == 6 and all(e.startswith("service web: http_") for e in bad.errors)  # ... each said
    assert (
        "service web: http_allow='10.0.0.0/8;x' is not a comma list of addresses or CIDRs: option left out"
        in bad.errors
    )


def test_tcp_ports_go_to_the_first_service_by_name_and_never_to_the_proxys_own():
    here = {
        "db": (inst("db1", "db", port=5432, tcp_port="15432"), inst("db2", "db", port=5433)),
        "db-copy": (inst("c1", "db-copy", tcp_port="15432"),),
        "mq": (inst("mq1", "mq", port=5672, tcp_port="15672", http_host="mq.test"),),
        "own": (inst("o1", "own", tcp_port="8080"),),
        "bad": (inst("b1", "bad", tcp_port="70000"),),
    }
    table = RouteMemo().table(sorted(here), here, {}, frozenset({8080}))
    assert [(r.name, r.tcp_port, r.http) for r in table.tcp] == [("db", 15432, False), ("mq", 15672, True)]
    assert [r.name for r in table.routes] == ["mq"]  # only HTTP routes: a TCP-only one has no backend there
    assert [s.instance.port for s in table.tcp[0].servers] == [5432, 5433]
    assert set(table.warnings) == {
        "service bad: tcp_port '70000' is not a port: no TCP listener",
        "service db-copy: tcp_port 15432 is routed to db already: left out",
        "service own: tcp_port 8080 is the proxy's own: no TCP listener",
    }


def test_response_headers_come_from_a_safe_set_with_quotable_values():
    from templater.route_options import read

    options = read("web", [{"http_header_x_frame_options": "DENY", "http_header_Referrer_Policy": " no-referrer ",
                            "http_header_content_security_policy": "default-src 'self'; img-src *"},
                           {"http_header_x_frame_options": "SAMEORIGIN"}])  # fmt: skip
    assert options.headers == (("Content-Security-Policy", "default-src 'self'; img-src *"),
                               ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"))  # fmt: skip
    refused = read("web", [{"http_header_set_cookie": "a=1", "http_header_location": "http://evil/",
                            "http_header_cache_control": "max-age=60%", "http_header_x_robots_tag": 'no"index',
                            "http_header_x_xss_protection": "x" * 1025}])  # fmt: skip
    assert refused.headers == () and len(refused.errors) == 5
    assert all("option left out" in e and e.startswith("service web: http_header_") for e in refused.errors)


def test_a_split_by_version_from_kv_sets_the_weights_and_a_flip_changes_only_them():
    import base64

    from templater.routes import parse_split, splits

    here = {"bg": (*(inst(f"b{n}", "bg", 80 + n, http_host="bg.test", version="blue", weight="7") for n in range(3)),
                   inst("g0", "bg", 90, http_host="bg.test", version="green"),
                   inst("x0", "bg", 91, http_host="bg.test"))}  # fmt: skip
    memo = RouteMemo()

    def weights(split):
        table = memo.table(sorted(here), here, {}, frozenset(), {"bg": split})
        return {s.instance.id: s.weight for s in table.routes[0].servers}, table

    canary, first = weights({"blue": 90, "green": 10})
    assert canary == {"b0": 256, "b1": 256, "b2": 256, "g0": 85, "x0": 0}  # 3 x 256 : 85 is 90 : 10
    assert "service bg: version '' is not in its weights (blue=90,green=10): its 1 instance(s) get no traffic" in (
        first.warnings
    )
    flipped, second = weights({"blue": 0, "green": 100})
    assert flipped == {"b0": 0, "b1": 0, "b2": 0, "g0": 256, "x0": 0}
    assert second.version == first.version and second.routes[0].version != first.routes[0].version  # servers only
    assert weights({"blue": 0, "green": 100})[1] is second  # the same split: nothing decided again
    plain = memo.table(sorted(here), here, {}, frozenset(), {})
    assert {s.instance.id: s.weight for s in plain.routes[0].servers}["b0"] == 7  # no key: the weight meta
    assert parse_split(" blue = 100 , green=0") == {"blue": 100, "green": 0}
    assert parse_split("blue=1,blue=2") is None and parse_split("blue=-1") is None and parse_split("a b=1") is None

    def entry(key, text):
        return {"Key": key, "Value": base64.b64encode(text.encode()).decode()}

    entries = [entry("routes/bg/weights", "blue=1,green=3"), entry("routes/bad/weights", "all"),
               entry("routes/bg/other", "x"), entry("routes/a/b/weights", "v=1")]  # fmt: skip
    found, warnings = splits(entries, "routes/")
    assert found == {"bg": {"blue": 1, "green": 3}}
    assert warnings == ["service bad: kv routes/bad/weights='all' is not version=weight,...: split left out"]


def test_basic_auth_users_are_crypt_hashes_and_a_bad_key_lets_nobody_in():
    import base64

    from templater.routes import parse_users, users

    sha = "$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVACtLtip/cZ/1GM/O6IND4WQhG."
    bcrypt = "$2y$05$abcdefghijklmnopqrstuu5Zb4K5dG9u2n8eZ4H3s4K8s1nq3r3Zy"
    found, warnings = parse_users(f"# team\nalice:{sha}\n\nbob:{bcrypt}\nalice:{bcrypt}\neve:hunter2\n x y\n", "k")
    assert found == (("alice", sha), ("bob", bcrypt))  # the first line of a user counts
    assert warnings == ["k line 6 is not user:crypt-hash ($2b$, $2y$, $5$, $6$, $y$): left out",
                        "k line 7 is not user:crypt-hash ($2b$, $2y$, $5$, $6$, $y$): left out"]  # fmt: skip
    assert all("hunter2" not in w for w in warnings)  # the key is a secret: never its text

    def entry(key, text):
        return {"Key": key, "Value": base64.b64encode(text.encode()).decode()}

    by_service, said = users([entry("r/web/users", f"alice:{sha}"), entry("r/shut/users", "junk")], "r/")
    assert by_service == {"web": (("alice", sha),), "shut": ()}
    assert "service shut: kv r/shut/users has no valid user: nobody is let in" in said
    here = {"web": (inst("w1", "web", http_host="w.test"),), "shut": (inst("s1", "shut", http_host="s.test"),),
            "open": (inst("o1", "open", http_host="o.test"),)}  # fmt: skip
    table = RouteMemo().table(sorted(here), here, {}, frozenset(), None, by_service)
    assert {r.name: r.auth for r in table.routes} == {"open": None, "shut": (), "web": (("alice", sha),)}
