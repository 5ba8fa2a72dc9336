"""Templater figures: one template over 1,000 services x 3 instances on a real Consul agent.

Prints: full render time, change-to-file latency (p50, p99) for single instance changes, open
connections to Consul, CPU used while nothing changes, RSS.
Run: .venv/bin/python bench/templater_bench.py [--services 1000] [--instances 3] [--changes 40]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import ConsulAgent, Process, tempdir

TEMPLATE = """{% for s in services() if s.name != "consul" %}
backend {{ s.name }}
{% for i in service(s.name) %}
    server {{ i.id }} {{ i.address }}:{{ i.port }}
{% endfor %}
{% endfor %}
"""


def put(url: str, path: str, body: object) -> None:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="PUT")
    urllib.request.urlopen(request, timeout=30).read()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--changes", type=int, default=40)
    args = parser.parse_args()
    with tempdir() as work:
        agent = ConsulAgent(work)
        agent.start()
        try:
            t0 = time.monotonic()
            regs = [
                {"ID": f"s{s}-{i}", "Name": f"s{s}", "Port": 20000 + i, "Address": "127.0.0.1"}
                for s in range(args.services)
                for i in range(args.instances)
            ]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda r: put(agent.url, "/v1/agent/service/register", r), regs))
            print(f"registered {len(regs)} instances in {time.monotonic() - t0:.1f} s")
            src = work / "t.j2"
            src.write_text(TEMPLATE)
            dest = work / "out.cfg"
            started = time.monotonic()
            proc = Process("templater", ["--consul", agent.url, "--template", f"{src}:{dest}"], work)
            while not dest.exists():
                time.sleep(0.005)
            first = time.monotonic() - started
            ps = psutil.Process(proc.proc.pid)
            time.sleep(1.0)
            render_ms = [float(m) for m in re.findall(r"render_ms=([0-9.]+)", proc.output())]
            latencies = []
            for n in range(args.changes):
                service = f"s{(n * 37) % args.services}"
                port = 40000 + n
                t = time.monotonic()
                put(
                    agent.url,
                    "/v1/agent/service/register",
                    {"ID": f"x{n}", "Name": service, "Port": port, "Address": "127.0.0.1"},
                )
                token = f"127.0.0.1:{port}\n"
                while token not in dest.read_text():
                    time.sleep(0.002)
                latencies.append((time.monotonic() - t) * 1000)
                time.sleep(0.1)
            conns = [c for c in ps.net_connections("tcp") if c.raddr and c.raddr.port == agent.http_port]
            time.sleep(2.0)
            cpu0 = ps.cpu_times()
            time.sleep(10.0)
            cpu1 = ps.cpu_times()
            idle_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            rss = ps.memory_info().rss
            render_ms = [float(m) for m in re.findall(r"render_ms=([0-9.]+)", proc.output())]
            print(f"services x instances           {args.services} x {args.instances}")
            print(f"templater start -> first file  {first * 1000:.0f} ms (fetch + render)")
            print(f"full render (jinja) median     {statistics.median(render_ms):.1f} ms over {len(render_ms)} renders")
            print(f"change -> file p50             {statistics.median(latencies):.1f} ms")
            print(f"change -> file p99             {percentile(latencies, 99):.1f} ms (n={len(latencies)})")
            print(f"open connections to consul     {len(conns)}")
            print(f"CPU while idle (10 s)          {idle_cpu * 1000:.0f} ms")
            print(f"templater RSS                  {rss / 2**20:.1f} MiB")
            proc.stop()
            return 0
        finally:
            agent.stop()


if __name__ == "__main__":
    raise SystemExit(main())
