"""Consul load of one templater: HTTP requests it makes per change and per idle minute.

A 3-node Consul (a dev server on 127.0.0.1 and two client agents on 127.0.0.2 and 127.0.0.3),
1,000 services x 3 instances, one on each node; the templater watches the whole catalog through
the server's agent with one template listing every passing instance. Its requests pass through
a counting TCP forwarder: every HTTP request it sent (blocking queries included) and the bytes
Consul answered. Run twice: instances with a TTL check each (as the registrar registers
containers with SERVICE_CHECK_*), and without checks.

Run: .venv/bin/python bench/consul_load_bench.py [--services 1000] [--changes 20] [--idle 60]
     [--code DIR: run the templater of another checkout, e.g. an older commit, for comparison]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.templater_bench import TEMPLATE, put, wait_for
from tests.support import ROOT, ConsulAgent, Process, TcpForwarder, free_port, tempdir, wait_until

REQUEST_LINE = re.compile(rb"(?:^|\r\n)(?:GET|PUT|POST|DELETE) (/v1/[^? ]*)")


class ClientAgent:
    """A Consul client agent on its own loopback address, joined to the server."""

    def __init__(self, work: Path, name: str, address: str, join: str) -> None:
        self.address = address
        self.http_port = free_port()
        self.work = work / name
        self.work.mkdir()
        config = {
            "node_name": name,
            "data_dir": str(self.work / "data"),
            "bind_addr": address,
            "client_addr": address,
            "retry_join": [join],
            "ports": {"http": self.http_port, "dns": -1, "grpc": -1, "serf_lan": free_port(), "serf_wan": -1},
            "log_level": "warn",
            "disable_update_check": True,
        }
        (self.work / "agent.json").write_text(json.dumps(config))
        self.log = open(self.work / "agent.log", "wb")  # noqa: SIM115 - closed in stop()
        argv = ["consul", "agent", "-config-file", str(self.work / "agent.json")]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()


class CountingForwarder(TcpForwarder):
    """Counts HTTP requests (request lines sent) and response bytes between a client and Consul."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.requests = 0
        self.bytes = 0
        self.paths: collections.Counter[str] = collections.Counter()
        self._count_lock = threading.Lock()

    def seen(self, data: bytes, upstream: bool) -> None:
        with self._count_lock:
            if upstream:
                paths = REQUEST_LINE.findall(data)
                self.requests += len(paths)
                self.paths.update(re.sub(r"/(node|service)/.*", r"/\1/<name>", p.decode()) for p in paths)
            else:
                self.bytes += len(data)

    def counts(self) -> tuple[int, int]:
        with self._count_lock:
            return self.requests, self.bytes


def registration(name: str, sid: str, port: int, checks: bool) -> dict[str, object]:
    body: dict[str, object] = {"ID": sid, "Name": name, "Port": port, "Address": "127.0.0.1"}
    if checks:
        body["Check"] = {"TTL": "30m", "Status": "passing"}
    return body


def run(agents: list[str], work: Path, args: argparse.Namespace, checks: bool) -> None:
    regs = [
        (agents[i % len(agents)], registration(f"s{s}", f"s{s}-{i}", 20000 + i, checks))
        for s in range(args.services)
        for i in range(3)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: put(r[0], "/v1/agent/service/register", r[1]), regs))
    wait_until(lambda: len(json.load(urllib.request.urlopen(agents[0] + "/v1/catalog/services"))) > args.services,
               timeout=120, interval=0.5, what="catalog complete")  # fmt: skip
    src = work / f"t-{checks}.j2"
    src.write_text(TEMPLATE)
    out = work / f"out-{checks}"
    out.mkdir()
    dest = out / "out.cfg"
    forwarder = CountingForwarder(int(agents[0].rsplit(":", 1)[1]))
    forwarder.start()
    env = {"PYTHONPATH": str(args.code)} if args.code else {}
    argv = ["--consul", forwarder.url, "--template", f"{src}:{dest}"]
    proc = Process("templater", argv, work, env=env, cwd=args.code or ROOT)
    try:
        wait_until(lambda: dest.exists() and f"s{args.services - 1}-2" in dest.read_text(), timeout=120, what="render")
        time.sleep(5.0)
        per_change, bytes_per_change = [], []
        paths_at_start = collections.Counter(forwarder.paths)
        for n in range(args.changes):
            before = forwarder.counts()
            body = registration(f"s{(n * 37) % args.services}", f"x{n}", 40000 + n, checks)
            put(agents[n % len(agents)], "/v1/agent/service/register", body)
            wait_for(dest, f"127.0.0.1:{40000 + n}\n")
            time.sleep(4.0)  # every read this change causes, a trailing full read included
            after = forwarder.counts()
            per_change.append(after[0] - before[0])
            bytes_per_change.append(after[1] - before[1])
        change_paths = forwarder.paths - paths_at_start
        for n in range(args.changes):
            put(agents[n % len(agents)], f"/v1/agent/service/deregister/x{n}", None)
        time.sleep(5.0)
        before = forwarder.counts()
        paths_before = collections.Counter(forwarder.paths)
        time.sleep(args.idle)
        after = forwarder.counts()
        idle_paths = forwarder.paths - paths_before
        idle = (after[0] - before[0]) * 60 / args.idle
        idle_bytes = (after[1] - before[1]) * 60 / args.idle
    finally:
        proc.stop()
        forwarder.stop()
        for agent, body in regs:
            put(agent, f"/v1/agent/service/deregister/{body['ID']}", None)
    print(f"instances {'with a TTL check each' if checks else 'without checks'}")
    print(f"  requests per change p50 / max   {statistics.median(per_change):.0f} / {max(per_change):.0f} "
          f"(n={len(per_change)}, registrations on the 3 nodes in turn)")  # fmt: skip
    print(f"  KiB answered per change p50     {statistics.median(bytes_per_change) / 1024:.0f}")
    per = {path: round(count / len(per_change), 1) for path, count in change_paths.most_common(6)}
    print(f"  requests per change by path     {per}")
    print(f"  requests per idle minute        {idle:.1f} (over {args.idle:.0f} s)")
    print(f"  KiB answered per idle minute    {idle_bytes / 1024:.0f}")
    print(f"  idle requests by path           {dict(idle_paths.most_common(6))}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--code", type=Path, help="checkout whose templater to run (default: this one)")
    parser.add_argument("--only", choices=("checks", "none"), help="run one of the two cases")
    args = parser.parse_args()
    with tempdir() as work:
        server = ConsulAgent(work)
        server.start()
        clients = []
        try:
            join = f"127.0.0.1:{server._ports['serf_lan']}"
            clients = [ClientAgent(work, f"node-{c}", f"127.0.0.{n}", join) for n, c in ((2, "b"), (3, "c"))]
            wait_until(lambda: len(server.get("/v1/catalog/nodes")) == 3, timeout=60, interval=0.5, what="3 nodes")
            agents = [server.url] + [c.url for c in clients]
            print(f"nodes 3, services {args.services} x 3 instances (one per node), template over all of them")
            for checks in (True, False):
                if args.only in (None, "checks" if checks else "none"):
                    run(agents, work, args, checks)
            return 0
        finally:
            for client in clients:
                client.stop()
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
