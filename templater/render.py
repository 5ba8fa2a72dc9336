"""Jinja2 rendering with consul-template's functions. Pure: data comes through a View.

A render records what it used (its dependencies) and what was not there yet; a render with
missing data is incomplete and is never written out, as in consul-template.
"""

from __future__ import annotations

import base64
import fnmatch
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType, MethodType
from typing import Any, Protocol

import jinja2
from jinja2 import pass_context
from jinja2.sandbox import SandboxedEnvironment

from sidecar.logs import REDACTOR
from sidecar.text import UNSAFE
from templater.catalog import PASSING, Check, Instance, Snapshot, listing
from templater.deps import AGENT_NODE, DATACENTERS, Checks, Dependency, catalog, kv
from templater.errors import TemplateError
from templater.fragments import ACTIVE, Atom, Effect, FragmentCache, Fragments, Scope
from templater.gotemplate import GoTemplateError
from templater.routes import Route, RouteMemo, Server, Table
from templater.values import clamp_int, ident, is_hostname, is_url_path, server_names, split_list


class View(Protocol):
    """What a render reads; None means "not fetched yet"."""

    def catalog(self, dc: str) -> Snapshot | None: ...
    def kv(self, key: str) -> list[dict[str, Any]] | None: ...


@dataclass
class RenderResult:
    text: str
    used: set[Dependency] = field(default_factory=set)
    missing: set[Dependency] = field(default_factory=set)  # used, and not fetched yet
    warnings: list[str] = field(default_factory=list)  # from warn() and the checking filters
    # consul-template style names of the queries made, for /metrics: those the render made
    # itself, and each kept block's (a tuple per block: adding 10,000 names to a set in every
    # render was a sixth of a kept render's time at 10,000 services)
    recorded_queries: set[str] = field(default_factory=set)
    kept_queries: list[tuple[str, ...]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # side files (side_file()): name -> text

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def queries(self) -> set[str]:
        return self.recorded_queries.union(*self.kept_queries)


class _Recording:
    """What one render read and did: its result (dependencies, missing data, warnings, side
    files, query names), and the atoms and effects a block being kept records."""

    def __init__(
        self,
        view: View,
        env_vars: dict[str, str],
        env_allow: tuple[str, ...] = (),
        fragments: Fragments | None = None,
        route_memo: RouteMemo | None = None,
        files_dir: str = "side-files",
    ) -> None:
        self.view = view
        self.files_dir = files_dir
        self.route_memo = route_memo or RouteMemo()
        self.env_vars = env_vars
        self.env_allow = env_allow
        self.result = RenderResult("")
        self._snapshots: dict[str, Any] = {}  # dc -> its snapshot in this render's view
        self._instances: dict[str, Mapping[str, Any]] = {}  # dc -> its snapshot's instances
        self.scope = (
            Scope(fragments, self._current, self._instances, (self.result.used, self.result.kept_queries, self._apply))
            if fragments is not None
            else None
        )

    def release(self) -> None:
        """Drop this render's data. The recorder ends in reference cycles (its scope holds its
        methods, Jinja's context its functions), freed only by the cyclic collector, often
        after a render's objects reached the oldest generation: each kept this render's
        snapshot copies and text (3 MB at 10,000 services), 65 MiB of RSS over 30 renders."""
        self.view = _RELEASED
        self._snapshots.clear()
        self._instances.clear()
        self.scope = None
        self.result = RenderResult("")

    # -- what a read does to the result; a block being kept ({% cache %}) records it too

    def _apply(self, effect: Effect) -> None:
        kind, value = effect
        if kind == "used":
            self.result.used.add(value)
        elif kind == "query":
            self.result.recorded_queries.add(value)
        elif kind == "missing":
            self.result.missing.add(value)
        elif kind == "warning":
            self.result.warnings.append(value)
        elif kind == "file":
            self.result.files[value[0]] = value[1]

    def _effect(self, kind: str, value: Any) -> None:
        self._apply((kind, value))
        if self.scope is not None and self.scope.frames:
            self.scope.record(None, None, (kind, value), missing=kind == "missing")

    def _atom(self, atom: Atom, value: Any) -> None:
        if self.scope is not None and self.scope.frames:
            self.scope.record(atom, value, None)

    def _current(self, atom: Atom) -> Any:
        """An atom's value in this render's data (for a kept block's check)."""
        kind, where, name = atom
        if kind == "service" and where in self._instances:  # most atoms: a service in a catalog seen
            return self._instances[where].get(name)
        if kind == "kv":
            return self.view.kv(where)
        snapshot = self._snapshots.get(where, _NOT_THERE)
        if snapshot is _NOT_THERE:
            snapshot = self._snapshots[where] = self.view.catalog(where)
        if snapshot is None:
            return _NOT_THERE
        self._instances[where] = snapshot.instances
        if kind == "service":
            return snapshot.instances.get(name)
        return snapshot.services if kind == "services" else snapshot.nodes

    # -- reads every function makes

    def _catalog(self, dc: str | None) -> Snapshot:
        dep = catalog(dc)
        self._effect("used", dep)
        snapshot = self.view.catalog(dep.dc)
        if snapshot is None:
            self._effect("missing", dep)
            return Snapshot()
        return snapshot

    def _kv(self, path: str, recurse: bool, dc: str | None) -> list[dict[str, Any]]:
        return self._read(kv(path, recurse, dc))

    def _read(self, dep: Dependency) -> list[Any]:
        """What the store holds for dep (a KV key or prefix, the datacenters, the agent's node):
        recorded as used, and as missing while it has not been read."""
        self._effect("used", dep)
        self._effect("query", dep.key)
        entries = self.view.kv(dep.key)
        self._atom(("kv", dep.key, ""), entries)
        if entries is None:
            self._effect("missing", dep)
            return []
        return entries

    @staticmethod
    def _value(entry: dict[str, Any]) -> str:
        raw = entry.get("Value")
        return base64.b64decode(raw).decode("utf-8", "replace") if raw else ""


class _Recorder(_Recording):
    """The template functions (render()'s context): reads recorded as the render's
    dependencies, and as a kept block's, while one renders."""

    def services(self, dc: str | None = None) -> list[Mapping[str, Any]]:
        self._effect("query", f"catalog.services({dc or ''})")
        snapshot = self._catalog(dc)
        self._atom(("services", dc or "", ""), snapshot.services)
        if snapshot.listing is None:  # once per snapshot, read-only, shared by every render of it
            snapshot.listing = listing(snapshot.services)
        return list(snapshot.listing)

    def service(self, name: str, tag: str | None = None, state: str = PASSING, dc: str | None = None) -> list[Instance]:
        if state not in (PASSING, "any"):
            raise ValueError(f"service({name!r}): state must be 'passing' or 'any', not {state!r}")
        self._effect("query", f"health.service({name}|{tag or ''}|{state}|{dc or ''})")
        snapshot = self._catalog(dc)
        instances = snapshot.instances.get(name)
        self._atom(("service", dc or "", name), instances)
        return [
            inst
            for inst in instances or ()
            if (tag is None or tag in inst.tags) and (state != PASSING or inst.status == PASSING)
        ]

    def checks_of(self, instance: Instance, dc: str | None = None) -> tuple[Check, ...]:
        """An instance's health checks, its node's first (consul-template's `.Checks`). The dc's
        catalog keeps them from the first render that asks; the render waits until it has read
        them all once."""
        dep = Checks(dc or "")
        self._effect("used", dep)
        if not self._catalog(dc).checks:
            self._effect("missing", dep)
        return instance.checks

    def routes(
        self,
        failover_dc: str = "",
        dc: str | None = None,
        reserved: Iterable[Any] = (),
        weights: str = "",
        auth: str = "",
    ) -> Table:
        """The routing table (templater.routes): every service with http_host, http_path or
        tcp_port meta, contested hosts and ports decided by name, warnings said. reserved: the
        template's own ports, never a TCP route's. weights: a KV prefix whose
        `<service>/weights` keys split services' traffic by version (one watch of the prefix);
        auth: a KV prefix whose `<service>/users` keys (secret) give routes basic auth.
        A block that calls it is rendered every time: key blocks by `table.version` and
        `route.version` instead."""
        ports = frozenset(int(p) for p in reserved if str(p).isdigit())
        by_version = self._per_service(self.route_memo.splits, weights, dc)
        users = self._per_service(self.route_memo.users, auth, dc)
        self._effect("query", f"routes({dc or ''}|{failover_dc})")
        here = self._catalog(dc)
        there = self._catalog(failover_dc) if failover_dc else Snapshot()
        self._atom(("routes", f"{dc or ''}|{failover_dc}", ""), _NOT_THERE)
        names = self.route_memo.names(here.services, there.services)
        table = self.route_memo.table(names, here.instances, there.instances, ports, by_version, users)
        for warning in table.warnings:
            self._effect("warning", warning)
        return table

    def _per_service(self, parse: Callable[[Any, str], tuple[dict[str, Any], list[str]]], prefix: str,
                     dc: str | None) -> dict[str, Any]:  # fmt: skip
        """What parse makes of a KV prefix's `<service>/<leaf>` keys (nothing without a prefix),
        its warnings said."""
        if not prefix:
            return {}
        found, warnings = parse(self._kv(prefix, True, dc), prefix)
        for warning in warnings:
            self._effect("warning", warning)
        return found

    def side_file(self, name: str, text: str) -> str:
        """A file beside the template's destination (`<dest>.d/<name>`) with text, written
        before it (and checked with it), with its mode and owner; the path to write in the
        proxy's file. Files a render no longer makes are removed after the next write."""
        if not isinstance(name, str) or not _SIDE_NAME.match(name):
            raise ValueError(f"side_file({name!r}): a name of letters, digits, '.', '_' and '-'")
        self._effect("file", (name, str(text)))
        return f"{self.files_dir}/{name}"

    def nodes(self, dc: str | None = None) -> list[dict[str, Any]]:
        self._effect("query", f"catalog.nodes({dc or ''})")
        snapshot = self._catalog(dc)
        self._atom(("nodes", dc or "", ""), snapshot.nodes)
        return [{"name": n.name, "address": n.address, "meta": n.meta} for n in snapshot.nodes]

    def key(self, path: str, dc: str | None = None, secret: bool = False) -> str:
        """The key's value; a key that does not exist holds the render back until it does,
        as consul-template's `key` does (`key_or_default` renders with a default instead).
        secret=True: the value never appears in a log line or /health (an error quoting it)."""
        entries = self._kv(path, False, dc)
        if not entries:
            self._effect("missing", kv(path, False, dc))
            return ""
        value = self._value(entries[0])
        return self.secret(value) if secret else value

    def key_or_default(self, path: str, default: str, dc: str | None = None, secret: bool = False) -> str:
        entries = self._kv(path, False, dc)
        value = self._value(entries[0]) if entries else default
        return self.secret(value) if secret else value

    def datacenters(self) -> list[str]:
        """The datacenters Consul knows, in its order (nearest first); [] until first read."""
        return [str(d) for d in self._read(DATACENTERS)]

    def agent_node(self) -> str:
        """The agent's own node name; "" (the render held) until first read."""
        found = self._read(AGENT_NODE)
        if found and not found[0]:  # read, but the agent did not say its name
            self._effect("missing", AGENT_NODE)
        return str(found[0]) if found else ""

    def key_exists(self, path: str, dc: str | None = None) -> bool:
        """Whether the key exists (consul-template's keyExists): never holds the render."""
        return bool(self._kv(path, False, dc))

    def catalog_node(self, node: str, dc: str | None = None) -> list[Instance]:
        """The instances on one node, any state (consul-template's `node`)."""
        snapshot = self._catalog(dc)
        self._atom(("services", dc or "", ""), snapshot.services)
        return [i for found in snapshot.instances.values() for i in found if i.node == node]

    def secret(self, value: Any) -> Any:
        return mark_secret(value)

    def tree(self, prefix: str, dc: str | None = None) -> list[dict[str, str]]:
        base = prefix.strip("/")
        entries = self._kv(prefix, True, dc)
        out = []
        for entry in entries:
            full = str(entry.get("Key", ""))
            if full.endswith("/"):
                continue
            out.append({"key": full[len(base) :].lstrip("/"), "path": full, "value": self._value(entry)})
        return out

    def ls(self, prefix: str, dc: str | None = None) -> list[dict[str, str]]:
        return [item for item in self.tree(prefix, dc) if "/" not in item["key"]]

    def env(self, name: str, default: str = "") -> str:
        """An environment variable that --env-allow names; any other is an error, so a template
        (data from Consul's users) cannot read the token or other secrets of the process."""
        if not env_allowed(str(name), self.env_allow):
            raise ValueError(f"env({name!r}): not allowed; name it in --env-allow (TEMPLATER_ENV_ALLOW)")
        return self.env_vars.get(name, default)

    def warn(self, message: Any) -> str:
        """Templates report what they left out (a contested host, a bad value); logged once."""
        self._effect("warning", str(message))
        return ""


_SIDE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def by_tag(instances: Iterable[Any], tag: str) -> list[Any]:
    return [i for i in instances if tag in _get(i, "tags")]


def by_meta(instances: Iterable[Any], key: str, value: str | None = None) -> list[Any]:
    out = []
    for inst in instances:
        meta = _get(inst, "meta") or {}
        if key in meta and (value is None or meta[key] == value):
            out.append(inst)
    return out


def group_by(items: Iterable[Any], attribute: str) -> dict[str, list[Any]]:
    """Group by an attribute or a dotted path (`meta.http_host`); lists keep input order."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        value: Any = item
        for part in attribute.split("."):
            value = _get(value, part)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                groups.setdefault(str(v), []).append(item)
    return dict(sorted(groups.items()))


@pass_context
def int_between(context: Any, value: Any, low: int, high: int, default: int, what: str = "value") -> int:
    """An integer for a proxy setting: bad text gives the default, others are clamped, with a warning."""
    number, problem = clamp_int(value, low, high, default, what)
    if problem:
        _context_warn(context, problem)
    return number


def _context_warn(context: Any, message: str) -> None:
    warn = context.get("warn")
    if callable(warn):
        warn(message)


def haproxy_quote(value: Any) -> str:
    """value as one double-quoted HAProxy argument: \\, \", $ and # cannot escape from it.
    Line breaks and control characters cannot be represented safely: the render fails."""
    text = str(value)
    if UNSAFE.search(text):
        raise ValueError(f"haproxy_quote: {text!r} holds a line break or control character")
    return '"' + re.sub(r'([\\"$#])', r"\\\1", text) + '"'


def nginx_quote(value: Any) -> str:
    """value as one double-quoted NGINX string. NGINX has no escape for `$` (variables), so a
    value with `$`, a line break or a control character fails the render rather than inject."""
    text = str(value)
    if UNSAFE.search(text) or "$" in text:
        raise ValueError(f"nginx_quote: {text!r} holds $, a line break or a control character")
    return '"' + re.sub(r'([\\"])', r"\\\1", text) + '"'


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


# frozen values of strings, numbers, tuples and read-only mappings: their fields need none of
# the sandbox's checks (over 3,000 instances those checks were most of the render time)
_FAST_FIELDS: dict[type, frozenset[str]] = {
    Instance: frozenset(f.name for f in fields(Instance)),
    Route: frozenset([*(f.name for f in fields(Route)), "location"]),
    Server: frozenset(f.name for f in fields(Server)),
    Table: frozenset([*(f.name for f in fields(Table)), "by_host", "server_count", "check_interval_ms"]),
}
_PROXY_ATTRIBUTES = frozenset(dir(MappingProxyType))


_NOT_THERE = object()  # a catalog not fetched yet: never equal to what a kept block saw


class _Released:
    """The view of a finished render: a template function called after it (a macro kept by
    the template, say) finds no data."""

    def catalog(self, dc: str) -> Snapshot | None:
        return None

    def kv(self, key: str) -> list[dict[str, Any]] | None:
        return None


_RELEASED = _Released()


class _Environment(SandboxedEnvironment):
    """The sandbox, with a fast path for the fields of an Instance.

    An Instance is a frozen value of strings, numbers, tuples and a read-only mapping, so its
    fields need none of the sandbox's checks; over 3,000 instances those checks were most of
    the render time.
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        fast = _FAST_FIELDS.get(type(obj))
        if fast is not None and attribute in fast:
            return getattr(obj, attribute)
        # a read-only mapping of data (meta, a services() entry): its item, as the sandbox's own
        # lookup would end, unless the name is one of the mapping's methods
        if type(obj) is MappingProxyType and attribute not in _PROXY_ATTRIBUTES and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """The template functions (service(), key(), ...) are ours: called without the checks."""
        if type(__obj) is MethodType and type(__obj.__self__) in (_Recorder, FragmentCache):
            kwargs.pop("_loop_vars", None)  # what Jinja passes to a call in a loop or block
            kwargs.pop("_block_vars", None)
            return __obj(*args, **kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def mark_secret(value: Any) -> Any:
    """`secret(value)` / `value | secret`: the value, from now on redacted from every log line
    and /health text of this process (an error that quotes it included)."""
    REDACTOR.add(str(value))
    return value


def env_allowed(name: str, allow: tuple[str, ...]) -> bool:
    """Whether --env-allow lets templates read this variable. Pure."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allow)


def make_environment(delimiters: tuple[str, str] = ("{{", "}}"), strict: bool = True) -> SandboxedEnvironment:
    """delimiters: around expressions (consul-template's left_delimiter and right_delimiter);
    strict: an undefined variable or attribute fails the render, else it renders as nothing
    (error_on_missing_key = false)."""
    env = _Environment(
        extensions=[FragmentCache],
        variable_start_string=delimiters[0],
        variable_end_string=delimiters[1],
        undefined=jinja2.StrictUndefined if strict else jinja2.Undefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        by_tag=by_tag,
        by_meta=by_meta,
        group_by=group_by,
        ident=ident,
        split_list=split_list,
        server_names=server_names,
        int_between=int_between,
        haproxy_quote=haproxy_quote,
        nginx_quote=nginx_quote,
        secret=mark_secret,
    )
    env.tests.update(hostname=is_hostname, url_path=is_url_path)
    return env


def compile_template(env: SandboxedEnvironment, name: str, source: str) -> jinja2.Template:
    try:
        return env.from_string(source, template_class=None)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(name, err.lineno, f"syntax error: {err.message}") from err


def compile_go(name: str, source: str, delimiters: tuple[str, str], strict: bool) -> Any:
    """A consul-template (Go text/template) template; render() takes it as a Jinja one."""
    from templater.ct_functions import GoTemplate

    try:
        return GoTemplate(name, source, delimiters, strict)
    except GoTemplateError as err:
        raise TemplateError(name, err.line, str(err)) from err


def render(
    template: jinja2.Template,
    name: str,
    view: View,
    variables: dict[str, str],
    env_vars: dict[str, str],
    env_allow: tuple[str, ...] = (),
    fragments: Fragments | None = None,
    route_memo: RouteMemo | None = None,
    files_dir: str = "side-files",
) -> RenderResult:
    """Render one template; raises TemplateError naming the template and the line. env() reads
    env_vars, only the names env_allow matches (shell patterns such as APP_*). fragments: the
    template's kept `{% cache %}` blocks (without it every block renders)."""
    recorder = _Recorder(view, env_vars, env_allow, fragments, route_memo, files_dir)
    context = {
        "services": recorder.services,
        "service": recorder.service,
        "nodes": recorder.nodes,
        "routes": recorder.routes,
        "checks_of": recorder.checks_of,
        "side_file": recorder.side_file,
        "key": recorder.key,
        "key_or_default": recorder.key_or_default,
        "key_exists": recorder.key_exists,
        "catalog_node": recorder.catalog_node,
        "datacenters": recorder.datacenters,
        "agent_node": recorder.agent_node,
        "secret": recorder.secret,
        "ls": recorder.ls,
        "tree": recorder.tree,
        "env": recorder.env,
        "warn": recorder.warn,
        "vars": dict(variables),
    }
    token = ACTIVE.set(recorder.scope)
    try:
        text = template.render(context)
    except Exception as err:  # any error in user code is reported, never raised raw
        if not recorder.result.missing:
            raise _as_template_error(name, err) from err
        text = ""  # it read data not fetched yet (an empty list indexed, say): it waits for that data
    finally:
        ACTIVE.reset(token)
    if recorder.scope is not None and recorder.result.complete:
        recorder.scope.finish()
    result = recorder.result
    result.text = text
    recorder.release()
    return result


def _as_template_error(name: str, err: Exception) -> TemplateError:
    if isinstance(err, jinja2.TemplateSyntaxError):
        return TemplateError(name, err.lineno, f"syntax error: {err.message}")
    if isinstance(err, GoTemplateError):  # Go's own message: the template, line and column, and what
        return TemplateError(name, None, str(err))
    return TemplateError(name, _template_line(err), f"{type(err).__name__}: {err}")


def _template_line(err: BaseException) -> int | None:
    """The template line in a runtime error's traceback (Jinja2 rewrites frames to <template>)."""
    line = None
    for frame in traceback.extract_tb(err.__traceback__ or sys.exc_info()[2]):
        if frame.filename == "<template>":
            line = frame.lineno
    return line
