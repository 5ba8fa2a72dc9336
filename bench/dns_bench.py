"""External DNS figures: a real Consul agent, a real BIND 9, the templater in DNS mode.

Prints, for N routed names (default 200) behind 2 proxy hosts:
- a routed service added / removed in Consul -> its name answers / stops answering at the DNS
  server (p50, p90, p99, max over --changes samples), and UPDATE messages per change;
- a proxy host added and removed (all N names change) -> every name answers with it, and the
  UPDATE messages that took;
- the templater's RSS.
Run: .venv/bin/python bench/dns_bench.py [--names 200] [--changes 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import percentile
from tests.dns_support import BindServer
from tests.support import ConsulAgent, Process, free_port, scrape, tempdir, wait_until

ZONE = "example.test"


def answer(port: int, name: str) -> set[str]:
    """The A records of name at the server, by UDP: what a resolver would get."""
    response = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
    if response.rcode() != dns.rcode.NOERROR:
        return set()
    return {rd.to_text() for rrset in response.answer for rd in rrset}


def poll(port: int, name: str, want: set[str]) -> None:
    deadline = time.monotonic() + 30
    while answer(port, name) != want:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} never answered {want}")
        time.sleep(0.002)


def updates(status: int) -> float:
    return scrape(status)["templater_dns_updates_total"]


def ingress(consul: ConsulAgent, host: str, address: str) -> None:
    consul.put("/v1/agent/service/register", {
        "ID": f"ingress:{host}", "Name": "ingress", "Address": address, "Port": 80,
        "Check": {"CheckID": f"service:ingress:{host}", "TTL": "10m", "Status": "passing"},
    })  # fmt: skip


def routed(consul: ConsulAgent, n: int) -> None:
    meta = {"http_host": f"r{n}.example.test"}
    consul.put("/v1/agent/service/register", {"ID": f"r{n}", "Name": f"r{n}", "Port": 9000, "Address": "127.0.0.1",
                                            "Meta": meta})  # fmt: skip


def figures(label: str, values: list[float]) -> None:
    ms = [v * 1000 for v in values]
    print(f"{label:44} p50 {percentile(ms, 50):6.1f} ms  p90 {percentile(ms, 90):6.1f} ms  "
          f"p99 {percentile(ms, 99):6.1f} ms  max {max(ms):6.1f} ms  (n={len(ms)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", type=int, default=200)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    with tempdir() as work:
        consul = ConsulAgent(work)
        bind = BindServer(work / "bind", ZONE)
        consul.start()
        bind.start()
        proc = None
        try:
            for host, address in (("a", "127.0.2.1"), ("b", "127.0.2.2")):
                ingress(consul, host, address)
            for n in range(args.names):
                routed(consul, n)
            status = free_port()
            proc = Process("templater", [
                "--consul", consul.url, "--dns-zone", ZONE, "--dns-server", f"127.0.0.1:{bind.port}",
                "--dns-key-file", str(bind.key_file), "--dns-environment", "prod", "--empty-grace", "0s",
                "--status-addr", f"127.0.0.1:{status}", "--log-level", "WARNING",
            ], work)  # fmt: skip
            started = time.monotonic()
            two = {"127.0.2.1", "127.0.2.2"}
            for n in range(args.names):
                poll(bind.port, f"r{n}.prod.{ZONE}", two)
            print(f"{'first sync of all names':44} {time.monotonic() - started:.2f} s (templater start included)")
            print(f"{'UPDATE messages for the first sync':44} {updates(status):.0f}")

            adds, removes, per_change = [], [], []
            for k in range(args.changes):
                n = args.names + k
                before = updates(status)
                t0 = time.monotonic()
                routed(consul, n)
                poll(bind.port, f"r{n}.prod.{ZONE}", two)
                adds.append(time.monotonic() - t0)
                time.sleep(0.05)
                per_change.append(updates(status) - before)
                before = updates(status)
                t0 = time.monotonic()
                consul.put(f"/v1/agent/service/deregister/r{n}")
                poll(bind.port, f"r{n}.prod.{ZONE}", set())
                removes.append(time.monotonic() - t0)
                time.sleep(0.05)
                per_change.append(updates(status) - before)
            figures("service added -> name answers", adds)
            figures("service removed -> name gone", removes)
            dns_sum = scrape(status)["templater_dns_change_seconds_sum"]
            dns_count = scrape(status)["templater_dns_change_seconds_count"]
            print(f"{'of which zone read + UPDATE (mean)':44} {dns_sum / dns_count * 1000:.1f} ms (n={dns_count:.0f}, "
                  "the templater's templater_dns_change_seconds)")  # fmt: skip
            print(f"{'UPDATE messages per change':44} mean {sum(per_change) / len(per_change):.2f}  "
                  f"max {max(per_change):.0f}  (n={len(per_change)})")  # fmt: skip

            for what, action, want in (
                ("proxy host added -> all names have it", lambda: ingress(consul, "c", "127.0.2.3"),
                 two | {"127.0.2.3"}),
                ("proxy host failing -> all names lose it",
                 lambda: consul.put("/v1/agent/check/fail/service:ingress:c"), two),
            ):  # fmt: skip
                before = updates(status)
                t0 = time.monotonic()
                action()
                for n in range(args.names):
                    poll(bind.port, f"r{n}.prod.{ZONE}", want)
                took = time.monotonic() - t0
                time.sleep(0.2)
                print(f"{what:44} {took * 1000:.0f} ms for {args.names} names, "
                      f"{updates(status) - before:.0f} UPDATE message(s)")  # fmt: skip
            rss = psutil.Process(proc.proc.pid).memory_info().rss / 2**20
            print(f"{'templater RSS':44} {rss:.1f} MiB")
            wait_until(proc.alive, what="templater still running")
        finally:
            if proc is not None:
                proc.stop()
            bind.stop()
            consul.stop()


if __name__ == "__main__":
    main()
