"""Container inspect data -> the services it should register. Pure: no I/O.

Follows registrator's conventions: SERVICE_<KEY> and SERVICE_<port>_<KEY> from the container's
environment and labels (labels win over environment, per-port keys over generic ones), service
IDs <hostname>:<container>:<port>[:udp], one service per published port.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registrar.errors import LabelError
from registrar.model import STATUSES, Check, Service
from sidecar.durations import is_duration
from sidecar.text import UNSAFE

_YES = ("true", "1", "yes")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")  # what Consul and registrator accept
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_SERVICE_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,255}\Z")
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
_URL_PATH = re.compile(r"^/[\x21-\x7e]*\Z")
_URL = re.compile(r"^https?://[\x21-\x7e]+\Z")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.:\[\]-]+:\d{1,5}\Z")
_RESERVED = {"name", "tags", "id", "ignore", "register", "network"}
OWNER_META = "registrar_host"  # which registrar made a registration: its --hostname
# where an instance comes from, for whoever reads the Consul UI; set by the registrar only
ORIGIN_META = ("container_name", "container_id", "image", OWNER_META)
_CHECK_KINDS = ("http", "https", "tcp", "grpc", "script", "cmd", "ttl")
_CHECK_OPTIONS = ("interval", "timeout", "initial_status", "deregister_after", "tls_skip_verify", "http_method",
                  "https_method", "grpc_use_tls")  # fmt: skip
_YES_VALUES = ("1", "true", "yes")
_METHODS = ("GET", "HEAD", "POST", "PUT", "OPTIONS", "PATCH", "DELETE")
_CHECK_KEYS = {f"check_{k}" for k in (*_CHECK_KINDS, *_CHECK_OPTIONS)}
META_VALUE_MAX = 512
META_KEYS_MAX = 64


@dataclass(frozen=True)
class SpecSettings:
    hostname: str
    ip: str = ""
    internal: bool = False
    explicit: bool = False
    force_tags: tuple[str, ...] = ()
    use_ip_from_label: str = ""
    allow_script_checks: bool = False  # SERVICE_CHECK_SCRIPT runs label text on the host, via the agent
    require_label: bool = False  # registrator's -require-label: only containers with SERVICE_REGISTER=true
    network: str = ""  # --network: with --internal, the address on this network where the container has it


@dataclass
class SpecResult:
    services: list[Service] = field(default_factory=list)
    errors: list[LabelError] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # registered, with something to know


@dataclass(frozen=True)
class _Port:
    exposed: str  # container port number as text
    proto: str  # tcp or udp
    host_ip: str
    host_port: str  # "" when not published


@dataclass(frozen=True)
class _Value:
    label: str  # the key as the user wrote it, for error messages
    value: str


def network_owner(inspect: dict[str, Any]) -> str | None:
    """The container whose network namespace this one shares (`--net container:X`), if any."""
    mode = str((inspect.get("HostConfig") or {}).get("NetworkMode") or "")
    owner = mode.partition(":")[2] if mode.startswith("container:") else ""
    return owner or None


def with_network_of(inspect: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """A container in another's network namespace has no address or published port of its own:
    the owner's addresses are its, and so is the owner's binding of a port this one exposes
    (the owner's other ports are the owner's services). A copy; inspect is left as it is."""
    settings = dict(owner.get("NetworkSettings") or {})
    exposed = set((inspect.get("Config") or {}).get("ExposedPorts") or {})
    settings["Ports"] = {spec: b for spec, b in (settings.get("Ports") or {}).items() if spec in exposed}
    return {**inspect, "NetworkSettings": settings}


def container_name(inspect: dict[str, Any]) -> str:
    return str(inspect.get("Name") or inspect.get("Id", "")[:12]).lstrip("/")


def services_for(inspect: dict[str, Any], settings: SpecSettings) -> SpecResult:
    """Every service a running container should have, and every label error found."""
    result = SpecResult()
    name = container_name(inspect)
    config = inspect.get("Config") or {}
    raw = _service_values(config)
    ports = _ports(inspect)
    exposed_numbers = {p.exposed for p in ports}

    try:
        generic = _split(raw, exposed_numbers, name)
    except LabelError as err:
        result.errors.append(err)
        return result
    generic_values, per_port = generic

    if generic_values.get("ignore", _Value("", "")).value:
        result.skipped.append(f"container={name} SERVICE_IGNORE set")
        return result
    if settings.require_label and generic_values.get("register", _Value("", "")).value.lower() not in _YES:
        result.skipped.append(f"container={name} no SERVICE_REGISTER=true (--require-label)")
        return result

    try:
        ip_override = _ip_from_label(config, settings, name)
    except LabelError as err:
        result.errors.append(err)
        return result

    group = len(ports) > 1
    for port in sorted(ports, key=lambda p: (int(p.exposed), p.proto)):
        if not settings.internal and not port.host_port:
            continue
        values = dict(generic_values)
        values.update(per_port.get(port.exposed, {}))
        if values.get("ignore", _Value("", "")).value:
            result.skipped.append(f"container={name} port={port.exposed} SERVICE_IGNORE set")
            continue
        if settings.explicit and "name" not in values:
            continue
        try:
            service = _service(inspect, port, values, settings, ip_override, group, result.warnings)
        except LabelError as err:
            result.errors.append(err)
            continue
        result.services.append(service)
    docker_check = _docker_health_check(config)
    if docker_check:
        result.services = [_with_check(s, docker_check) for s in result.services]
    return result


def _with_check(service: Service, check: Check) -> Service:
    return Service(
        id=service.id,
        name=service.name,
        port=service.port,
        address=service.address,
        container_id=service.container_id,
        container_name=service.container_name,
        tags=service.tags,
        meta=service.meta,
        checks=(*service.checks, check),
    )


def _service_values(config: dict[str, Any]) -> dict[str, _Value]:
    """SERVICE_* from environment then labels; keys lower-cased without the prefix."""
    values: dict[str, _Value] = {}
    for entry in config.get("Env") or []:
        key, sep, value = entry.partition("=")
        if sep and key.startswith("SERVICE_"):
            values[key[len("SERVICE_") :].lower()] = _Value(key, value)
    for key, value in (config.get("Labels") or {}).items():
        if key.startswith("SERVICE_"):
            values[key[len("SERVICE_") :].lower()] = _Value(key, str(value))
    return values


def _split(
    values: dict[str, _Value], exposed: set[str], container: str
) -> tuple[dict[str, _Value], dict[str, dict[str, _Value]]]:
    generic: dict[str, _Value] = {}
    per_port: dict[str, dict[str, _Value]] = {}
    for key, value in values.items():
        head, sep, rest = key.partition("_")
        if head.isdigit() and sep and rest:
            if head not in exposed:
                raise LabelError(container, value.label, value.value, f"port {head} is not exposed")
            per_port.setdefault(head, {})[rest] = value
        else:
            generic[key] = value
    return generic, per_port


def _ports(inspect: dict[str, Any]) -> list[_Port]:
    """Exposed ports with their host binding; host networking publishes each exposed port."""
    config = inspect.get("Config") or {}
    network = inspect.get("NetworkSettings") or {}
    host_mode = (inspect.get("HostConfig") or {}).get("NetworkMode") == "host"
    found: dict[str, _Port] = {}
    for spec in config.get("ExposedPorts") or {}:
        number, _, proto = spec.partition("/")
        found[spec] = _Port(number, proto or "tcp", "0.0.0.0", number if host_mode else "")
    for spec, bindings in (network.get("Ports") or {}).items():
        number, _, proto = spec.partition("/")
        binding = _first_binding(bindings or [])
        found[spec] = _Port(
            number,
            proto or "tcp",
            (binding or {}).get("HostIp", "") or "0.0.0.0",
            str((binding or {}).get("HostPort", "") or ""),
        )
    # what the engine reports is a port number: anything else is no port of a service
    return [p for p in found.values() if p.exposed.isdigit() and 0 < int(p.exposed) < 65536]


def _first_binding(bindings: list[dict[str, str]]) -> dict[str, str] | None:
    """Prefer an IPv4 binding; Docker lists 0.0.0.0 and :: for the same published port."""
    for binding in bindings:
        if ":" not in (binding.get("HostIp") or ""):
            return binding
    return bindings[0] if bindings else None


def _container_ip(inspect: dict[str, Any], label: _Value | None, preferred: str, container: str) -> str:
    """The container's address: on the network its SERVICE_NETWORK label names (an error when
    it is not on it), else on the one --network names where it is on that one, else the default
    bridge's, else its first network's by name (the engine lists them in name order)."""
    settings = inspect.get("NetworkSettings") or {}
    networks = {str(k): v for k, v in (settings.get("Networks") or {}).items() if isinstance(v, dict)}
    if label is not None and label.value.strip():
        wanted = label.value.strip()
        found = networks.get(wanted)
        if not found or not found.get("IPAddress"):
            on = ", ".join(sorted(n for n, v in networks.items() if v.get("IPAddress"))) or "none with an address"
            raise LabelError(container, label.label, label.value, f"not one of the container's networks ({on})")
        return str(found["IPAddress"])
    if preferred and (networks.get(preferred) or {}).get("IPAddress"):
        return str(networks[preferred]["IPAddress"])
    if settings.get("IPAddress"):
        return str(settings["IPAddress"])
    for name in sorted(networks):
        if networks[name].get("IPAddress"):
            return str(networks[name]["IPAddress"])
    return ""


def _ip_from_label(config: dict[str, Any], settings: SpecSettings, container: str) -> str:
    if not settings.use_ip_from_label:
        return ""
    value = str((config.get("Labels") or {}).get(settings.use_ip_from_label, "")).strip()
    if not value:
        return ""
    address = value.split("/", 1)[0]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise LabelError(container, settings.use_ip_from_label, value, "not an IP address") from None
    return address


def _default_name(image: str, port: _Port, group: bool) -> str:
    base = posixpath.basename(image.split("@", 1)[0]).split(":", 1)[0]
    base = re.sub(r"[^A-Za-z0-9-]+", "-", base).strip("-")[:50] or "service"
    return f"{base}-{port.exposed}" if group else base


def _service(
    inspect: dict[str, Any],
    port: _Port,
    values: dict[str, _Value],
    settings: SpecSettings,
    ip_override: str,
    group: bool,
    warnings: list[str],
) -> Service:
    """warnings: what to say about a service registered all the same."""
    container = container_name(inspect)
    config = inspect.get("Config") or {}

    def bad(key: str, reason: str) -> LabelError:
        value = values[key]
        return LabelError(container, value.label, value.value, reason)

    if "name" in values:
        name = values["name"].value.strip()
        if not _SERVICE_NAME.match(name):
            raise bad("name", "service name may hold only letters, digits and '.', '_', '-' (max 255)")
        if not _DNS_LABEL.match(name):
            warnings.append(f"container={container} service={name}: not a DNS label, so not found through "
                            "Consul DNS (registered all the same, as registrator does)")  # fmt: skip
    else:
        name = _default_name(str(config.get("Image") or ""), port, group)
    address, number = _where(inspect, port, values.get("network"), settings, container)
    if ip_override:
        address = ip_override

    service_id = f"{settings.hostname}:{container}:{port.exposed}"
    if port.proto == "udp":
        service_id += ":udp"
    if "id" in values:
        service_id = values["id"].value.strip()
        if not _SERVICE_ID.match(service_id):
            raise bad("id", "service ID may hold only letters, digits and _.:@-")

    tags = _tags(values, settings, container)
    if port.proto == "udp" and "udp" not in tags:
        tags.append("udp")

    meta = {**_meta(values, bad, container), **_origin(inspect, container, settings.hostname)}

    check = _check(values, address or "127.0.0.1", number, bad, settings.allow_script_checks,
                   str(inspect.get("Id", "")), port.exposed)  # fmt: skip
    if check is not None and check.kind in ("http", "https") and "check_http" in values:
        # proxies that check actively (the HAProxy template) use the same path
        meta["check_http"] = values["check_http"].value.strip()
    return Service(
        id=service_id,
        name=name,
        port=number,
        address=address,
        container_id=str(inspect.get("Id", "")),
        container_name=container,
        tags=tuple(tags),
        meta=meta,
        checks=(check,) if check else (),
    )


def _where(
    inspect: dict[str, Any], port: _Port, network: _Value | None, settings: SpecSettings, container: str
) -> tuple[str, int]:
    """The address and port to register: the container's own with --internal, else the host's
    binding (--ip wins over the binding's address)."""
    if settings.internal:
        return _container_ip(inspect, network, settings.network, container) or settings.ip, int(port.exposed)
    address = port.host_ip if port.host_ip not in ("", "0.0.0.0", "::") else ""
    return settings.ip or address, int(port.host_port)


def _meta(values: dict[str, _Value], bad: Callable[[str, str], LabelError], container: str) -> dict[str, str]:
    """Every other SERVICE_<KEY> as meta <key>, each key and value checked."""
    meta: dict[str, str] = {}
    for key, value in sorted(values.items()):
        if key in _RESERVED or key.startswith("check_"):
            continue
        if not _META_KEY.match(key) or key.startswith("consul-"):
            raise bad(key, "meta key must be letters, digits, '_' or '-' (and not consul-*)")
        if key in ORIGIN_META:
            raise bad(key, f"meta key {key} is set by the registrar itself")
        if UNSAFE.search(value.value):
            raise bad(key, "meta value contains a control character or newline")
        if len(value.value) > META_VALUE_MAX:
            raise bad(key, f"meta value longer than {META_VALUE_MAX} characters")
        meta[key] = value.value
    if len(meta) > META_KEYS_MAX:
        raise LabelError(container, "SERVICE_*", str(len(meta)), f"more than {META_KEYS_MAX} meta keys")
    return meta


def _origin(inspect: dict[str, Any], container: str, hostname: str) -> dict[str, str]:
    """container_name, container_id (short), image, registrar_host: printable, bounded."""
    image = str((inspect.get("Config") or {}).get("Image") or "")
    values = {
        "container_name": container,
        "container_id": str(inspect.get("Id", ""))[:12],
        "image": image,
        OWNER_META: hostname,
    }
    return {k: UNSAFE.sub("?", v)[:META_VALUE_MAX] for k, v in values.items()}


def _tags(values: dict[str, _Value], settings: SpecSettings, container: str) -> list[str]:
    tags: list[str] = []
    raw = values.get("tags")
    if raw:
        for tag in raw.value.split(","):
            tag = tag.strip()
            if UNSAFE.search(tag):
                raise LabelError(container, raw.label, raw.value, "tag contains a control character or newline")
            if tag and tag not in tags:
                tags.append(tag)
    for tag in settings.force_tags:
        if tag not in tags:
            tags.append(tag)
    return tags


def _check(
    values: dict[str, _Value], host: str, port: int, bad: Any, allow_script: bool, container_id: str, exposed: str
) -> Check | None:
    """The service's check from its SERVICE_CHECK_* values; port: where the check reaches the
    service; exposed: the container's own port (registrator's check-cmd takes it)."""
    for key in sorted(values):
        if key.startswith("check_") and key not in _CHECK_KEYS:
            known = ", ".join(f"SERVICE_{k.upper()}" for k in sorted(_CHECK_KEYS))
            raise bad(key, f"unknown check setting (known: {known})")
    kinds = [k for k in _CHECK_KINDS if f"check_{k}" in values]
    if len(kinds) > 1:
        raise bad(f"check_{kinds[1]}", f"one check per service: SERVICE_CHECK_{kinds[0].upper()} is set too")
    if not kinds:
        return None
    kind = kinds[0]
    key = f"check_{kind}"
    if kind in ("script", "cmd") and not allow_script:
        raise bad(key, "script checks run label text on the host: the registrar needs --allow-script-checks")
    raw = values[key].value.strip()
    target = _check_target(kind, raw, host, port, lambda reason: bad(key, reason))
    args = ("check-cmd", container_id[:12], exposed, raw) if kind == "cmd" else ()
    options = _check_options(values, kind, bad)
    return Check(kind=kind, target=target if kind != "ttl" else "", ttl=raw if kind == "ttl" else None, args=args,
                 **options)  # fmt: skip


def _check_target(kind: str, raw: str, host: str, port: int, bad: Callable[[str], LabelError]) -> str:
    """What the check runs against: a URL, host:port, a gRPC target or the script's line."""
    host_port = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if kind in ("http", "https"):
        if _URL.match(raw):
            return raw
        if _URL_PATH.match(raw):
            return f"{kind}://{host_port}{raw}"
        raise bad("expected a path such as /health or a URL, without spaces")
    if kind in ("tcp", "grpc"):
        if raw.lower() in ("", "true", "1", "yes"):
            return host_port
        if kind == "tcp" and _HOST_PORT.match(raw):
            return raw
        if kind == "grpc" and re.fullmatch(r"[A-Za-z0-9_.-]+", raw):
            return f"{host_port}/{raw}"
        raise bad("expected true or host:port" if kind == "tcp" else "expected true or a gRPC service name")
    if kind in ("script", "cmd"):
        if not raw or UNSAFE.search(raw):
            raise bad("script must be one non-empty line")
        return raw.replace("$SERVICE_IP", host).replace("$SERVICE_PORT", str(port))
    if kind == "ttl" and not is_duration(raw):
        raise bad("TTL must be a duration such as 30s")
    return raw


def _check_options(values: dict[str, _Value], kind: str, bad: Any) -> dict[str, Any]:
    """The check's settings besides its kind: durations, initial status, TLS, HTTP method."""
    options: dict[str, Any] = {"interval": "10s"}
    for name in ("interval", "timeout", "deregister_after"):
        label = f"check_{name}"
        if label in values:
            text = values[label].value.strip()
            if not is_duration(text):
                raise bad(label, "expected a duration such as 10s, 500ms or 1m")
            options[name] = text
    if "check_initial_status" in values:
        status = values["check_initial_status"].value.strip().lower()
        if status not in STATUSES:
            raise bad("check_initial_status", "expected passing, warning or critical")
        options["initial_status"] = status
    options["tls_skip_verify"] = values.get("check_tls_skip_verify", _Value("", "")).value.lower() in _YES_VALUES
    if "check_grpc_use_tls" in values and kind != "grpc":
        raise bad("check_grpc_use_tls", f"a setting of SERVICE_CHECK_GRPC; this check is SERVICE_CHECK_{kind.upper()}")
    options["grpc_tls"] = values.get("check_grpc_use_tls", _Value("", "")).value.strip().lower() in _YES_VALUES
    for option in ("check_http_method", "check_https_method"):
        if option in values:
            if option != f"check_{kind}_method":
                checked = option.removeprefix("check_").removesuffix("_method").upper()
                raise bad(option, f"a method for SERVICE_CHECK_{checked}; this check is SERVICE_CHECK_{kind.upper()}")
            method = values[option].value.strip().upper()
            if method not in _METHODS:
                raise bad(option, f"expected an HTTP method: {', '.join(_METHODS)}")
            options["method"] = method
    return options


def _docker_health_check(config: dict[str, Any]) -> Check | None:
    test = (config.get("Healthcheck") or {}).get("Test") or []
    if not test or test[0] == "NONE":
        return None
    return Check(kind="docker", ttl=DOCKER_HEALTH_TTL)


DOCKER_HEALTH_TTL = "10m"
"""TTL of the check that mirrors Docker's health status. The registrar refreshes it far more
often; the long TTL keeps services routable through a registrar restart."""


def docker_health_status(inspect: dict[str, Any]) -> str | None:
    """Consul status for the container's Docker health, or None without a HEALTHCHECK."""
    health = (inspect.get("State") or {}).get("Health")
    if not health:
        return None
    return {"healthy": "passing", "unhealthy": "critical"}.get(health.get("Status", ""), "critical")
