"""An authoritative DNS server spoken to with RFC 2136 dynamic updates signed with TSIG.

The zone is read by AXFR (with the same key) and changed by one UPDATE message per batch. Every
UPDATE carries prerequisites: a name it creates must be unused, a name it changes must still hold
a TXT record, so a record written by someone else between our read and our update is never
overwritten (the server refuses the whole message and the next sync reads the zone again).
dnspython's errors are mapped to DnsError, which says the server, the zone and what went wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update
import dns.xfr
import dns.zone

from sidecar.errors import SidecarError
from templater.dns_records import NameChange, Naming, Zone, under

MAX_NAMES_PER_UPDATE = 200  # keeps one UPDATE well inside a TCP message
_KEY = re.compile(
    r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{(?=[^}]*algorithm\s+"?(?P<alg>[^";\s]+)"?\s*;)'
    r'(?=[^}]*secret\s+"(?P<secret>[^"]+)"\s*;)[^}]*\}',
    re.S,
)


class DnsError(SidecarError):
    """The DNS server could not be read or refused an update; retried with backoff."""


class DnsConflict(DnsError):
    """An update's prerequisites failed: someone (another templater) changed a name meanwhile."""


@dataclass(frozen=True)
class TsigKey:
    name: str
    algorithm: str
    secret: str

    def __repr__(self) -> str:  # the secret never reaches a log line
        return f"TsigKey(name={self.name!r}, algorithm={self.algorithm!r})"


def read_key_file(path: Path) -> TsigKey:
    """The first key of a BIND key file, as `tsig-keygen` and `ddns-confgen` write it."""
    try:
        text = path.read_text()
    except OSError as err:
        raise DnsError(f"TSIG key file {path}: {err.strerror}") from err
    match = _KEY.search(text)
    if not match:
        raise DnsError(f'TSIG key file {path}: no key "NAME" {{ algorithm ...; secret "..."; }}; found')
    return TsigKey(match["name"], match["alg"].lower(), match["secret"])


class DnsServer:
    def __init__(self, host: str, port: int, naming: Naming, key: TsigKey | None, timeout: float = 3.0) -> None:
        self.host, self.port = host, port
        self.naming = naming
        self.zone = dns.name.from_text(naming.zone)
        self._key = key
        self._keyring = dns.tsigkeyring.from_text({key.name: (key.algorithm, key.secret)}) if key else None
        self._keyname = dns.name.from_text(key.name) if key else None
        self._algorithm = key.algorithm if key else dns.tsig.default_algorithm
        self._timeout = timeout

    @property
    def where(self) -> str:
        return f"DNS server {self.host}:{self.port} zone {self.naming.zone}"

    def _fail(self, action: str, err: BaseException) -> DnsError:
        key = f"TSIG key {self._key.name!r}" if self._key else "no TSIG key"
        if isinstance(err, dns.tsig.PeerBadKey):
            why = f"the server does not know {key} (BADKEY)"
        elif isinstance(err, dns.tsig.PeerBadSignature):
            why = f"the server rejected the signature of {key}: wrong secret or algorithm (BADSIG)"
        elif isinstance(err, dns.tsig.PeerBadTime):
            why = "the server rejected the signature's time (BADTIME): check the clocks"
        elif isinstance(err, OSError | dns.exception.Timeout):
            why = f"unreachable: {err}"
        else:
            why = f"{type(err).__name__}: {err}"
        return DnsError(f"{self.where}: {action} failed: {why}")

    def serial(self) -> int:
        """The zone's SOA serial: the server bumps it with every change, ours or anyone's."""
        query = dns.message.make_query(self.zone, "SOA")
        try:
            response = dns.query.udp(query, self.host, port=self.port, timeout=self._timeout)
        except (dns.exception.DNSException, OSError) as err:
            raise self._fail("SOA query", err) from err
        for rrset in response.answer:
            for rdata in rrset:
                if rdata.rdtype == dns.rdatatype.SOA:
                    return int(rdata.serial)
        raise DnsError(f"{self.where}: no SOA in the answer ({dns.rcode.to_text(response.rcode())}): "
                       "is the server authoritative for the zone?")  # fmt: skip

    def read(self) -> tuple[Zone, int]:
        """Every name of the zone strictly under the suffix, and the serial it had (AXFR)."""
        zone = dns.zone.Zone(self.zone)
        try:
            query, _ = dns.xfr.make_query(zone, keyring=self._keyring, keyname=self._keyname,
                                          keyalgorithm=self._algorithm)  # fmt: skip
            dns.query.inbound_xfr(self.host, zone, query, port=self.port, timeout=self._timeout,
                                  lifetime=self._timeout * 4)  # fmt: skip
        except dns.xfr.TransferError as err:
            raise DnsError(f"{self.where}: zone transfer refused ({dns.rcode.to_text(err.rcode)}): "
                           "allow-transfer must name the TSIG key") from err  # fmt: skip
        except (dns.exception.DNSException, OSError) as err:
            raise self._fail("zone transfer", err) from err
        suffix = self.naming.suffix
        out: Zone = {}
        soa = zone.get_soa()
        for rel, node in zone.nodes.items():
            name = rel.derelativize(self.zone).to_text().lower()
            if not under(name, suffix):  # the suffix itself and anything outside are never ours
                continue
            out[name] = {
                # names inside rdata (SRV targets) absolute, as the plan writes them
                dns.rdatatype.to_text(rds.rdtype): frozenset(
                    rd.to_text(origin=self.zone, relativize=False) for rd in rds
                )
                for rds in node.rdatasets
            }
        return out, int(soa.serial)

    def update(self, changes: list[NameChange], ttl: int) -> int:
        """Send the changes; the number of UPDATE messages it took."""
        messages = 0
        for start in range(0, len(changes), MAX_NAMES_PER_UPDATE):
            self._send(changes[start : start + MAX_NAMES_PER_UPDATE], ttl)
            messages += 1
        return messages

    def _send(self, changes: list[NameChange], ttl: int) -> None:
        msg = dns.update.UpdateMessage(
            self.zone, keyring=self._keyring, keyname=self._keyname, keyalgorithm=self._algorithm
        )
        owner = self.naming.owner_txt
        for change in changes:
            name = dns.name.from_text(change.name)
            if change.create:
                msg.absent(name)
                msg.add(name, ttl, "TXT", owner)
            else:
                msg.present(name, "TXT")
            for rdtype in change.drop:
                msg.delete(name, rdtype)
            for rdtype, values in sorted(change.put.items()):
                if not change.create:
                    msg.delete(name, rdtype)
                for value in sorted(values):
                    msg.add(name, ttl, rdtype, value)
            if change.drop_owner:
                msg.delete(name, "TXT", owner)
        try:
            response = dns.query.tcp(msg, self.host, port=self.port, timeout=self._timeout)
        except (dns.exception.DNSException, OSError) as err:
            raise self._fail("update", err) from err
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            why = {
                dns.rcode.REFUSED: "REFUSED: allow-update must name the TSIG key",
                dns.rcode.NOTAUTH: "NOTAUTH: the server is not authoritative for the zone, or the key is wrong",
                dns.rcode.YXDOMAIN: "YXDOMAIN: a name it was to create exists now (written meanwhile)",
                dns.rcode.NXRRSET: "NXRRSET: a name it owns lost its TXT record meanwhile",
            }.get(rcode, dns.rcode.to_text(rcode))
            error = DnsConflict if rcode in (dns.rcode.YXDOMAIN, dns.rcode.NXRRSET) else DnsError
            raise error(f"{self.where}: update of {len(changes)} name(s) refused: {why}")
