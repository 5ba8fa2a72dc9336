"""The README's main command: the whole sidecar on embedded defaults.

Starts what is missing (a Consul dev agent when none answers, the Docker engine when none
answers), then the registrar; Ctrl-C stops everything this process started, by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker

from sidecar.demo_image import ensure_image

STATE_DIR = Path(os.environ.get("SIDECAR_STATE_DIR", "/tmp/consul-sidecar"))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


@dataclass
class Started:
    """Children this process started, stopped in reverse order on exit."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else None  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
        if out:
            out.close()
        self.procs.append((name, proc))
        print(f"[sidecar] started {name} pid={proc.pid}" + (f" log={log}" if log else ""), flush=True)
        return proc

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                print(f"[sidecar] stopped {name} pid={proc.pid}", flush=True)


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"))
    args = parser.parse_args(argv)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    started = Started()
    stop = {"now": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    python = sys.executable
    try:
        if not os.environ.get("DOCKER_HOST") and not docker_answers():
            started.spawn("dockerd", [shutil.which("dockerd") or "dockerd"], STATE_DIR / "dockerd.log")
            _wait("dockerd", docker_answers, 60)
        consul_url = args.consul.rstrip("/")
        if not _answers(consul_url + "/v1/status/leader"):
            port = consul_url.rsplit(":", 1)[-1]
            started.spawn(
                "consul dev agent",
                [
                    "consul",
                    "agent",
                    "-dev",
                    "-client",
                    "127.0.0.1",
                    "-bind",
                    "127.0.0.1",
                    f"-http-port={port}",
                    "-hcl",
                    "disable_update_check = true",
                ],
                STATE_DIR / "consul.log",
            )
            _wait("consul", lambda: _answers(consul_url + "/v1/status/leader"), 60)
        started.spawn(
            "registrar", [python, "-m", "registrar", "--consul", consul_url, "--status-addr", "127.0.0.1:9201"]
        )
        extra = _start_routing(started, consul_url, python)
        ui = f"{consul_url}/ui/dc1/services"
        print(f"[sidecar] Consul UI: {ui}", flush=True)
        print(f"[sidecar]   the demo service, its 3 instances and their meta: {ui}/demo/instances", flush=True)
        print(f"[sidecar]   this host's proxy and its check: {ui}/ingress/instances", flush=True)
        print(f"[sidecar]   the registrar and the Docker engine it follows: {ui}/registrar/instances", flush=True)
        print("[sidecar] /health and /metrics: templater http://127.0.0.1:9200, registrar http://127.0.0.1:9201",
              flush=True)  # fmt: skip
        for line in extra:
            print(f"[sidecar] {line}", flush=True)
        print("[sidecar] Ctrl-C stops everything listed above", flush=True)
        while not stop["now"]:
            for name, proc in started.procs:
                if proc.poll() is not None:
                    print(f"[sidecar] {name} exited with {proc.returncode}; stopping", flush=True)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        _cleanup_routing()
        started.stop_all()


DEMO_LABEL = "consul-sidecar.demo"
HTTP_PORT = int(os.environ.get("SIDECAR_HTTP_PORT", "8080"))


def _start_routing(started: Started, consul_url: str, python: str) -> list[str]:
    """The templater with HAProxy on the bundled template, and three demo containers."""
    root = Path(__file__).resolve().parents[1]
    runtime = STATE_DIR / "haproxy"
    runtime.mkdir(parents=True, exist_ok=True)
    started.spawn(
        "templater+haproxy",
        [
            python,
            "-m",
            "templater",
            "--consul",
            consul_url,
            "--proxy",
            "haproxy",
            "--stop-proxy",  # Ctrl-C stops everything the main job started
            "--template",
            f"{root / 'templates' / 'haproxy.cfg.j2'}:{runtime / 'haproxy.cfg'}",
            "--var",
            f"runtime_dir={runtime}",
            "--var",
            f"http_port={HTTP_PORT}",
            "--var",
            "bind_address=127.0.0.1",
            "--status-addr",
            "127.0.0.1:9200",
        ],
    )
    client = docker.from_env()
    image = ensure_image(client)
    client.close()
    for n in (1, 2, 3):
        subprocess.run(["docker", "rm", "-f", f"sidecar-demo-{n}"], capture_output=True)
        subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "--name",
                f"sidecar-demo-{n}",
                "--label",
                DEMO_LABEL + "=1",
                "-p",
                "127.0.0.1::8080",
                "--label",
                "SERVICE_NAME=demo",
                "--label",
                "SERVICE_HTTP_HOST=demo.localhost",
                "--label",
                "SERVICE_CHECK_HTTP=/index.html",
                image,
                "sh",
                "-c",
                "httpd -f -p 8080 -h /www",
            ],
            check=True,
            capture_output=True,
        )
    return [
        f"demo: curl -H 'Host: demo.localhost' http://127.0.0.1:{HTTP_PORT}/cgi-bin/slow  (3 containers, round robin)",
        f"HAProxy config: {runtime / 'haproxy.cfg'}",
    ]


def _cleanup_routing() -> None:
    """Remove the demo containers (only those carrying our demo label)."""
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={DEMO_LABEL}"], capture_output=True, text=True)
    ids = out.stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        print(f"[sidecar] removed {len(ids)} demo containers", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
