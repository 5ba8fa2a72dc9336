"""Registrar figures: 100 containers started at once against a real Docker engine and Consul agent.

Prints: time from the first `docker start` until all 100 are in the Consul catalog, the latency
from each container's Docker `start` event to its service appearing in the catalog (p50, p90, max),
and the registrar's peak RSS. Run: .venv/bin/python bench/registrar_bench.py [--count N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import percentile
from tests.support import (
    IMAGE,
    ConsulAgent,
    Containers,
    Process,
    docker_client,
    ensure_image,
    remove_test_containers,
    tempdir,
)


class CatalogWatcher(threading.Thread):
    """Blocking queries on the catalog entry of one service name; first-seen time per ID."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.url, self.name = url, name
        self.first_seen: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        index = 1
        while not self.stop.is_set():
            path = f"{self.url}/v1/catalog/service/{self.name}?index={index}&wait=5s"
            with urllib.request.urlopen(path, timeout=10) as response:
                now = time.time_ns()
                index = max(1, int(response.headers.get("X-Consul-Index", "1")))
                for entry in json.loads(response.read()):
                    self.first_seen.setdefault(entry["ServiceID"], now)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    client = docker_client()
    ensure_image(client)
    session = f"bench{uuid.uuid4().hex[:4]}"
    hostname = "benchhost"
    with tempdir() as work:
        agent = ConsulAgent(work)
        agent.start()
        registrar = Process("registrar", ["--consul", agent.url, "--hostname", hostname], work)
        try:
            time.sleep(1.0)  # registrar connected, idle
            proc = psutil.Process(registrar.proc.pid)
            idle_rss = proc.memory_info().rss
            watcher = CatalogWatcher(agent.url, "bench")
            watcher.start()
            starts: dict[str, int] = {}
            events = client.events(
                decode=True, filters={"type": "container", "event": "start", "label": f"consul-sidecar.test={session}"}
            )

            def collect() -> None:
                for event in events:
                    starts[event["Actor"]["Attributes"]["name"]] = int(event["timeNano"])

            threading.Thread(target=collect, daemon=True).start()
            runner = Containers(client, session)
            created = [
                client.containers.create(
                    IMAGE,
                    ["sh", "-c", "httpd -f -p 8080 -h /www"],
                    name=f"{session}-{i}",
                    labels={"consul-sidecar.test": session, "SERVICE_NAME": "bench"},
                    ports={"8080/tcp": ("127.0.0.1", None)},
                )
                for i in range(args.count)
            ]
            del runner
            peak_rss = idle_rss
            t0 = time.time_ns()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda c: c.start(), created))
            expected = {f"{hostname}:{c.name}:8080" for c in created}
            deadline = time.monotonic() + 60
            while not expected <= set(watcher.first_seen) and time.monotonic() < deadline:
                peak_rss = max(peak_rss, proc.memory_info().rss)
                time.sleep(0.01)
            peak_rss = max(peak_rss, proc.memory_info().rss)
            missing = expected - set(watcher.first_seen)
            latencies = []
            for c in created:
                sid = f"{hostname}:{c.name}:8080"
                if sid in watcher.first_seen and c.name in starts:
                    latencies.append((watcher.first_seen[sid] - starts[c.name]) / 1e6)
            all_done = max(watcher.first_seen[s] for s in expected if s in watcher.first_seen)
            print(f"containers                    {args.count}")
            print(f"registered                    {args.count - len(missing)}")
            print(f"all registered after          {(all_done - t0) / 1e9:.2f} s (from the first docker start call)")
            print(f"start event -> catalog p50    {statistics.median(latencies):.1f} ms")
            print(f"start event -> catalog p90    {percentile(latencies, 90):.1f} ms (n={len(latencies)})")
            print(f"start event -> catalog max    {max(latencies):.1f} ms")
            print(f"registrar RSS idle / peak     {idle_rss / 2**20:.1f} MiB / {peak_rss / 2**20:.1f} MiB")
            agent_side = [float(m) for m in re.findall(r"latency_ms=([0-9.]+)", registrar.output())]
            if agent_side:
                print(f"start event -> agent register p50 {statistics.median(agent_side):.1f} ms (registrar's own log)")
            first_start, last_start = min(starts.values()), max(starts.values())
            print(f"docker start events spread    {(last_start - first_start) / 1e9:.2f} s")
            print(f"last start event -> all in catalog {(all_done - last_start) / 1e6:.1f} ms")
            watcher.stop.set()
            events.close()
            return 0 if not missing else 1
        finally:
            registrar.stop()
            remove_test_containers(client, session)
            agent.stop()


if __name__ == "__main__":
    raise SystemExit(main())
