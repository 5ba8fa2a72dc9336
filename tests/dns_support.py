"""A real BIND 9 for the tests and the bench: an authoritative primary on a loopback port with a
dynamic zone that a TSIG key may update and transfer; dig and nsupdate as a person uses them."""

from __future__ import annotations

import signal
import subprocess
import textwrap
from pathlib import Path

from sidecar.signals import terminate
from tests.support import free_port, wait_until

KEY_NAME = "sidecar-key"


def dig(port: int, name: str, rdtype: str = "A", server: str = "127.0.0.1", tcp: bool = False) -> list[str]:
    """The answer section as `dig +short` prints it, sorted; [] for NXDOMAIN or no data."""
    args = ["dig", f"@{server}", "-p", str(port), name, rdtype, "+short", "+time=2", "+tries=1"]
    if tcp:
        args.append("+tcp")
    out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout
    return sorted(line for line in out.splitlines() if line and not line.startswith(";"))


def dig_output(port: int, name: str, rdtype: str = "A", server: str = "127.0.0.1") -> str:
    """dig's whole answer: header, answer and additional sections."""
    return subprocess.run(["dig", f"@{server}", "-p", str(port), name, rdtype, "+time=2", "+tries=1"],
                          capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip


def dig_status(port: int, name: str, rdtype: str = "A", server: str = "127.0.0.1") -> str:
    """NOERROR, NXDOMAIN, ... from dig's header."""
    out = dig_output(port, name, rdtype, server)
    for line in out.splitlines():
        if "status:" in line:
            return line.split("status:", 1)[1].split(",", 1)[0].strip()
    raise AssertionError(f"no status in dig output: {out}")


class BindServer:
    """named -g on 127.0.0.1:<port>, authoritative for `zone` only: no recursion, no DNSSEC
    validation (so it never primes the root servers: no traffic leaves the machine)."""

    def __init__(self, workdir: Path, zone: str = "example.test", extra_records: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.zone = zone
        self.port = free_port()
        self.key_file = self.dir / "tsig.key"
        self.extra_records = extra_records
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "named.log"

    def start(self) -> None:
        if not self.key_file.exists():
            key = subprocess.run(["tsig-keygen", "-a", "hmac-sha256", KEY_NAME], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
            self.key_file.write_text(key)
            self.key_file.chmod(0o600)
        zone_file = self.dir / f"{self.zone}.zone"
        zone_file.write_text(textwrap.dedent(f"""\
            $TTL 60
            @ IN SOA ns.{self.zone}. hostmaster.{self.zone}. 1 60 60 3600 5
            @ IN NS ns.{self.zone}.
            ns IN A 127.0.0.1
            """) + self.extra_records)  # fmt: skip
        for journal in self.dir.glob("*.jnl"):
            journal.unlink()
        conf = self.dir / "named.conf"
        conf.write_text(textwrap.dedent(f"""\
            include "{self.key_file}";
            options {{
              directory "{self.dir}";
              pid-file "{self.dir}/named.pid";
              listen-on port {self.port} {{ 127.0.0.1; }};
              listen-on-v6 {{ none; }};
              recursion no;
              notify no;
              dnssec-validation no;
              empty-zones-enable no;
              allow-query {{ 127.0.0.0/8; }};
            }};
            controls {{ }};
            zone "{self.zone}" {{
              type primary;
              file "{zone_file}";
              allow-update {{ key "{KEY_NAME}"; }};
              allow-transfer {{ key "{KEY_NAME}"; }};
            }};
            """))  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(["named", "-g", "-4", "-n", "1", "-c", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        log.close()
        wait_until(lambda: (self.alive() and dig(self.port, f"ns.{self.zone}") == ["127.0.0.1"]) or self._dead(),
                   timeout=15, what="named answering")  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _dead(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"named exited: {self.log_path.read_text()[-2000:]}")
        return False

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, signal.SIGTERM, 10, "named")
        self.proc = None

    def nsupdate(self, commands: str, key_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Change the zone by hand, as an operator would (nsupdate -k)."""
        script = f"server 127.0.0.1 {self.port}\nzone {self.zone}\n{commands.strip()}\nsend\n"
        return subprocess.run(["nsupdate", "-k", str(key_file or self.key_file)], input=script, capture_output=True,
                              text=True, timeout=15)  # fmt: skip

    def names(self) -> dict[str, list[str]]:
        """The whole zone by AXFR (dig -y), as `name type -> rdata` lines."""
        out = subprocess.run(["dig", "-p", str(self.port), "@127.0.0.1", "-k", str(self.key_file), self.zone,
                              "AXFR", "+onesoa", "+nocmd", "+nocomments", "+nostats"],
                             capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
        zone: dict[str, list[str]] = {}
        for line in out.splitlines():
            parts = line.split(None, 4)
            if len(parts) == 5 and parts[3] not in ("SOA", "TSIG"):
                zone.setdefault(f"{parts[0]} {parts[3]}", []).append(parts[4])
        return {k: sorted(v) for k, v in sorted(zone.items())}
