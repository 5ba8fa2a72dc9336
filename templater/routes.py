"""The routing table of the bundled templates, in pure Python: `routes()` in a template.

A service routes when an instance has meta `http_host` (a comma list of host names) and/or
`http_path` (a path prefix). Per service (computed again only when its instances change):
the first `http_host`, `http_path` and `check_http` among its instances, `sticky` when any has
it, its passing instances (or, with a failover datacenter, that datacenter's when none passes
here), and its servers with unique names and clamped weights. Across services, in name order:
a host and path (or, for a path alone, any host and that path) already claimed by an earlier
service is left to it, so a contested host is decided the same way every time. Everything left
out is said in a warning that names the service and the value.

A service with meta `tcp_port` (registrator's SERVICE_TCP_PORT) also gets a TCP listener on
that port of the proxy (a database, a broker): the first service by name that asks for a port
has it, and a port the template uses itself (`reserved`) is never given. A service with meta
`sni_host` (a comma list of host names) gets TLS connections for those names passed through to
its instances unopened (routed by the SNI of the client's hello), beside the HTTPS the proxy
terminates for the other names; the first service by name that asks for a name has it.

Blue-green and canary releases: with a KV prefix (`routes(weights="routes/")`), the key
`<prefix><service>/weights` = `blue=90,green=10` splits the service's traffic by its instances'
meta `version`: each version gets its share, spread evenly over its passing instances (HAProxy
weights 0-256, the largest 256); a version the key does not name gets none. The key replaces
the instances' `weight` meta. A bad value is a warning naming the key, and the split is left out.

Basic auth: with a KV prefix (`routes(auth="routes/")`), the key `<prefix><service>/users` holds
`user:hash` lines (htpasswd's format, crypt hashes only: bcrypt `$2b$`/`$2y$`, SHA-512 `$6$`,
SHA-256 `$5$`, yescrypt `$y$`, which HAProxy and NGINX both check). The route then asks every
request for one of them. The key is a secret: a warning names the key and the line, never its
text. It fails closed: a key with no valid line lets nobody in.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import operator
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from templater import route_options
from templater.catalog import PASSING, Instance, valid_hostname
from templater.route_options import NONE, Options
from templater.values import clamp_int, ident, is_url_path, server_names, split_list

ANY_HOST = "_default"  # not a host name, so never a real one; NGINX's name for its default server


@dataclass(frozen=True)
class Server:
    name: str  # unique within its route
    instance: Instance
    weight: int


@dataclass(frozen=True)
class Claim:
    """One service's route before the contest for hosts and paths."""

    name: str
    hosts: tuple[str, ...]  # valid host names, lower case, in the order given
    path: str  # "" for none
    sticky: bool
    check: str  # an active check path, "" for none
    instances: tuple[Instance, ...]
    failover: bool  # the instances are the failover datacenter's
    servers: tuple[Server, ...]
    warnings: tuple[str, ...]  # said whether or not it wins a host
    server_warnings: tuple[str, ...] = ()  # said only when it does (a weight out of range)
    options: Options = NONE
    tcp_port: int = 0  # the proxy port it asks for (meta tcp_port); 0 for none
    sni_hosts: tuple[str, ...] = ()  # TLS server names passed through to it (meta sni_host)
    auth: Users | None = field(default=None, repr=False)  # basic-auth users (a KV key); None: none asked


@dataclass(frozen=True)
class Route:
    """A routed service: what a backend or upstream is built from."""

    name: str
    ident: str  # safe as a proxy identifier
    hosts: tuple[str, ...]  # the hosts it won; () with a path: any host
    path: str  # "" for none
    sticky: bool
    check: str
    instances: tuple[Instance, ...]
    servers: tuple[Server, ...]
    failover: bool
    options: Options  # per-route options from meta (route_options)
    http: bool  # it won a host or path: routed by HTTP
    tcp_port: int  # the proxy port it won for a TCP listener; 0 for none
    sni_hosts: tuple[str, ...]  # the TLS server names it won: passed through unopened
    auth: Users | None = field(repr=False)  # basic auth's users; None: no auth, (): nobody is let in
    version: int  # changes whenever anything above does: a fragment cache key

    @property
    def location(self) -> str:
        return self.path or "/"


@dataclass(frozen=True)
class Table:
    every: tuple[Route, ...]  # HTTP and TCP routes, by name
    version: int  # changes when a route's hosts, path, port, check, stickiness or the set of routes do
    warnings: tuple[str, ...]

    @cached_property
    def routes(self) -> tuple[Route, ...]:
        """The HTTP routes (a host or a path)."""
        return tuple(r for r in self.every if r.http)

    @cached_property
    def tcp(self) -> tuple[Route, ...]:
        """The TCP routes (a port of the proxy each), by name."""
        return tuple(r for r in self.every if r.tcp_port)

    @cached_property
    def sni(self) -> tuple[Route, ...]:
        """The routes that TLS connections are passed through to, by server name, by name."""
        return tuple(r for r in self.every if r.sni_hosts)

    @cached_property
    def rate_limited(self) -> tuple[Route, ...]:
        """The routes with a rate limit (NGINX declares a zone for each at the http level)."""
        return tuple(r for r in self.routes if r.options.rate_limit)

    @cached_property
    def server_count(self) -> int:
        return sum(map(len, map(operator.attrgetter("servers"), self.every)))

    def check_interval_ms(self, rate: int, floor_ms: int = 2000) -> int:
        """The interval between active checks of a server so that all of them together make at
        most `rate` checks a second: floor_ms doubled as often as needed. Powers of two, so a
        server more or less rarely changes it (a change of `defaults` needs a reload)."""
        interval = floor_ms
        while self.server_count * 1000 > rate * interval:
            interval *= 2
        return interval

    def by_host(self) -> list[tuple[str, list[Route]]]:
        """(host, its routes), hosts sorted; routes for any host (a path alone) under ANY_HOST."""
        found: dict[str, list[Route]] = {}
        for route in self.routes:
            for host in route.hosts or (ANY_HOST,):
                found.setdefault(host, []).append(route)
        return sorted(found.items())


Split = Mapping[str, int]  # version -> its share of a service's traffic
Users = tuple[tuple[str, str], ...]  # (user, crypt hash) pairs of a route's basic auth
_USER = re.compile(r"^[A-Za-z0-9._@-]{1,64}\Z")
_HASH = re.compile(r"^\$(?:2[aby]\$\d\d|5|6|y)\$[./A-Za-z0-9$=,]{8,300}\Z")
USERS_KEY = "users"  # <prefix><service>/users
_SPLIT_PART = re.compile(r"^\s*([A-Za-z0-9._-]{1,64})\s*=\s*(\d{1,7})\s*$")
WEIGHTS_KEY = "weights"  # <prefix><service>/weights


def parse_split(text: str) -> dict[str, int] | None:
    """`blue=90,green=10` as {version: share}, or None when any part is not `version=number`. Pure."""
    found: dict[str, int] = {}
    for part in text.split(","):
        match = _SPLIT_PART.match(part)
        if match is None or match.group(1) in found:
            return None
        found[match.group(1)] = int(match.group(2))
    return found


def splits(entries: Iterable[Mapping[str, object]], prefix: str) -> tuple[dict[str, dict[str, int]], list[str]]:
    """The splits by version of a KV prefix's raw entries (`<prefix><service>/weights`), and a
    warning for each bad value. Pure."""
    found: dict[str, dict[str, int]] = {}
    warnings = []
    for service, key, text in _service_keys(entries, prefix, WEIGHTS_KEY):
        split = parse_split(text)
        if split is None:
            warnings.append(f"service {service}: kv {key}={text[:200]!r} is not version=weight,...: split left out")
        else:
            found[service] = split
    return found, warnings


def _service_keys(entries: Iterable[Mapping[str, object]], prefix: str, leaf: str) -> Iterator[tuple[str, str, str]]:
    """(service, key, text) of each raw KV entry `<prefix><service>/<leaf>`."""
    base = prefix.strip("/")
    for entry in entries:
        key = str(entry.get("Key", ""))
        service, _, last = key[len(base) :].strip("/").rpartition("/")
        if last == leaf and service and "/" not in service:
            raw = entry.get("Value")
            yield service, key, base64.b64decode(str(raw)).decode("utf-8", "replace") if raw else ""


def parse_users(text: str, where: str) -> tuple[Users, list[str]]:
    """`user:hash` lines as pairs (the first of a user counts), and a warning for each bad line
    that names where and the line number only: the text is a secret. Pure."""
    found: dict[str, str] = {}
    warnings = []
    for number, line in enumerate(text.splitlines(), 1):
        user, _, hashed = line.strip().partition(":")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if _USER.match(user) and _HASH.match(hashed.strip()):
            found.setdefault(user, hashed.strip())
        else:
            warnings.append(f"{where} line {number} is not user:crypt-hash ($2b$, $2y$, $5$, $6$, $y$): left out")
    return tuple(sorted(found.items())), warnings


def users(entries: Iterable[Mapping[str, object]], prefix: str) -> tuple[dict[str, Users], list[str]]:
    """Each service's basic-auth users from a KV prefix's raw entries (`<prefix><service>/users`). Pure."""
    found: dict[str, Users] = {}
    warnings: list[str] = []
    for service, key, text in _service_keys(entries, prefix, USERS_KEY):
        found[service], said = parse_users(text, f"service {service}: kv {key}")
        warnings.extend(said)
        if not found[service]:
            warnings.append(f"service {service}: kv {key} has no valid user: nobody is let in")
    return found, warnings


def _split_weights(name: str, instances: tuple[Instance, ...], split: Split) -> tuple[list[int], list[str]]:
    """Each instance's weight under the split: its version's share spread over that version's
    instances, the largest 256 (a share too small to show is 1, never none)."""
    versions = [i.meta.get("version", "") for i in instances]
    counts = Counter(versions)
    shares = {v: split.get(v, 0) / n for v, n in counts.items()}
    top = max(shares.values(), default=0)
    weights = [0 if not top or not shares[v] else max(1, round(256 * shares[v] / top)) for v in versions]
    said = ",".join(f"{k}={n}" for k, n in split.items())
    warnings = [f"service {name}: version {v!r} is not in its weights ({said}): its {counts[v]} instance(s) get"
                " no traffic" for v in sorted(counts) if v not in split]  # fmt: skip
    return weights, warnings


def claim(
    name: str,
    here: tuple[Instance, ...],
    there: tuple[Instance, ...],
    split: Split | None = None,
    auth: Users | None = None,
) -> Claim | None:
    """A service's route from its instances here and in the failover dc (state any), its
    traffic split by version when a split is given. Pure."""
    seen = here or there
    host = next((i.meta["http_host"] for i in seen if "http_host" in i.meta), "")
    path = next((i.meta["http_path"] for i in seen if "http_path" in i.meta), "")
    check = next((i.meta["check_http"] for i in seen if "check_http" in i.meta), "")
    sticky = any("sticky" in i.meta for i in seen)
    options = route_options.read(name, (i.meta for i in seen))
    warnings: list[str] = list(options.errors)
    tcp_port, sni_hosts = _streams(name, seen, warnings)
    if path and not is_url_path(path):
        warnings.append(f"service {name}: http_path {path} is not a URL path: service not routed by HTTP")
        host = path = ""
    if not host and not path and not tcp_port and not sni_hosts:
        return Claim(name, (), "", False, "", (), False, (), tuple(warnings)) if warnings else None
    if check and not is_url_path(check):
        warnings.append(f"service {name}: check_http {check} is not a URL path: no active check")
        check = ""
    hosts = []
    for h in split_list(host):
        if valid_hostname(h.removeprefix("*.")):
            hosts.append(h.lower())
        else:
            warnings.append(f"service {name}: http_host {h} is not a host name: left out")
    passing = tuple(i for i in here if i.status == PASSING)
    failover = not passing and bool(there)
    instances = passing or tuple(i for i in there if i.status == PASSING)
    servers: list[Server] = []
    server_warnings: list[str] = []
    named = server_names(instances)
    if split is not None:
        weights, server_warnings = _split_weights(name, tuple(inst for _s, inst in named), split)
        servers = [Server(server, inst, w) for (server, inst), w in zip(named, weights, strict=True)]
    for server, inst in named if split is None else ():
        weight, problem = clamp_int(
            inst.meta.get("weight", "1"), 0, 256, 1, f"service {name} instance {inst.id} weight"
        )
        if problem:
            server_warnings.append(problem)
        servers.append(Server(server, inst, weight))
    if host and not hosts:  # hosts asked for, none valid: not routed (never widened to any host)
        if not tcp_port and not sni_hosts:
            return Claim(name, (), "", False, "", (), False, (), tuple(warnings))
        path = ""
    return Claim(
        name, tuple(hosts), path, sticky, check, instances, failover, tuple(servers), tuple(warnings),
        tuple(server_warnings), options, tcp_port, sni_hosts, auth,
    )  # fmt: skip


def _streams(name: str, seen: tuple[Instance, ...], warnings: list[str]) -> tuple[int, tuple[str, ...]]:
    """The TCP port and the TLS server names a service asks for (meta tcp_port, sni_host)."""
    tcp_text = next((i.meta["tcp_port"] for i in seen if "tcp_port" in i.meta), "")
    tcp_port = int(tcp_text) if tcp_text.isdigit() and 0 < int(tcp_text) < 65536 else 0
    if tcp_text and not tcp_port:
        warnings.append(f"service {name}: tcp_port {tcp_text!r} is not a port: no TCP listener")
    sni_hosts = []
    for h in split_list(next((i.meta["sni_host"] for i in seen if "sni_host" in i.meta), "")):
        if valid_hostname(h):
            sni_hosts.append(h.lower())
        else:
            warnings.append(f"service {name}: sni_host {h} is not a host name (no wildcards): left out")
    return tcp_port, tuple(dict.fromkeys(sni_hosts))


def claim_keys(c: Claim | None) -> tuple[tuple[str, str], ...]:
    """The (host, path) pairs a claim asks for, each once, in its order, then its TCP port as
    ("tcp:<port>", "") and its TLS server names as ("sni:<name>", ""), which no host and path
    pair can be. Pure."""
    if c is None:
        return ()
    tcp: tuple[tuple[str, str], ...] = ((f"tcp:{c.tcp_port}", ""),) if c.tcp_port else ()
    tcp += tuple((f"sni:{h}", "") for h in c.sni_hosts)
    if not c.hosts and not c.path:
        return tcp
    return (*dict.fromkeys((host, c.path or "/") for host in c.hosts or (ANY_HOST,)), *tcp)


Claimed = tuple[tuple[Instance, ...], tuple[Instance, ...], Claim | None]


class RouteMemo:
    """The routing table kept across renders, updated by what changed: services in name order,
    a host and path going to the first service (by name) that claims it.

    A service's claim is computed again only when its instances are other objects (found by
    comparing the maps at the speed of C while the set of services stays the same); the contest
    is decided again only for the services whose claim changed and those that claim one of the
    same host and path pairs; the versions key the fragment cache."""

    def __init__(self) -> None:
        self._claims: dict[str, Claimed] = {}
        self._claimants: dict[tuple[str, str], list[str]] = {}  # sorted: the first one owns it
        self._outcome: dict[str, tuple[Route | None, tuple[str, ...]]] = {}  # name order: route, warnings
        self._table = Table((), 0, ())
        self._counter = itertools.count(1)
        self._names: tuple[str, ...] = ()  # the last names(), and the key sets it was made from
        self._names_of: tuple[set[str], set[str]] = (set(), set())
        self._listed: set[str] = set()  # the names of the last table(), as a set
        self._seen: tuple[object, dict[str, tuple[Instance, ...]], dict[str, tuple[Instance, ...]]] = (None, {}, {})
        self._reserved: frozenset[int] = frozenset()  # ports the template uses itself
        self._splits: Mapping[str, Split] = {}  # service -> its split by version (a KV key)
        self._users: Mapping[str, Users] = {}  # service -> its basic-auth users (a KV key)
        self._parsed: dict[str, tuple[object, str, Any, list[str]]] = {}  # what -> (entries, prefix, found, warnings)

    def names(self, here: Mapping[str, object], there: Mapping[str, object]) -> tuple[str, ...]:
        """The services of both datacenters in name order: the same tuple while the set stays."""
        if here.keys() != self._names_of[0] or there.keys() != self._names_of[1]:
            self._names_of = (set(here), set(there))
            self._names = tuple(sorted((self._names_of[0] | self._names_of[1]) - {"consul"}))
        return self._names

    def splits(self, entries: Sequence[Mapping[str, Any]], prefix: str) -> tuple[dict[str, dict[str, int]], list[str]]:
        """splits() of a KV prefix's entries, parsed again only when the store has a new answer."""
        return self._parse("splits", splits, entries, prefix)  # type: ignore[no-any-return]

    def users(self, entries: Sequence[Mapping[str, Any]], prefix: str) -> tuple[dict[str, Users], list[str]]:
        """users() of a KV prefix's entries, parsed again only when the store has a new answer."""
        return self._parse("users", users, entries, prefix)  # type: ignore[no-any-return]

    def _parse(self, what: str, parse: Any, entries: Sequence[Mapping[str, Any]], prefix: str) -> Any:
        last, last_prefix, found, warnings = self._parsed.get(what, (None, "", {}, []))
        if entries is not last or prefix != last_prefix:
            found, warnings = parse(entries, prefix)
            self._parsed[what] = (entries, prefix, found, warnings)
        return found, warnings

    def table(
        self, names: Sequence[str], here: Mapping[str, tuple[Instance, ...]], there: Mapping[str, tuple[Instance, ...]],
        reserved: frozenset[int] = frozenset(), by_version: Mapping[str, Split] | None = None,
        auth: Mapping[str, Users] | None = None,
    ) -> Table:  # fmt: skip
        """names in order (sorted): the services of both datacenters. reserved: ports no TCP
        route gets (the proxy's own listeners). by_version: services' splits by version; auth:
        services' basic-auth users (both from KV)."""
        if reserved != self._reserved:  # the template's own ports changed: every route is decided again
            self.__init__()  # type: ignore[misc]
            self._reserved = reserved
        by_version, auth = by_version or {}, auth or {}
        resplit = _differ(by_version, self._splits) | _differ(auth, self._users)
        self._splits, self._users = by_version, auth
        old: dict[str, Claim | None] = {}
        changed = set()
        for name in self._moved(names, here, there) | (resplit & self._listed):
            memo = self._claims.pop(name, None)
            old[name] = memo[2] if memo is not None else None
            if name in self._listed:
                mine, theirs = here.get(name, ()), there.get(name, ())
                self._claims[name] = (mine, theirs, claim(name, mine, theirs, by_version.get(name), auth.get(name)))
            if memo is None or name not in self._claims or memo[2] != self._claims[name][2]:
                changed.add(name)
        if not changed:
            return self._table
        affected = set(changed)
        for name in changed:
            for key in claim_keys(old[name]):
                self._claimants[key].remove(name)
                affected.update(self._claimants[key])
                if not self._claimants[key]:
                    del self._claimants[key]
            for key in claim_keys(self._claims[name][2] if name in self._claims else None):
                bisect.insort(self._claimants.setdefault(key, []), name)
                affected.update(self._claimants[key])
        moved = came = False
        for name in affected:
            before = self._outcome.get(name, (None, ()))[0]
            outcome = self._decide(self._claims[name][2], before) if name in self._claims else (None, ())
            if outcome[0] is None and outcome[1] == ():
                self._outcome.pop(name, None)
            else:
                came |= name not in self._outcome
                self._outcome[name] = outcome
            moved |= _shape(before) != _shape(outcome[0])
        if came:  # a name added at the end: in name order again
            self._outcome = dict(sorted(self._outcome.items()))
        outcomes = self._outcome.values()
        routes = tuple(filter(None, map(operator.itemgetter(0), outcomes)))
        warnings = tuple(itertools.chain.from_iterable(map(operator.itemgetter(1), outcomes)))
        self._table = Table(routes, next(self._counter) if moved else self._table.version, warnings)
        return self._table

    def _moved(
        self, names: Sequence[str], here: Mapping[str, tuple[Instance, ...]], there: Mapping[str, tuple[Instance, ...]]
    ) -> set[str]:
        """The names whose instances are other objects than at the last call, or that came or went."""
        last_names, last_here, last_there = self._seen
        if names is last_names and isinstance(names, tuple):  # the same names: compare the maps
            found = {n for m, b in ((here, last_here), (there, last_there)) for n in _other_objects(m, b)}
            found &= self._listed
        else:
            self._listed = listed = set(names)
            found = {n for n in listed if (m := self._claims.get(n)) is None or m[0] is not here.get(n, ())
                     or m[1] is not there.get(n, ())} | (self._claims.keys() - listed)  # fmt: skip
        self._seen = (names, dict(here), dict(there))  # copies: a caller may change its maps
        return found

    def _decide(self, c: Claim | None, before: Route | None) -> tuple[Route | None, tuple[str, ...]]:
        """One claim against the others: its route (the hosts it won) and its warnings."""
        if c is None:
            return None, ()
        warnings = list(c.warnings)
        port = 0
        if c.tcp_port:
            owner = self._claimants[(f"tcp:{c.tcp_port}", "")][0]
            if c.tcp_port in self._reserved:
                warnings.append(f"service {c.name}: tcp_port {c.tcp_port} is the proxy's own: no TCP listener")
            elif owner != c.name:
                warnings.append(f"service {c.name}: tcp_port {c.tcp_port} is routed to {owner} already: left out")
            else:
                port = c.tcp_port
        sni = []
        for host in c.sni_hosts:
            owner = self._claimants[(f"sni:{host}", "")][0]
            if owner == c.name:
                sni.append(host)
            else:
                warnings.append(f"service {c.name}: sni_host {host} is passed through to {owner} already: left out")
        mine: list[str] = []
        for host in (c.hosts or (ANY_HOST,)) if c.hosts or c.path else ():
            owner = self._claimants[(host, c.path or "/")][0]
            if owner == c.name:
                if host not in mine:
                    mine.append(host)
            elif c.hosts:
                where = f"host {host} path {c.path or '/'}"
                warnings.append(f"service {c.name}: {where} is routed to {owner} already: left out")
            else:
                warnings.append(f"service {c.name}: path {c.path} is routed to {owner} already: left out")
        if not mine and not port and not sni:
            return None, tuple(warnings)
        warnings.extend(c.server_warnings)
        hosts = tuple(h for h in mine if h != ANY_HOST)
        return self._route(c, hosts, bool(mine), port, tuple(sni), before), tuple(warnings)

    def _route(
        self, c: Claim, hosts: tuple[str, ...], http: bool, port: int, sni: tuple[str, ...], old: Route | None
    ) -> Route:
        path = c.path if http else ""
        fields = (c.name, ident(c.name), hosts, path, c.sticky, c.check, c.instances, c.servers, c.failover,
                  c.options, http, port, sni, c.auth)  # fmt: skip
        if old is not None and (old.name, old.ident, old.hosts, old.path, old.sticky, old.check, old.instances,
                                old.servers, old.failover, old.options, old.http, old.tcp_port,
                                old.sni_hosts, old.auth) == fields:  # fmt: skip
            return old
        return Route(*fields, version=next(self._counter))


def _differ(now: Mapping[str, object], before: Mapping[str, object]) -> set[str]:
    """The keys whose values differ (or that came or went); nothing when both are one map."""
    if now is before:
        return set()
    return {n for n in now.keys() | before.keys() if now.get(n) != before.get(n)}


def _other_objects(now: Mapping[str, object], before: Mapping[str, object]) -> Iterable[str]:
    """The keys whose values are other objects (or that came or went). At the speed of C when
    both maps have the same keys in the same order, as copies of one map that moved on do."""
    if list(now) == list(before):
        return itertools.compress(now, map(operator.is_not, now.values(), before.values()))
    return [k for k in now.keys() | before.keys() if now.get(k) is not before.get(k)]


def _shape(route: Route | None) -> tuple[object, ...] | None:
    """What the frontend is built from: a change of it is a new table version."""
    if route is None:
        return None
    return (route.name, route.hosts, route.path, route.check, route.sticky, route.http, route.tcp_port,
            route.sni_hosts)  # fmt: skip
