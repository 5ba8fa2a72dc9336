"""consul-template's template functions over the templater's own reads (issue 23).

A `.ctmpl` or `.tmpl` template (or one a consul-template config file names) is Go's
text/template (templater.gotemplate) with these functions. They read Consul through the same
render recorder as the Jinja functions (templater.render: the same watches, store, empty-set
grace, stale handling and dependency recording), and hand out values under consul-template's
names: a service's `.Name .ID .Address .Port .Tags .ServiceMeta .Node .NodeAddress .NodeMeta
.NodeDatacenter .Status .Checks`, a key's `.Key .Value .Path`, a node's `.Node .Address .Meta`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from templater.catalog import CRITICAL, MAINTENANCE, PASSING, WARNING, Check
from templater.gotemplate import GoTemplateError, execute, parse
from templater.gotemplate.compiled import Compiler, Fallback
from templater.gotemplate.execute import BUILTINS

# -- the values templates see


class ServiceTags(tuple):  # type: ignore[type-arg]
    """A service's tags; `.Tags.Contains "x"` as in consul-template."""

    def Contains(self, tag: str) -> bool:
        return tag in self


class HealthCheck:
    """One check in `.Checks`, under consul-template's (Consul API's) field names."""

    __slots__ = ("CheckID", "Name", "Node", "Notes", "Output", "ServiceID", "ServiceName", "ServiceTags",
                 "Status", "Type")  # fmt: skip

    def __init__(self, check: Check, tags: tuple[str, ...]) -> None:
        self.Node, self.CheckID, self.Name, self.Status = check.node, check.check_id, check.name, check.status
        self.Notes, self.Output, self.Type = check.notes, check.output, check.type
        self.ServiceID, self.ServiceName = check.service_id, check.service_name
        self.ServiceTags = ServiceTags(tags if check.service_id else ())

    Namespace = property(lambda self: "")


class HealthChecks(list):  # type: ignore[type-arg]
    """An instance's checks; `.Checks.AggregatedStatus` as in Consul's API."""

    def AggregatedStatus(self) -> str:
        statuses = set()
        for check in self:
            if check.CheckID == "_node_maintenance" or check.CheckID.startswith("_service_maintenance:"):
                return MAINTENANCE
            statuses.add(check.Status)
        for status in (CRITICAL, WARNING, PASSING):
            if status in statuses:
                return status
        return PASSING


class HealthService:
    """One instance as consul-template's `service` lists it."""

    __slots__ = ("_checks_of", "_dc", "_i", "_node_meta")

    def __init__(
        self, instance: Any, dc: str, node_meta: Mapping[str, str], checks_of: Callable[..., tuple[Check, ...]]
    ) -> None:
        self._i, self._dc, self._node_meta, self._checks_of = instance, dc, node_meta, checks_of

    @property
    def Checks(self) -> HealthChecks:
        tags = self._i.tags
        return HealthChecks(HealthCheck(c, tags) for c in self._checks_of(self._i, self._dc or None))

    Name = property(lambda self: self._i.name)
    ID = property(lambda self: self._i.id)
    Address = property(lambda self: self._i.address)
    Port = property(lambda self: self._i.port)
    Tags = property(lambda self: ServiceTags(self._i.tags))
    ServiceMeta = property(lambda self: self._i.meta)
    Node = property(lambda self: self._i.node)
    NodeAddress = property(lambda self: self._i.node_address)
    NodeID = property(lambda self: "")
    NodeMeta = property(lambda self: self._node_meta)
    NodeDatacenter = property(lambda self: self._dc)
    Status = property(lambda self: self._i.status)
    Kind = property(lambda self: "")
    Weights = property(lambda self: {"Passing": 1, "Warning": 1})

    def go_string(self) -> str:
        return f"&{{{self.Node} {self.NodeAddress} {self.Address} {self.ID} {self.Name} {list(self.Tags)} {self.Port}}}"


class CatalogSnippet:
    __slots__ = ("Name", "Tags")

    def __init__(self, name: str, tags: Iterable[str]) -> None:
        self.Name, self.Tags = name, ServiceTags(tags)


class Node:
    __slots__ = ("Address", "Datacenter", "ID", "Meta", "Node", "TaggedAddresses")

    def __init__(self, name: str, address: str, meta: Mapping[str, str], dc: str) -> None:
        self.Node, self.Address, self.Meta, self.Datacenter = name, address, meta, dc
        self.ID = ""
        self.TaggedAddresses: dict[str, str] = {}


class CatalogNode:
    __slots__ = ("Node", "Services")

    def __init__(self, node: Node, services: list[Any]) -> None:
        self.Node, self.Services = node, services


class CatalogNodeService:
    __slots__ = ("Address", "ID", "Meta", "Port", "Service", "Tags")

    def __init__(self, instance: Any) -> None:
        self.ID, self.Service, self.Tags = instance.id, instance.name, ServiceTags(instance.tags)
        self.Meta, self.Port, self.Address = instance.meta, instance.port, instance.address


class KeyPair:
    __slots__ = ("CreateIndex", "Exists", "Flags", "Key", "LockIndex", "ModifyIndex", "Path", "Session", "Value")

    def __init__(self, path: str, key: str, value: str) -> None:
        self.Path, self.Key, self.Value, self.Exists = path, key, value, True
        self.CreateIndex = self.ModifyIndex = self.LockIndex = self.Flags = 0
        self.Session = ""


class Scratch:
    """consul-template's `scratch`: a template's own key-value store while it renders."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def Key(self, key: str) -> bool:
        return key in self._values

    def Get(self, key: str) -> Any:
        return self._values.get(key)

    def Set(self, key: str, value: Any) -> str:
        self._values[key] = value
        return ""

    def SetX(self, key: str, value: Any) -> str:
        self._values.setdefault(key, value)
        return ""

    def MapSet(self, key: str, mkey: str, value: Any) -> str:
        self._values.setdefault(key, {})[mkey] = value
        return ""

    def MapSetX(self, key: str, mkey: str, value: Any) -> str:
        self._values.setdefault(key, {}).setdefault(mkey, value)
        return ""

    def MapValues(self, key: str) -> list[Any]:
        found = self._values.get(key) or {}
        return [found[k] for k in sorted(found)]


# -- the query syntax

_SERVICE = re.compile(r"^(?:(?P<tag>[^.@|~]+)\.)?(?P<name>[^.@|~][^@|~]*?)(?:@(?P<dc>[^|~]+))?(?:~(?P<near>[^|]+))?$")
_STATUSES = {"passing", "warning", "critical", "maintenance"}
_PASSING = frozenset([PASSING])


@functools.lru_cache(maxsize=65536)  # a listing asks for every service each render
def service_query(text: str) -> tuple[str, str | None, str | None, frozenset[str] | None]:
    """`tag.name@dc~near|passing,warning` as (name, tag, dc, statuses; None: any)."""
    query, _, options = text.partition("|")
    match = _SERVICE.match(query.strip())
    if match is None:
        raise GoTemplateError(f'invalid service query "{text}"')
    statuses: frozenset[str] | None = _PASSING
    if options:
        wanted = frozenset(o.strip() for o in options.split(",") if o.strip())
        if "any" in wanted:
            statuses = None
        elif not wanted <= _STATUSES:
            raise GoTemplateError(f'invalid health status in "{text}": {", ".join(sorted(wanted - _STATUSES))}')
        else:
            statuses = wanted
    return match["name"], match["tag"], match["dc"], statuses


def key_query(text: str) -> tuple[str, str | None]:
    path, _, dc = text.partition("@")
    return path, dc or None


# -- the function map


def function_map(context: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """consul-template's functions over one render's recorder functions (render.py's context)."""
    scratch = Scratch()
    return {
        **_catalog_functions(context),
        **_kv_functions(context),
        "datacenters": lambda *_ignore_inaccessible: list(context["datacenters"]()),
        "env": lambda name: str(context["env"](name)),
        "scratch": lambda: scratch,
        **PURE,
    }


def _catalog_functions(context: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """service, services, node and nodes, with consul-template's query syntax and values."""
    rec_service, rec_services, rec_nodes = context["service"], context["services"], context["nodes"]
    checks_of = context["checks_of"]
    node_meta: dict[str, Mapping[str, Mapping[str, str]]] = {}

    def meta_of(dc: str | None) -> Mapping[str, Mapping[str, str]]:
        if (dc or "") not in node_meta:
            node_meta[dc or ""] = {n["name"]: n["meta"] for n in rec_nodes(dc)}
        return node_meta[dc or ""]

    def service(query: str, *options: str) -> list[HealthService]:
        if options:
            raise GoTemplateError('service: give its options after a "|" ("web|any", "web|passing,warning")')
        name, tag, dc, statuses = service_query(query)
        found = rec_service(name, tag, "any" if statuses != _PASSING else PASSING, dc)
        metas = meta_of(dc) if found else {}
        return [
            HealthService(i, dc or "", metas.get(i.node, {}), checks_of)
            for i in found
            if statuses is None or i.status in statuses
        ]

    def services(query: str = "") -> list[CatalogSnippet]:
        dc = query.lstrip("@") or None if query else None
        return [CatalogSnippet(s["name"], s["tags"]) for s in rec_services(dc)]

    def nodes(query: str = "") -> list[Node]:
        dc = query.lstrip("@") or None if query else None
        return [Node(n["name"], n["address"], n["meta"], dc or "") for n in rec_nodes(dc)]

    def node(query: str = "") -> CatalogNode | None:
        name, _, dc = query.partition("@")
        if not name:
            name = context["agent_node"]()  # the agent's own node, as consul-template's `node`
            if not name:
                return None  # not read yet: the render waits for it
        for n in rec_nodes(dc or None):
            if n["name"] == name:
                found = context["catalog_node"](name, dc or None)
                return CatalogNode(Node(name, n["address"], n["meta"], dc), [CatalogNodeService(i) for i in found])
        return None

    return {"service": service, "services": services, "node": node, "nodes": nodes}


def _kv_functions(context: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """key, keyOrDefault, keyExists, ls, safeLs, tree and safeTree (`path@dc` queries)."""

    def key(query: str) -> str:
        path, dc = key_query(query)
        return str(context["key"](path, dc))

    def key_or_default(query: str, default: str) -> str:
        path, dc = key_query(query)
        return str(context["key_or_default"](path, default, dc))

    def key_exists(query: str) -> bool:
        path, dc = key_query(query)
        return bool(context["key_exists"](path, dc))

    def pairs(items: list[dict[str, str]]) -> list[KeyPair]:
        return [KeyPair(i["path"], i["key"], i["value"]) for i in items]

    def ls(query: str) -> list[KeyPair]:
        path, dc = key_query(query)
        return pairs(context["ls"](path, dc))

    def tree(query: str) -> list[KeyPair]:
        path, dc = key_query(query)
        return pairs(context["tree"](path, dc))

    def safe(read: Callable[[str], list[KeyPair]]) -> Callable[[str], list[KeyPair]]:
        def guarded(query: str) -> list[KeyPair]:  # an empty prefix holds the render (an outage looks empty)
            found = read(query)
            if not found:
                path, dc = key_query(query)
                context["key"](path.rstrip("/") + "/", dc)  # records it as missing, holding the render
            return found

        return guarded

    return {
        "key": key, "keyOrDefault": key_or_default, "keyExists": key_exists,
        "ls": ls, "safeLs": safe(ls), "tree": tree, "safeTree": safe(tree),
    }  # fmt: skip


# -- consul-template's pure helpers (dependency-free): argument orders as consul-template's


def _in(items: Any, value: Any) -> bool:
    if isinstance(items, str):
        return isinstance(value, str) and value in items
    if isinstance(items, Mapping):
        return value in items
    if isinstance(items, (list, tuple)):
        return value in items
    raise GoTemplateError(f"in: cannot look in a {type(items).__name__}")


def _contains_some(all_of: bool, invert: bool) -> Callable[[Any, Any], bool]:
    def check(values: Any, items: Any) -> bool:
        if not isinstance(values, (list, tuple)):
            raise GoTemplateError("expected a list of values to look for")
        found = [_in(items, v) for v in values]
        result = all(found) if all_of else any(found)
        return not result if invert else result

    return check


def _by_tag(services: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for s in services:
        for tag in dict.fromkeys(s.Tags):
            out.setdefault(tag, []).append(s)
    return out


def _by_meta(key: str, services: Iterable[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for s in services:
        out.setdefault(str(s.ServiceMeta.get(key, "")), []).append(s)
    return out


def _by_key(pairs: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Pairs by the first part of their key: {top: {rest of key: pair}}."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        top, _, rest = pair.Key.partition("/")
        if rest:
            copy = KeyPair(pair.Path, rest, pair.Value)
            out.setdefault(top, {})[rest] = copy
    return out


def _explode(pairs: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        _place(out, pair.Key.strip("/").split("/"), pair.Value)
    return out


def _place(out: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        node = out.get(part)
        if not isinstance(node, dict):
            node = out[part] = {}
        out = node
    if parts[-1]:
        out[parts[-1]] = value


def _explode_map(mapping: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(mapping):
        _place(out, key.strip("/").split("/"), mapping[key])
    return out


def _merge(dst: Mapping[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(dst)
    for key, value in src.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = _merge(out[key], value)
    return out


def _go_json(value: Any) -> Any:
    """Values as json.Marshal sees them (consul-template's objects as their fields)."""
    if isinstance(value, Mapping):
        return {str(k): _go_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_go_json(v) for v in value]
    if isinstance(value, HealthService):
        return {n: _go_json(getattr(value, n)) for n in _HEALTH_FIELDS}
    if hasattr(value, "__slots__") and not isinstance(value, (str, bytes)):
        return {n: _go_json(getattr(value, n)) for n in type(value).__slots__}
    return value


_HEALTH_FIELDS = ("Node", "NodeAddress", "NodeDatacenter", "NodeMeta", "Address", "ID", "Name", "Tags", "ServiceMeta",
                  "Port", "Status", "Checks")  # fmt: skip


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return float(value)
        raise GoTemplateError(f"not a number: {value!r}")
    return value


def _divide(b: Any, a: Any) -> Any:
    x, y = _number(a), _number(b)
    if y == 0:
        raise GoTemplateError("division by zero")
    return x // y if isinstance(x, int) and isinstance(y, int) else x / y


def _parse_bool(text: str) -> bool:
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise GoTemplateError(f'strconv.ParseBool: parsing "{text}": invalid syntax')


def _parse_int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise GoTemplateError(f'strconv.ParseInt: parsing "{text}": invalid syntax') from None


def _loop(*bounds: Any) -> list[int]:
    if len(bounds) == 1:
        return list(range(int(bounds[0])))
    if len(bounds) == 2:
        return list(range(int(bounds[0]), int(bounds[1])))
    raise GoTemplateError(f"loop: wrong number of arguments, expected 1 or 2, but got {len(bounds)}")


# Go's reference time (Mon Jan 2 15:04:05 MST 2006) written in a layout, longest first
_GO_LAYOUT = re.compile(
    r"January|Monday|2006|Jan|Mon|MST|Z07:00|-07:00|-0700|Z0700|\.000000|\.000|01|02|_2|15|03|04|05|06|PM|pm|1|2|3|4|5"
)


def go_time_format(moment: time.struct_time, fraction: float, layout: str) -> str:
    """time.Time.Format for a UTC time: Go's layout tokens, everything else as written. Pure."""

    nanos = round(fraction * 1_000_000_000)  # Go truncates to the digits a layout asks for

    def token(match: re.Match[str]) -> str:
        t = match.group(0)
        hour12 = moment.tm_hour % 12 or 12
        values = {
            "January": time.strftime("%B", moment), "Jan": time.strftime("%b", moment),
            "Monday": time.strftime("%A", moment), "Mon": time.strftime("%a", moment),
            "2006": f"{moment.tm_year:04d}", "06": f"{moment.tm_year % 100:02d}",
            "01": f"{moment.tm_mon:02d}", "1": str(moment.tm_mon), "02": f"{moment.tm_mday:02d}",
            "_2": f"{moment.tm_mday:2d}", "2": str(moment.tm_mday), "15": f"{moment.tm_hour:02d}",
            "03": f"{hour12:02d}", "3": str(hour12), "04": f"{moment.tm_min:02d}", "4": str(moment.tm_min),
            "05": f"{moment.tm_sec:02d}", "5": str(moment.tm_sec), "PM": "PM" if moment.tm_hour >= 12 else "AM",
            "pm": "pm" if moment.tm_hour >= 12 else "am", "MST": "UTC", "Z07:00": "Z", "Z0700": "Z",
            "-07:00": "+00:00", "-0700": "+0000", ".000": f".{nanos // 1_000_000:03d}",
            ".000000": f".{nanos // 1000:06d}",
        }  # fmt: skip
        return values[t]

    return _GO_LAYOUT.sub(token, layout)


def _timestamp(*layout: str) -> str:
    """consul-template's timestamp: now in UTC, RFC 3339 by default, "unix", or a Go layout."""
    now = time.time()
    if layout and layout[0] == "unix":
        return str(int(now))
    return go_time_format(time.gmtime(now), now % 1, layout[0] if layout else "2006-01-02T15:04:05Z07:00")


def _indent(spaces: int, text: str) -> str:
    if spaces < 0:
        raise GoTemplateError("indent value must be a positive integer")
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.split("\n"))


def _disabled(name: str, why: str) -> Callable[..., Any]:
    def refuse(*_args: Any) -> Any:
        raise GoTemplateError(f"function {name} is disabled: {why}")

    return refuse


PURE: dict[str, Callable[..., Any]] = {
    "byKey": _by_key,
    "byTag": _by_tag,
    "byMeta": _by_meta,
    "contains": lambda v, items: _in(items, v),
    "containsAll": _contains_some(True, False),
    "containsAny": _contains_some(False, False),
    "containsNone": _contains_some(False, True),
    "containsNotAll": _contains_some(True, True),
    "in": _in,
    "join": lambda sep, items: sep.join(str(i) for i in items),
    "split": lambda sep, text: text.split(sep) if text else [],
    "trimSpace": lambda text: text.strip(),
    "replaceAll": lambda old, new, text: text.replace(old, new),
    "regexMatch": lambda pattern, text: re.search(pattern, text) is not None,
    "regexReplaceAll": lambda pattern, repl, text: re.sub(pattern, re.sub(r"\$\{?(\d+)\}?", r"\\\1", repl), text),
    "toLower": lambda text: text.lower(),
    "toUpper": lambda text: text.upper(),
    "toTitle": lambda text: re.sub(r"(^|[^\w'])(\w)", lambda m: m.group(1) + m.group(2).upper(), text),
    "toJSON": lambda value: json.dumps(_go_json(value), separators=(",", ":"), sort_keys=True),
    "toJSONPretty": lambda value: json.dumps(_go_json(value), indent=2, sort_keys=True),
    "parseJSON": lambda text: json.loads(text) if text else {},
    "parseInt": _parse_int,
    "parseFloat": lambda text: float(text),
    "parseBool": _parse_bool,
    "base64Encode": lambda text: base64.b64encode(text.encode()).decode(),
    "base64Decode": lambda text: base64.b64decode(text).decode(),
    "sha256Hex": lambda text: hashlib.sha256(text.encode()).hexdigest(),
    "md5sum": lambda text: hashlib.md5(text.encode(), usedforsecurity=False).hexdigest(),
    "timestamp": _timestamp,
    "loop": _loop,
    "add": lambda b, a: _number(a) + _number(b),
    "subtract": lambda b, a: _number(a) - _number(b),
    "multiply": lambda b, a: _number(a) * _number(b),
    "divide": _divide,
    "modulo": lambda b, a: _number(a) % _number(b),
    "minimum": lambda b, a: min(_number(a), _number(b)),
    "maximum": lambda b, a: max(_number(a), _number(b)),
    "indent": _indent,
    "explode": _explode,
    "explodeMap": _explode_map,
    "mergeMap": _merge,
    "file": _disabled("file", "templates read Consul here, not the host's files"),
    "plugin": _disabled("plugin", "templates cannot run programs here"),
    "writeToFile": _disabled("writeToFile", "templates cannot write files here"),
    "executeTemplate": _disabled("executeTemplate", 'use {{ template "name" . }}'),
    **{name: _disabled(name, "Vault is not supported") for name in ("secret", "secrets", "pkiCert")},
    **{
        name: _disabled(name, "Nomad is not supported")
        for name in ("nomadServices", "nomadService", "nomadVariables", "nomadVariableItems", "nomadVariableExists")
    },
}

_READS = "service services node nodes datacenters key keyOrDefault keyExists ls safeLs tree safeTree env scratch"
KNOWN = frozenset(BUILTINS) | frozenset(PURE) | frozenset(_READS.split())


class GoTemplate:
    """A consul-template (Go) template, compiled once; render(context) as a Jinja template's."""

    def __init__(self, name: str, source: str, delimiters: tuple[str, str] = ("{{", "}}"), strict: bool = True) -> None:
        self.name = name
        self.strict = strict  # a missing map key fails the render (error_on_missing_key = true)
        self.trees = parse(name, source, KNOWN.__contains__, *delimiters)
        try:
            self.compiled: Compiler | None = Compiler(self.trees)
        except Fallback:
            self.compiled = None

    def render(self, context: Mapping[str, Any]) -> str:
        """The compiled closures' text; what they hand back (anything unusual, any error) the
        reference executor renders, so its result and messages are Go's."""
        if self.compiled is not None:
            try:
                return self.compiled.run(self.name, None, function_map(context), self.strict)
            except Fallback:
                pass
        return execute(self.trees, self.name, None, function_map(context), strict=self.strict)
