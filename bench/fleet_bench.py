"""Fleet figures (issue 11): what the sidecar costs the Consul servers, and what host and leader
loss do to traffic, on the fleet of devtools/fleet.py (3 servers, hosts A with HAProxy and B with
NGINX, on 127.0.3.x unless --net says otherwise).

- servers' load: RPCs each server handled (Consul's own consul_rpc_request / consul_rpc_query
  counters) while idle and per change (a container started on A, routable through both hosts),
  with stale reads (the default --max-stale 2s) and with every read sent to the leader
  (--max-stale 0), and the share the leader served;
- leader loss: election time, failed requests through both proxies, time from the new leader
  to a container started during the election being routable;
- host loss: time from SIGKILL of host B to its last instance leaving A's configuration, failed
  requests through A.

Run: .venv/bin/python bench/fleet_bench.py [--rounds 3] [--idle 60] [--changes 10]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.fleet import Fleet, Layout
from tests.fleet_support import healthy_voters, marker, metric, seen_through, serves_all
from tests.support import wait_until
from tests.traffic import Load

COUNTERS = ("consul_rpc_request", "consul_rpc_query")


def server_counts(fleet: Fleet) -> dict[str, dict[str, float]]:
    """Per live server, Consul's cumulative RPC counters (prometheus format)."""
    found = {}
    for name, ip in fleet.layout.servers:
        if fleet.procs.process(name) is None:
            continue
        with urllib.request.urlopen(f"http://{ip}:8500/v1/agent/metrics?format=prometheus", timeout=5) as r:
            text = r.read().decode()
        found[name] = {c: sum(float(v) for v in re.findall(rf"^{c}(?:{{[^}}]*}})? (\S+)$", text, re.M))
                       for c in COUNTERS}  # fmt: skip
    return found


def delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    """RPC requests per server between two readings."""
    return {n: after[n]["consul_rpc_request"] - before.get(n, {}).get("consul_rpc_request", 0) for n in after}


def templater_requests(fleet: Fleet) -> float:
    return sum(metric(h, "templater_consul_requests_total") for h in fleet.layout.hosts)


def restart_templaters(fleet: Fleet, *extra: str) -> None:
    for h in fleet.layout.hosts:
        fleet.procs.stop(f"templater-{h.name}")
        fleet.start_templater(h, *extra)
    for h in fleet.layout.hosts:
        fleet.wait_host(h)


def load_phase(fleet: Fleet, label: str, idle: float, changes: int) -> dict[str, object]:
    a, b = fleet.layout.hosts
    time.sleep(5)  # let start-up reads settle
    before, t_before = server_counts(fleet), templater_requests(fleet)
    time.sleep(idle)
    after, t_after = server_counts(fleet), templater_requests(fleet)
    idle_rpc = delta(before, after)
    leader = fleet.leader()
    started = []
    before, t_before2 = server_counts(fleet), templater_requests(fleet)
    for _ in range(changes):
        c = fleet.run_web("a", service="bench", http_host="bench.fleet.test")
        started.append(c)
        for ph in (a, b):
            wait_until(lambda ph=ph, c=c: marker(ph, c, a) in seen_through(ph, "bench.fleet.test", 8), timeout=30,
                       what="the new container routable")  # fmt: skip
    time.sleep(2)
    after, t_after2 = server_counts(fleet), templater_requests(fleet)
    change_rpc = delta(before, after)
    for c in started:
        c.remove(force=True)
    return {
        "label": label,
        "idle_rpc_per_s": {n: v / idle for n, v in idle_rpc.items()},
        "idle_templater_req_per_s": (t_after - t_before) / idle,
        "change_rpc": {n: v / changes for n, v in change_rpc.items()},
        "change_templater_req": (t_after2 - t_before2) / changes,
        "leader": leader,
    }


def show_load(row: dict[str, object]) -> None:
    leader = row["leader"]
    for key, unit in (("idle_rpc_per_s", "RPC/s idle"), ("change_rpc", "RPCs per change")):
        values = row[key]
        assert isinstance(values, dict)
        total = sum(values.values())
        share = values.get(leader, 0) / total if total else 0
        per = ", ".join(f"{n}{'*' if n == leader else ''} {v:.1f}" for n, v in sorted(values.items()))
        print(f"  {row['label']:28} {unit:16} total {total:7.1f}  leader share {share:4.0%}  ({per})")
    print(f"  {row['label']:28} templaters' HTTP requests: {row['idle_templater_req_per_s']:.2f}/s idle (both), "
          f"{row['change_templater_req']:.1f} per change (both)")  # fmt: skip


def leader_rounds(fleet: Fleet, rounds: int) -> None:
    a, b = fleet.layout.hosts
    backends = [(fleet.run_web(on, service="ll", http_host="ll.fleet.test"), on) for on in ("a", "b")]
    for ph in (a, b):
        wait_until(lambda ph=ph: serves_all(fleet, ph, "ll.fleet.test", backends), timeout=30, what="ll served")
    elections, routable, failures, total = [], [], 0, 0
    for _ in range(rounds):
        with Load(a.proxy_port, "ll.fleet.test", address=a.ip) as la, Load(b.proxy_port, "ll.fleet.test",
                                                                           address=b.ip) as lb:  # fmt: skip
            time.sleep(1)
            old = fleet.leader()
            t0 = time.monotonic()
            fleet.kill(old)
            c = fleet.run_web("a", service="ll", http_host="ll.fleet.test")
            wait_until(lambda old=old: fleet.leader() not in ("", old), timeout=30, interval=0.02, what="leader")
            t_leader = time.monotonic()
            elections.append(t_leader - t0)
            wait_until(lambda c=c: marker(a, c, a) in seen_through(a, "ll.fleet.test", 4), timeout=30, interval=0.02,
                       what="routable")  # fmt: skip
            routable.append(time.monotonic() - t_leader)
            fleet.start_server(old)
            wait_until(lambda: healthy_voters(fleet) == 3, timeout=60, what="3 voters")
            time.sleep(1)
        failures += len(la.failures) + len(lb.failures)
        total += la.ok + lb.ok + len(la.failures) + len(lb.failures)
        c.remove(force=True)
    print(f"  leader loss x{rounds}: election (kill -> new leader seen) median {statistics.median(elections):.2f} s "
          f"(max {max(elections):.2f}); container started during the election routable after the new leader: "
          f"median {statistics.median(routable):.2f} s (max {max(routable):.2f}); failed requests {failures} of "
          f"{total} (both proxies)")  # fmt: skip
    for c, _ in backends:
        c.remove(force=True)


def host_rounds(fleet: Fleet, rounds: int) -> None:
    a, b = fleet.layout.hosts
    config = fleet.proxy_config(a)
    detect, gets, posts, total = [], 0, 0, 0
    for _ in range(rounds):
        backends = [(fleet.run_web(on, service="hl", http_host="hl.fleet.test"), on) for on in ("a", "b", "b")]
        wait_until(lambda backends=backends: serves_all(fleet, a, "hl.fleet.test", backends), timeout=30,
                   what="hl served")  # fmt: skip
        with Load(a.proxy_port, "hl.fleet.test", address=a.ip) as lo:
            time.sleep(1)
            t0 = time.monotonic()
            fleet.kill_host("b")
            wait_until(lambda: f"{b.ip}:" not in config.read_text(), timeout=60, interval=0.02, what="B out")
            detect.append(time.monotonic() - t0)
            time.sleep(1)
        gets += lo.get_failures
        if lo.failures:
            print(f"    round: {len(lo.failures)} failed, e.g. {sorted(set(lo.failures))[:4]}")
        posts += len(lo.failures) - lo.get_failures
        total += lo.ok + len(lo.failures)
        fleet.start_host("b")
        for c, _ in backends:
            fleet_host = fleet.layout.host(_)
            client = fleet.docker(fleet_host)
            client.containers.get(c.id).remove(force=True)
            client.close()
    print(f"  host loss x{rounds}: B's instances out of A's configuration after the kill: median "
          f"{statistics.median(detect):.2f} s (max {max(detect):.2f}); through A: {gets} GET and {posts} POST "
          f"failed of {total}")  # fmt: skip


def memory(fleet: Fleet) -> None:

    parts: dict[str, float] = {}
    for name in fleet.procs.names():
        proc = fleet.procs.process(name)
        if proc is None:
            continue
        kind = re.sub(r"-\w$|-\d$", "", name).replace("host", "client agent")
        rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        parts[kind] = parts.get(kind, 0) + rss / 2**20
    for h in fleet.layout.hosts:
        proxy = fleet.proxy_process(h)
        if proxy is not None:
            rss = proxy.memory_info().rss + sum(c.memory_info().rss for c in proxy.children(recursive=True))
            parts[h.proxy] = parts.get(h.proxy, 0) + rss / 2**20
    print("  memory (RSS, MiB, with children): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(parts.items()))
          + f"; total {sum(parts.values()):.0f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", default="127.0.3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--only", choices=("load", "leader", "host"), help="run only this part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as state:
        fleet = Fleet(Layout(state=Path(state), net=args.net))
        try:
            t0 = time.monotonic()
            fleet.up(demo=False)
            print(f"fleet up in {time.monotonic() - t0:.1f} s")
            for on in ("a", "a", "b", "b"):
                fleet.run_web(on, service="steady", http_host="steady.fleet.test")
            memory(fleet)
            if args.only in (None, "load"):
                print("Consul servers' load (* the leader):")
                show_load(load_phase(fleet, "stale reads (--max-stale 2s)", args.idle, args.changes))
                restart_templaters(fleet, "--max-stale", "0")
                show_load(load_phase(fleet, "leader reads (--max-stale 0)", args.idle, args.changes))
                restart_templaters(fleet)
            print("Faults:")
            if args.only in (None, "leader"):
                leader_rounds(fleet, args.rounds)
            if args.only in (None, "host"):
                host_rounds(fleet, args.rounds)
        finally:
            fleet.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
