"""The README's main command: the whole sidecar on embedded defaults.

Starts what is missing (a Consul dev agent when none answers, the Docker engine when none
answers), then the registrar; Ctrl-C stops everything this process started, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
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

from devtools.demo_image import ensure_image
from sidecar.signals import terminate

STATE_DIR = Path(os.environ.get("SIDECAR_STATE_DIR", "/tmp/consul-sidecar"))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class _Output:
    """The main job's own lines: on its stdout while that is open; once writing fails (the pipe
    to `tee` closed by Ctrl-C, the terminal gone), into its log file, so that stopping what it
    started never fails on a message."""

    def __init__(self) -> None:
        self.closed = False

    def say(self, text: str) -> None:
        line = f"[sidecar] {text}\n"
        if not self.closed:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
                return
            except (OSError, ValueError):  # BrokenPipeError, EIO from a terminal gone, closed file
                self.closed = True
                with contextlib.suppress(OSError):  # and no error at exit flushing it again
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        with contextlib.suppress(OSError), open(STATE_DIR / "main-job.log", "a") as log:
            log.write(line)


OUT = _Output()


class _Stopped(Exception):
    """A signal came while starting: stop what was started so far."""


def _wait(what: str, check: Callable[[], bool], timeout: float, stop: dict[str, bool] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if stop is not None and stop["now"]:
            raise _Stopped
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
        OUT.say(f"started {name} pid={proc.pid}" + (f" log={log}" if log else ""))
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
                OUT.say(f"stopped {name} pid={proc.pid}")


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"))
    parser.add_argument("--templater-status", default="127.0.0.1:9200", metavar="ADDR", help="its /health")
    parser.add_argument("--registrar-status", default="127.0.0.1:9201", metavar="ADDR", help="its /health")
    args = parser.parse_args(argv)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    started = Started()
    stop = {"now": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, a stop, the terminal gone
        signal.signal(signum, on_signal)
    python = sys.executable
    # the engine's settings file, where the drain plugin adds itself: ours when we start the
    # engine, else the one scripts/engine.sh said (none: the engine is left as it is)
    engine = (os.environ.get("SIDECAR_ENGINE_CONFIG"), os.environ.get("SIDECAR_ENGINE_PID"))
    drain: subprocess.Popen[bytes] | None = None
    try:
        if not os.environ.get("DOCKER_HOST") and not docker_answers():
            config = STATE_DIR / "daemon.json"
            config.write_text("{}\n")
            dockerd = started.spawn("dockerd", [shutil.which("dockerd") or "dockerd", "--config-file", str(config)],
                                    STATE_DIR / "dockerd.log")  # fmt: skip
            engine = (str(config), str(dockerd.pid))
            _wait("dockerd", docker_answers, 60, stop)
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
            _wait("consul", lambda: _answers(consul_url + "/v1/status/leader"), 60, stop)
        if engine[0] and engine[1]:
            drain = started.spawn(
                "drain plugin (sidecar-drain)",
                [python, "-m", "registrar.drain_guard", "--consul", consul_url, "--engine-config", engine[0],
                 "--engine-pid", engine[1]],
                STATE_DIR / "drain.log",
            )  # fmt: skip
        started.spawn(
            "registrar", [python, "-m", "registrar", "--consul", consul_url, "--status-addr", args.registrar_status]
        )
        extra = _start_routing(started, consul_url, python, args.templater_status)
        ui = f"{consul_url}/ui/dc1/services"
        OUT.say(f"Consul UI: {ui}")
        OUT.say(f"  the demo service, its 3 instances and their meta: {ui}/demo/instances")
        OUT.say(f"  this host's proxy and its check: {ui}/ingress/instances")
        OUT.say(f"  the registrar and the Docker engine it follows: {ui}/registrar/instances")
        OUT.say(
            f"/health and /metrics: templater http://{args.templater_status}, registrar http://{args.registrar_status}"
        )
        for line in extra:
            OUT.say(line)
        if drain is None:
            OUT.say("plain docker stop does not drain: this engine was not started here (README: the drain plugin)")
        else:
            OUT.say("plain docker stop drains first: the drain plugin is in the engine (log: drain.log)")
        OUT.say("Ctrl-C stops everything listed above")
        while not stop["now"]:
            for name, proc in started.procs:
                if proc.poll() is not None:
                    OUT.say(f"{name} exited with {proc.returncode}; stopping")
                    return 1
            time.sleep(0.5)
        return 0
    except _Stopped:
        return 0
    finally:
        if drain is not None:  # out of the engine before the demo's removal
            terminate(drain, signal.SIGTERM, 15, "drain plugin")
        try:
            _cleanup_routing()
        except Exception as err:  # the engine gone: what this process started is still stopped
            OUT.say(f"could not remove the demo containers: {err}")
        started.stop_all()
        OUT.say("stopped everything it started")


DEMO_LABEL = "consul-sidecar.demo"
HTTP_PORT = int(os.environ.get("SIDECAR_HTTP_PORT", "8080"))


def _start_routing(started: Started, consul_url: str, python: str, status: str) -> list[str]:
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
            status,
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
        OUT.say(f"removed {len(ids)} demo containers")


if __name__ == "__main__":
    raise SystemExit(main())
