"""External DNS: which records the catalog asks for, and what to change in a zone. Pure.

A routed service (an instance with meta `http_host`) gets a name whose A/AAAA records are the
addresses of the hosts whose proxy (the `ingress` service, registered by each host's templater)
passes its check. A service with meta `dns_name` gets records for its own instances: A/AAAA of
the passing ones, SRV with their ports, and one A/AAAA name per instance that the SRV targets.

Every name this writes carries an ownership TXT record (as Kubernetes external-dns does). Only
names under the suffix are ever looked at, and of those only the ones with our TXT are changed or
removed; a name someone else holds is left alone with a warning.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from templater.catalog import PASSING, Instance, Snapshot

MANAGED_TYPES = ("A", "AAAA", "SRV")  # rrsets an owned name gets whole; TXT only our own record
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # fullmatch: no "$" before a newline
_FIELDS = ("service", "environment", "zone", "dc")

Records = dict[str, frozenset[str]]  # rdtype -> rdata in presentation form
Zone = dict[str, Records]  # absolute name (lower case, trailing dot) -> its records


@dataclass(frozen=True)
class Naming:
    """How names are made: `template` is a str.format string over service, environment, zone, dc."""

    zone: str  # absolute, e.g. "example.test."
    environment: str = ""
    template: str = "{service}.{environment}.{zone}"
    owner: str = "default"
    ingress: str = "ingress"
    dc: str = ""

    @property
    def suffix(self) -> str:
        """Names this may own lie strictly under it: `<environment>.<zone>`, or the zone."""
        return absolute(f"{self.environment}.{self.zone}" if self.environment else self.zone)

    @property
    def owner_txt(self) -> str:
        return f'"heritage=consul-sidecar,owner={self.owner}"'


def absolute(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def check_template(template: str) -> None:
    """Raise ValueError naming what is wrong with a name template: plain {field}s only."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"name template {template!r}: {err}; fields are {', '.join(_FIELDS)}") from err
    for field_name, spec, conversion in fields:
        if field_name not in _FIELDS or spec or conversion:
            raise ValueError(f"name template {template!r}: {{{field_name}}} is not one of the fields, "
                             f"which are {', '.join(_FIELDS)}")  # fmt: skip


def name_problem(name: str, suffix: str) -> str | None:
    """Why `name` cannot be written (None: it can)."""
    if len(name) > 254:
        return "longer than 253 characters"
    if not under(name, suffix):
        return f"not under {suffix}"
    for label in name[: -len(suffix) - 1].split("."):
        if not _LABEL.fullmatch(label):
            return f"label {label!r} is not a DNS label (a-z, 0-9, '-', at most 63)"
    return None


def valid_domain(name: str) -> bool:
    """An absolute name of DNS labels (not the root)."""
    labels = name.rstrip(".").split(".")
    return name != "." and len(name) <= 254 and all(_LABEL.fullmatch(label) for label in labels)


def under(name: str, suffix: str) -> bool:
    return name != suffix and name.endswith("." + suffix)


def _address_records(addresses: Iterable[str]) -> Records:
    v4: set[str] = set()
    v6: set[str] = set()
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        (v4 if address.version == 4 else v6).add(str(address))
    records: Records = {}
    if v4:
        records["A"] = frozenset(v4)
    if v6:
        records["AAAA"] = frozenset(v6)
    return records


def _address(instance: Instance) -> str:
    return instance.address or instance.node_address


def instance_label(instance: Instance, taken: set[str]) -> str:
    """A DNS label for one instance: its container name where that is one, made unique."""
    base = re.sub(r"[^a-z0-9-]+", "-", (instance.meta.get("container_name") or instance.id).lower()).strip("-")[:50]
    label = base.strip("-") or "i"
    if label in taken:
        label = f"{label}-{hashlib.sha1(f'{instance.node}/{instance.id}'.encode()).hexdigest()[:8]}"
    taken.add(label)
    return label


@dataclass
class Desired:
    """The records the catalog asks for, and what was left out and why (said once each)."""

    names: Zone = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def desired(snapshot: Snapshot, naming: Naming) -> Desired:
    out = Desired()
    suffix = naming.suffix
    proxies = [i for i in snapshot.instances.get(naming.ingress, ()) if i.status == PASSING]
    ingress = _address_records(_address(i) for i in proxies)
    for proxy in proxies:
        if not _address_records([_address(proxy)]):
            out.warnings.append(f"dns: {naming.ingress} instance {proxy.id} on {proxy.node}: address "
                                f"{_address(proxy)!r} is not an IP address: left out")  # fmt: skip

    def claim(name_text: str, records: Records, service: str) -> str | None:
        name = absolute(name_text)
        problem = name_problem(name, suffix)
        if problem:
            out.warnings.append(f"dns: service {service}: name {name_text!r} left out: {problem}")
            return None
        if name in out.names:
            out.warnings.append(f"dns: service {service}: name {name} is already another service's: left out")
            return None
        out.names[name] = {**records, "TXT": frozenset({naming.owner_txt})}
        return name

    for service in sorted(snapshot.instances):
        if service == naming.ingress:
            continue
        instances = snapshot.instances[service]
        fields = {"service": service, "environment": naming.environment, "zone": naming.zone.rstrip("."),
                  "dc": naming.dc}  # fmt: skip
        if any(i.meta.get("http_host") for i in instances):
            claim(naming.template.format(**fields), ingress, service)
        dns_names = sorted({i.meta["dns_name"] for i in instances if i.meta.get("dns_name")})
        if dns_names:
            if len(dns_names) > 1:
                out.warnings.append(f"dns: service {service}: instances disagree on dns_name {dns_names}: "
                                    f"using {dns_names[0]!r}")  # fmt: skip
            _instance_records(out, claim, {**fields, "service": dns_names[0]}, naming, instances, service)
    return out


def _instance_records(
    out: Desired,
    claim: Callable[[str, Records, str], str | None],
    fields: dict[str, str],
    naming: Naming,
    instances: tuple[Instance, ...],
    service: str,
) -> None:
    passing = sorted((i for i in instances if i.status == PASSING), key=lambda i: (i.node, i.id))
    base = claim(naming.template.format(**fields), _address_records(_address(i) for i in passing), service)
    if base is None:
        return
    taken: set[str] = set()
    srv = set()
    for instance in passing:
        records = _address_records([_address(instance)])
        if not records:
            out.warnings.append(f"dns: service {service}: instance {instance.id} has no IP address: left out")
            continue
        target = claim(f"{instance_label(instance, taken)}.{base}", records, service)
        if target is not None:
            srv.add(f"1 1 {instance.port} {target}")
    if srv:
        out.names[base] = {**out.names[base], "SRV": frozenset(srv)}


@dataclass(frozen=True)
class NameChange:
    """One name's change: `create` a free name, or change/remove one we own."""

    name: str
    create: bool = False
    put: Records = field(default_factory=dict)  # rrsets to replace (rdtype -> rdata)
    drop: tuple[str, ...] = ()  # rrsets to delete whole
    drop_owner: bool = False  # delete our TXT record (the name is no longer ours)

    def text(self) -> str:
        """'create web.prod.example.test. A=127.0.2.1,127.0.2.2' for logs and --dry."""
        verb = "create" if self.create else "remove" if self.drop_owner else "change"
        parts = [f"{k}={','.join(sorted(v))}" for k, v in sorted(self.put.items())]
        parts += [f"-{k}" for k in self.drop if not self.drop_owner]
        return " ".join([verb, self.name, *parts])


@dataclass
class Plan:
    changes: list[NameChange] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # wanted names someone else holds

    def __bool__(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        created = sum(1 for c in self.changes if c.create)
        removed = sum(1 for c in self.changes if c.drop_owner)
        names = ", ".join(c.name for c in self.changes[:5]) + (", ..." if len(self.changes) > 5 else "")
        return f"{created} created, {len(self.changes) - created - removed} changed, {removed} removed ({names})"


def owned(records: Records, naming: Naming) -> bool:
    return naming.owner_txt in records.get("TXT", frozenset())


def plan(want: Zone, zone: Zone, naming: Naming) -> Plan:
    """What to send so that the names we own under the suffix are exactly `want`."""
    result = Plan()
    suffix = naming.suffix
    for name in sorted(want):
        have = zone.get(name)
        wanted = {k: v for k, v in want[name].items() if k != "TXT"}
        if not have:
            result.changes.append(NameChange(name, create=True, put=wanted))
            continue
        if not owned(have, naming):
            result.foreign.append(name)
            continue
        put = {k: v for k, v in wanted.items() if have.get(k) != v}
        drop = tuple(k for k in MANAGED_TYPES if k in have and k not in wanted)
        if put or drop:
            result.changes.append(NameChange(name, put=put, drop=drop))
    for name in sorted(zone):
        if name in want or not under(name, suffix) or not owned(zone[name], naming):
            continue
        drop = tuple(k for k in MANAGED_TYPES if k in zone[name])
        result.changes.append(NameChange(name, drop=drop, drop_owner=True))
    return result


def applied(zone: Zone, changes: list[NameChange], naming: Naming) -> Zone:
    """The zone as it is after the server took `changes` (our copy between two reads)."""
    out = dict(zone)
    for change in changes:
        records = dict(out.get(change.name, {}))
        for rdtype in change.drop:
            records.pop(rdtype, None)
        records.update(change.put)
        if change.create:
            records["TXT"] = records.get("TXT", frozenset()) | {naming.owner_txt}
        if change.drop_owner:
            records["TXT"] = records.get("TXT", frozenset()) - {naming.owner_txt}
        records = {k: v for k, v in records.items() if v}
        if records:
            out[change.name] = records
        else:
            out.pop(change.name, None)
    return out
