"""Proxy figures: the real registrar, templater, HAProxy or NGINX and containers, under load.

For each proxy, prints:
- docker run of a new backend (a fourth instance of a routed service) -> its first answer
  through the proxy (median, p90, max over --runs);
- steady load (new connection per request, a quarter POST, 30 ms responses, 4 workers) while
  every backend is replaced one by one (start, wait until it serves, docker stop the old one),
  while backends are killed abruptly, and while the Consul agent restarts and loses its state:
  requests, failed GET / POST, latency p50 / p99, proxy reloads and runtime-API updates; with
  busybox backends (no keep-alive) and with keep-alive backends that close idle connections on
  SIGTERM (devtools/keepalive_backend.py), replaced with docker stop, with sidecar-stop (drain
  first: "sidecar-stop (keep-alive)") and, on an engine scripts/engine.sh started, with plain
  docker stop while the drain plugin runs ("stop+sidecar-drain (keep-alive)", issue 25);
- a burst of 20 containers started at once: time until all serve, reloads it cost;
- NGINX only, with 500 routed services: time for a reload to be taken, old workers left after
  it, memory of the NGINX processes.
Run: .venv/bin/python bench/proxy_bench.py [--proxy haproxy|nginx|both] [--runs 20] [--repeat 1]
Needs the Docker engine (scripts/engine.sh starts one) and the test image (built on first use).
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import percentile
from devtools.demo_image import ensure_keepalive_image
from registrar.consul_registry import ConsulRegistry
from registrar.docker_events import DockerSource
from registrar.drain import drain_and_stop
from sidecar.consul_conn import ConsulSettings
from tests.support import (
    ROOT,
    ConsulAgent,
    Containers,
    Process,
    docker_client,
    ensure_image,
    free_port,
    remove_test_containers,
    tempdir,
    wait_until,
)
from tests.support.drain import DrainPlugin, engine_config
from tests.traffic import Load, get, served_by, serving_web, started_at, web, web_keepalive

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


class Stack:
    """Consul dev agent, registrar, templater --proxy KIND; stopped by PID in close()."""

    def __init__(self, kind: str, work: Path, client: Any, *templater_args: str) -> None:
        self.work = work
        self.kind = kind
        self.agent = ConsulAgent(work)
        self.agent.start()
        self.port = free_port()
        self.status_port = free_port()
        self.containers = Containers(client, f"bench{uuid.uuid4().hex[:6]}")
        self.consul = ConsulRegistry(ConsulSettings(url=self.agent.url))
        self.docker = DockerSource(None)
        hostname = f"bench{uuid.uuid4().hex[:4]}"
        self.registrar = Process("registrar", ["--consul", self.agent.url, "--hostname", hostname], work)
        wait_until(lambda: "docker events connected" in self.registrar.output(), what="registrar up")
        template = {"haproxy": "haproxy.cfg.j2", "nginx": "nginx.conf.j2"}[kind]
        extra = ["--drain-timeout", "10s"] if kind == "haproxy" else list(NGINX_ARGS)
        self.templater = Process(
            "templater",
            ["--consul", self.agent.url, "--template", f"{TEMPLATES / template}:{work / (kind + '.cfg')}",
             "--proxy", kind, "--stop-proxy", "--var", f"runtime_dir={work}", "--var", f"http_port={self.port}",
             "--var", "bind_address=127.0.0.1", "--status-addr", f"127.0.0.1:{self.status_port}",
             *extra, *templater_args],
            work,
        )  # fmt: skip
        wait_until(lambda: get(self.port, "nothing.test")[0] == 404, timeout=20, what=f"{kind} serving")

    def marker(self, container: Any) -> str:
        if self.kind == "haproxy":
            return str(container.name)
        return f"127.0.0.1:{self.containers.host_port(container)}"

    def serving(self, container: Any) -> bool:
        return served_by(self.port, self.marker(container))

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^(templater_\w+) ([0-9.e+-]+)$", text, re.M)}

    def close(self) -> None:
        self.templater.stop()
        self.registrar.stop()
        remove_test_containers(self.containers.client, self.containers.session)
        self.agent.stop()


def first_answer(stack: Stack, runs: int) -> tuple[list[float], list[float], list[float]]:
    """docker run -> first answer from that container, with 3 instances already serving: from
    the call, from its return, and from the moment its process started (Docker's StartedAt)."""
    base = serving_web(stack.containers, 3, stack.serving)
    from_run, from_returned, from_start = [], [], []
    for _ in range(runs):
        t0 = time.monotonic()
        c = web(stack.containers)
        returned = time.monotonic()
        marker = stack.marker(c)
        wait_until(lambda m=marker: served_by(stack.port, m), timeout=20, interval=0.002, what="new backend answers")
        answered = time.time()
        from_run.append((time.monotonic() - t0) * 1000)
        from_returned.append((time.monotonic() - returned) * 1000)
        from_start.append((answered - started_at(c)) * 1000)
        c.stop(timeout=5)
        c.remove()
        time.sleep(0.5)
    for c in base:
        c.stop(timeout=5)
        c.remove()
    return from_run, from_returned, from_start


def new_backend(stack: Stack, image: str | None) -> Any:
    return web(stack.containers) if image is None else web_keepalive(stack.containers, image)


def under_load(stack: Stack, scenario: str, image: str | None = None) -> dict[str, Any]:
    backends = serving_web(stack.containers, 3, stack.serving, image=image)
    before = stack.metrics()
    plugin = None
    if scenario == "plugin":  # plain docker stop, the engine asking sidecar-drain first
        plugin = DrainPlugin(stack.agent.url, stack.work, f"consul-sidecar-drain-p{uuid.uuid4().hex[:6]}", "1s")
    with Load(stack.port, "app.test") as load:
        time.sleep(1)
        if scenario in ("replace", "drained", "plugin"):
            for c in list(backends):
                new = new_backend(stack, image)
                wait_until(lambda n=new: stack.serving(n), timeout=20, what="replacement serving")
                backends.append(new)
                if scenario == "drained":  # sidecar-stop: maintenance, 1 s for the proxy, then stop
                    drain_and_stop(stack.consul, stack.docker, c.name, 1.0, 5)
                else:
                    c.stop(timeout=5)
                backends.remove(c)
        elif scenario == "kill":
            for c in backends[:2]:
                c.kill()
                time.sleep(1.5)
        elif scenario == "consul-restart":
            stack.agent.restart()
            wait_until(lambda: len(stack.agent.health("web", passing=True)) == 3, timeout=20, what="registered again")
        time.sleep(1)
    if plugin is not None:
        plugin.stop()
    after = stack.metrics()
    for c in backends:
        c.remove(force=True)
    time.sleep(1)
    latencies = [x * 1000 for x in load.latencies]
    return {
        "requests": load.ok + len(load.failures),
        "failed_get": load.get_failures,
        "failed_post": len(load.failures) - load.get_failures,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 99),
        "reloads": after.get("templater_reloads_total", 0) - before.get("templater_reloads_total", 0),
        "runtime": after.get("templater_runtime_api_updates_total", 0)
        - before.get("templater_runtime_api_updates_total", 0),
        "sample": load.failures[:3],
    }


def burst(stack: Stack, count: int) -> tuple[float, float]:
    """count containers started at once: seconds until every one serves, reloads it cost."""
    before = stack.metrics()
    t0 = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        started = list(pool.map(lambda _: web(stack.containers), range(count)))
    config = stack.work / f"{stack.kind}.cfg"  # with 23 backends, 8 tries do not reach each one: read the config
    wait_until(lambda: all(stack.marker(c) in config.read_text() for c in started), timeout=90, interval=0.05,
               what="burst in the proxy's configuration")  # fmt: skip
    elapsed = time.monotonic() - t0
    reloads = stack.metrics().get("templater_reloads_total", 0) - before.get("templater_reloads_total", 0)
    for c in started:
        c.remove(force=True)
    time.sleep(2)
    return elapsed, reloads


def reload_cost(stack: Stack, services: int) -> None:
    """NGINX with `services` routed services: how long a reload takes to be taken (from the
    templater's reload histogram), old workers once it settled, NGINX's memory."""
    regs = [
        {"ID": f"cost{n}", "Name": f"cost{n}", "Port": 30000 + n, "Address": "127.0.0.1",
         "Meta": {"http_host": f"cost{n}.example.com"}}
        for n in range(services)
    ]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: stack.agent.put("/v1/agent/service/register", r), regs))
    wait_until(lambda: get(stack.port, f"cost{services - 1}.example.com")[0] in (502, 503, 504), timeout=60,
               what="all routed")  # fmt: skip
    time.sleep(2)
    before = stack.metrics()
    times = []
    for n in range(5):  # a service comes and goes: each change is a reload with the full config
        t0 = time.monotonic()
        stack.agent.put("/v1/agent/service/register", {"ID": "costx", "Name": "costx", "Port": 1,
                        "Address": "127.0.0.1", "Meta": {"http_host": f"costx{n}.example.com"}})  # fmt: skip
        wait_until(lambda n=n: get(stack.port, f"costx{n}.example.com")[0] != 404, timeout=30, interval=0.005)
        times.append((time.monotonic() - t0) * 1000)
        time.sleep(1.0)
    after = stack.metrics()
    count = after.get("templater_reload_seconds_count", 0) - before.get("templater_reload_seconds_count", 0)
    total = after.get("templater_reload_seconds_sum", 0) - before.get("templater_reload_seconds_sum", 0)
    master = int((stack.work / "nginx.pid").read_text().split()[0])
    time.sleep(3)
    workers = psutil.Process(master).children()
    rss = sum(p.memory_info().rss for p in [psutil.Process(master), *workers])
    print(f"{services} services: change -> answered through the new config median {statistics.median(times):.0f} ms "
          f"(n={len(times)}); reload (signal -> new worker) mean {total / max(count, 1) * 1000:.0f} ms "
          f"over {count:.0f}; 3 s later: {len(workers)} NGINX workers, RSS {rss / 2**20:.1f} MiB")  # fmt: skip
    for r in regs:
        stack.agent.put(f"/v1/agent/service/deregister/{r['ID']}")
    stack.agent.put("/v1/agent/service/deregister/costx")


NGINX_ARGS = ["--wait", "0s", "--reload-interval", "500ms"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", choices=["haproxy", "nginx", "both"], default="both")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each keep-alive replace scenario")
    parser.add_argument("--first-answer-only", action="store_true", help="only docker run -> first answer")
    parser.add_argument("--nginx-args", default=" ".join(NGINX_ARGS), help="the NGINX templater's batching flags")
    args = parser.parse_args()
    NGINX_ARGS[:] = shlex.split(args.nginx_args)
    print(f"NGINX templater: {' '.join(NGINX_ARGS)}")
    client = docker_client()
    ensure_image(client)
    keepalive: str | None = None
    if not args.first_answer_only:
        base = subprocess.run([str(ROOT / "scripts" / "base-image.sh")], capture_output=True, text=True, check=True)
        keepalive = ensure_keepalive_image(client, base.stdout.strip())
    kinds = ["haproxy", "nginx"] if args.proxy == "both" else [args.proxy]
    for kind in kinds:
        with tempdir() as work:
            stack = Stack(kind, work, client)
            try:
                from_run, from_returned, from_start = first_answer(stack, args.runs)
                print(f"== {kind}")
                timed = (("docker run call", from_run), ("docker run returned", from_returned),
                         ("container started", from_start))  # fmt: skip
                for label, delays in timed:
                    print(
                        f"{label:19} -> first answer  median {statistics.median(delays):.0f} ms, "
                        f"p90 {percentile(delays, 90):.0f} ms, max {max(delays):.0f} ms (n={len(delays)})"
                    )
                if args.first_answer_only:
                    continue
                print(f"{'scenario':26} {'requests':>8} {'fail GET':>8} {'fail POST':>9} {'p50 ms':>7} "
                      f"{'p99 ms':>7} {'reloads':>7} {'runtime':>7}")  # fmt: skip
                runs = [(s, None) for s in ("replace", "kill", "consul-restart")]
                plain = ("replace", "drained", "plugin") if engine_config() else ("replace", "drained")
                runs += [(s, keepalive) for s in plain for _ in range(args.repeat)]
                runs += [("kill", keepalive)]
                for scenario, image in runs:
                    r = under_load(stack, scenario, image)
                    label = f"{scenario} ({'keep-alive' if image else 'busybox'})"
                    label = label.replace("drained", "sidecar-stop").replace("plugin", "stop+sidecar-drain")
                    print(
                        f"{label:26} {r['requests']:>8} {r['failed_get']:>8} {r['failed_post']:>9} "
                        f"{r['p50']:>7.1f} {r['p99']:>7.1f} {r['reloads']:>7.0f} {r['runtime']:>7.0f}"
                    )
                    for failure in r["sample"]:
                        print(f"    failure: {failure}")
                burst_s, burst_reloads = burst(stack, 20)
                print(f"burst of 20 containers     all serving after {burst_s:.1f} s, {burst_reloads:.0f} reloads")
                if kind == "nginx":
                    reload_cost(stack, 500)
            finally:
                stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
