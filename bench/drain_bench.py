"""Issue 25 figures: sidecar-drain, the engine's authorization plugin, in the path of every call.

Prints:
- Docker API calls with and without the plugin in the engine: `docker ps` and `docker logs`
  (the CLI, median and p90 over --calls);
- `docker stop` of a container without services (it exits on SIGTERM), with and without;
- a rolling replacement under load (new connection per request, a quarter POST) through HAProxy
  and NGINX, with busybox backends and keep-alive ones that close their listener the moment
  they get SIGTERM, for each client: docker stop, docker restart, docker rm -f,
  docker-compose down, docker compose down; --runs runs in a row of each, 3 backends replaced
  (restarted) in each run: requests, failed GET / POST, how long each stop call took. The same
  with plain docker stop and no plugin, for comparison.
Run, on an engine scripts/engine.sh started (it exports SIDECAR_ENGINE_CONFIG and _PID):
  .venv/bin/python bench/drain_bench.py [--runs 5] [--proxy haproxy|nginx|both] [--drain 2s]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import percentile
from bench.proxy_bench import Stack
from devtools.demo_image import ensure_keepalive_image
from tests.support import IMAGE, ROOT, TEST_LABEL, docker_client, ensure_image, tempdir, wait_until
from tests.support.drain import DrainPlugin, engine_config
from tests.traffic import Load, closing_web, compose_web

CLIENTS = ["docker stop", "docker restart", "docker rm -f", "docker-compose down", "docker compose down"]
COMPOSE = {"docker-compose down": ["docker-compose"], "docker compose down": ["docker", "compose"]}


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return (time.monotonic() - started) * 1000


def api_calls(calls: int, container: str) -> dict[str, list[float]]:
    return {
        "docker ps": [timed(["docker", "ps", "-q"]) for _ in range(calls)],
        "docker logs": [timed(["docker", "logs", container]) for _ in range(calls)],
    }


def plain_stops(client: Any, session: str, count: int) -> list[float]:
    took = []
    for _ in range(count):
        c = client.containers.run(IMAGE, ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"], detach=True,
                                  labels={TEST_LABEL: session})  # fmt: skip
        took.append(timed(["docker", "stop", c.name]))
        c.remove()
    return took


class Backends:
    """Backends of one kind for one client: containers, or one compose project each."""

    def __init__(self, stack: Stack, work: Path, image: str | None, client: str) -> None:
        self.stack, self.work, self.image, self.client = stack, work, image, client

    def start(self) -> Any:
        if self.client not in COMPOSE:
            return closing_web(self.stack.containers, self.image)
        project = f"dr{uuid.uuid4().hex[:8]}"
        directory = self.work / project
        directory.mkdir()
        compose_web(directory, self.image, self.stack.containers.session)
        subprocess.run([*COMPOSE[self.client], "-p", project, "up", "-d"], cwd=directory, check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        found = self.stack.containers.client.containers.list(filters={"label": f"com.docker.compose.project={project}"})
        return found[0]

    def end(self, c: Any) -> float:
        """Stop (or restart) the backend with the client; milliseconds the call took."""
        if self.client in COMPOSE:
            project = c.labels["com.docker.compose.project"]
            return timed(
                [*COMPOSE[self.client], "-p", project, "-f", str(self.work / project / "compose.yaml"), "down"]
            )
        argv = {"docker stop": ["docker", "stop", "-t", "5"], "docker restart": ["docker", "restart", "-t", "5"],
                "docker rm -f": ["docker", "rm", "-f"]}[self.client]  # fmt: skip
        return timed([*argv, c.name])


def rolling(stack: Stack, backends: Backends) -> dict[str, Any]:
    old = [backends.start() for _ in range(3)]
    wait_until(lambda: all(stack.serving(c) for c in old), timeout=30, what="3 backends serving")
    took = []
    with Load(stack.port, "app.test") as load:
        time.sleep(1)
        for c in old:
            if backends.client == "docker restart":
                took.append(backends.end(c))
                wait_until(lambda c=c: stack.serving(c), timeout=30, what="restarted backend serving")
                continue
            new = backends.start()
            wait_until(lambda new=new: stack.serving(new), timeout=30, what="replacement serving")
            took.append(backends.end(c))
        time.sleep(1)
    for c in stack.containers.client.containers.list(
        all=True, filters={"label": f"{TEST_LABEL}={stack.containers.session}"}
    ):
        project = c.labels.get("com.docker.compose.project")
        if project and backends.client in COMPOSE:
            compose_file = str(backends.work / project / "compose.yaml")
            subprocess.run([*COMPOSE[backends.client], "-p", project, "-f", compose_file, "down"],
                           capture_output=True, timeout=120)  # fmt: skip
        else:
            with contextlib.suppress(docker.errors.NotFound):  # one that docker rm -f is removing
                c.remove(force=True)
    return {
        "requests": load.ok + len(load.failures),
        "failed_get": load.get_failures,
        "failed_post": len(load.failures) - load.get_failures,
        "stop_ms": took,
        "sample": load.failures[:2],
    }


def show(label: str, values: list[float]) -> str:
    return f"{label}: median {statistics.median(values):.0f} ms, p90 {percentile(values, 90):.0f} ms (n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", choices=["haproxy", "nginx", "both"], default="both")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--drain", default="2s")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--no-api", action="store_true", help="only the rolling replacements")
    parser.add_argument("--no-baseline", action="store_true", help="no plain docker stop without the plugin")
    args = parser.parse_args()
    if engine_config() is None:
        print("drain_bench: no SIDECAR_ENGINE_CONFIG: run it on an engine scripts/engine.sh started", file=sys.stderr)
        return 2
    client = docker_client()
    ensure_image(client)
    base = subprocess.run([str(ROOT / "scripts" / "base-image.sh")], capture_output=True, text=True, check=True)
    keepalive = ensure_keepalive_image(client, base.stdout.strip())
    kinds = ["haproxy", "nginx"] if args.proxy == "both" else [args.proxy]
    for n, kind in enumerate(kinds):
        with tempdir() as work:
            stack = Stack(kind, work, client)
            try:
                if n == 0 and not args.no_api:
                    logged = stack.containers.run(command="for i in $(seq 1 2000); do echo line $i; done; sleep 600",
                                                  ports=())  # fmt: skip
                    time.sleep(1)
                    without = api_calls(args.calls, logged.name)
                    stops_without = plain_stops(client, stack.containers.session, 10)
                    plugin = DrainPlugin(stack.agent.url, work, f"consul-sidecar-drain-b{uuid.uuid4().hex[:6]}",
                                         args.drain)  # fmt: skip
                    with_plugin = api_calls(args.calls, logged.name)
                    stops_with = plain_stops(client, stack.containers.session, 10)
                    plugin.stop()
                    print(f"== Docker API calls, the CLI ({args.calls} each; docker logs prints 2,000 lines)")
                    for call in without:
                        print(f"{show(call + ' without the plugin', without[call])}; "
                              f"{show('with', with_plugin[call])}")  # fmt: skip
                    print(f"{show('docker stop, no services, without the plugin', stops_without)}; "
                          f"{show('with', stops_with)}")  # fmt: skip
                print(
                    f"== {kind}, drain {args.drain}: rolling replacement, 3 backends per run, {args.runs} runs in a row"
                )
                print(f"{'client':22} {'backend':10} {'with plugin':11} {'requests':>8} {'fail GET':>8} "
                      f"{'fail POST':>9}  stop call ms (median, max)")  # fmt: skip
                cases = [(c, True) for c in args.clients.split(",")]
                cases += [] if args.no_baseline else [("docker stop", False)]
                for name, use_plugin in cases:
                    for image in (None, keepalive):
                        plugin: DrainPlugin | None = None
                        if use_plugin:
                            plugin = DrainPlugin(stack.agent.url, work, f"consul-sidecar-drain-b{uuid.uuid4().hex[:6]}",
                                                 args.drain)  # fmt: skip
                        try:
                            for _ in range(args.runs):
                                r = rolling(stack, Backends(stack, work, image, name))
                                kind_of = "keep-alive" if image else "busybox"
                                print(f"{name:22} {kind_of:10} {'yes' if use_plugin else 'no':11} {r['requests']:>8} "
                                      f"{r['failed_get']:>8} {r['failed_post']:>9}  "
                                      f"{statistics.median(r['stop_ms']):.0f}, {max(r['stop_ms']):.0f}",
                                      flush=True)  # fmt: skip
                                for failure in r["sample"]:
                                    print(f"    failure: {failure}")
                        finally:
                            if plugin is not None:
                                plugin.stop()
            finally:
                stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
