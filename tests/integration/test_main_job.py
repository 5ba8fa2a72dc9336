"""The README's main job stops everything it started, whatever happened to its output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from devtools.main_job import DEMO_LABEL
from tests.support import ROOT, docker_client, free_port, wait_until
from tests.traffic import get


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _serves(port: int) -> bool:
    try:
        return get(port, "demo.localhost", "/index.html")[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"])
def test_the_main_job_stops_all_it_started_after_its_pipe_closed(tmp_path: Path, signum: int) -> None:
    """`./scripts/run.sh | tee run.log`, then Ctrl-C: tee is gone before the main job writes
    its last lines. The Consul agent, the registrar, the templater and its HAProxy, and the
    demo containers all go (SIGTERM and SIGHUP, a closed terminal, the same)."""
    http_port = free_port()
    env = dict(os.environ, SIDECAR_STATE_DIR=str(tmp_path), SIDECAR_HTTP_PORT=str(http_port))
    argv = [sys.executable, "-m", "devtools.main_job", "--consul", f"http://127.0.0.1:{free_port()}",
            "--templater-status", f"127.0.0.1:{free_port()}",
            "--registrar-status", f"127.0.0.1:{free_port()}"]  # fmt: skip
    job = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert job.stdout is not None
    started: dict[str, int] = {}
    proxies: list[int] = []
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = job.stdout.readline().decode(errors="replace")
            if not line:
                break
            lines.append(line)
            if found := re.search(r"started (.+) pid=(\d+)", line):
                started[found.group(1)] = int(found.group(2))
            if "Ctrl-C stops everything" in line:
                break
        assert "Ctrl-C stops everything" in "".join(lines), "".join(lines)
        assert {"consul dev agent", "registrar", "templater+haproxy"} <= set(started)
        wait_until(lambda: _serves(http_port), 60, what="the demo through HAProxy")
        templater = psutil.Process(started["templater+haproxy"])
        proxies = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
                   and "haproxy" in (p.info["cmdline"] or [""])[0]]  # fmt: skip
        assert proxies and templater.is_running()
        job.stdout.close()  # the reader of its output is gone
        job.send_signal(signum)
        assert job.wait(90) == 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        for pid in started.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    gone = [name for name, pid in started.items() if _alive(pid)] + [f"haproxy {p}" for p in proxies if _alive(p)]
    client = docker_client()
    try:
        left = client.containers.list(all=True, filters={"label": DEMO_LABEL})
        for container in left:  # the demo label is ours: remove what a failed stop left
            container.remove(force=True)
    finally:
        client.close()
    assert gone == [], f"still running after the main job stopped: {gone}"
    assert left == [], "demo containers left"
    assert "stopped everything it started" in (tmp_path / "main-job.log").read_text()
