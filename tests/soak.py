"""The soak (issue 21, point 3): one host for a while, everything moving at once.

Containers started and stopped about once a second (half with `sidecar-stop`, half with a plain
`docker stop`), the Consul agent restarted (losing its state), the template edited (the proxy
reloads), load through HAProxy all along (a new connection per request, a quarter POST). Every
10 s the RSS, open file descriptors and threads of the registrar, the templater and HAProxy
(master and current workers) are sampled. Used by the shortened test and by
bench/soak_bench.py (30 minutes, with a plot).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support import ROOT, ConsulAgent, Containers, Process, free_port, wait_until
from tests.traffic import Load, get, web

METRICS = ("rss_mib", "fds", "threads")
PROGRAMS = ("registrar", "templater", "haproxy")


@dataclass
class SoakResult:
    seconds: float
    requests: int
    failures: list[str]
    started: int  # containers
    stopped: int
    consul_restarts: int
    edits: int
    samples: list[dict[str, float]] = field(default_factory=list)  # t, <program>_<metric>

    def slope(self, key: str, warm_up: float) -> float:
        """Least-squares growth per minute of key over the samples after warm_up seconds."""
        points = [(s["t"], s[key]) for s in self.samples if s["t"] >= warm_up]
        if len(points) < 2:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        num = sum((t - mean_t) * (v - mean_v) for t, v in points)
        den = sum((t - mean_t) ** 2 for t, _ in points) or 1.0
        return num / den * 60.0

    def after(self, key: str, warm_up: float) -> tuple[float, float]:
        """(first, last) value of key after warm_up seconds."""
        values = [s[key] for s in self.samples if s["t"] >= warm_up]
        return values[0], values[-1]


def _usage(procs: list[psutil.Process]) -> dict[str, float]:
    rss = fds = threads = 0
    for proc in procs:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                fds += proc.num_fds()
                threads += proc.num_threads()
        except psutil.NoSuchProcess:
            continue
    return {"rss_mib": rss / 2**20, "fds": fds, "threads": threads}


def _haproxy(pid_file: Path) -> list[psutil.Process]:
    """The master and its current workers (old ones finishing after a reload are left out)."""
    try:
        master = psutil.Process(int(pid_file.read_text().split()[0]))
        children = master.children()
    except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
        return []
    newest = max((c.create_time() for c in children), default=0.0)
    return [master, *(c for c in children if c.create_time() == newest)]


def soak(
    consul: ConsulAgent,
    containers: Containers,
    workdir: Path,
    hostname: str,
    seconds: float,
    consul_every: float,
    edit_every: float,
    sample_every: float = 10.0,
    progress: Callable[[str], None] = lambda _line: None,
) -> SoakResult:
    template = workdir / "soak.cfg.j2"
    shutil.copy(ROOT / "templates" / "haproxy.cfg.j2", template)
    dest = workdir / "soak.cfg"
    port = free_port()
    registrar = Process("registrar", ["--consul", consul.url, "--hostname", hostname, "--retry-interval", "500"],
                        workdir, env={"PYTHONUNBUFFERED": "1"})  # fmt: skip
    templater = Process("templater", ["--consul", consul.url, "--template", f"{template}:{dest}", "--proxy", "haproxy",
                                      "--var", f"runtime_dir={workdir}", "--var", f"http_port={port}",
                                      "--var", "bind_address=127.0.0.1", "--drain-timeout", "10s", "--stop-proxy"],
                        workdir, env={"PYTHONUNBUFFERED": "1"})  # fmt: skip
    stoppers = ThreadPoolExecutor(4, thread_name_prefix="stopper")
    running: list[Any] = []
    counts = {"started": 0, "stopped": 0, "restarts": 0, "edits": 0}
    samples: list[dict[str, float]] = []
    try:
        wait_until(lambda: get(port, "nothing.test")[0] == 404, timeout=20, what="haproxy serving")
        for _ in range(3):
            running.append(web(containers, SERVICE_HTTP_HOST="soak.test"))
        wait_until(lambda: get(port, "soak.test")[0] == 200, timeout=30, what="soak routed")

        def passing() -> int:
            return len(consul.health("web", passing=True))

        def stop(container: Any, drain: bool) -> None:
            if drain:
                subprocess.run([sys.executable, "-m", "registrar.drain", "--consul", consul.url, "--drain", "2s",
                                "-t", "5", container.name], cwd=ROOT, capture_output=True, timeout=60)  # fmt: skip
            else:
                container.stop(timeout=5)
            container.remove(force=True)

        started = time.monotonic()
        next_consul, next_edit, next_sample = started + consul_every, started + edit_every, started
        with Load(port, "soak.test") as load:
            while (now := time.monotonic()) < started + seconds:
                if now >= next_sample:
                    row = {"t": now - started}
                    procs = {"registrar": [psutil.Process(registrar.proc.pid)],
                             "templater": [psutil.Process(templater.proc.pid)],
                             "haproxy": _haproxy(dest.with_name(dest.name + ".pid"))}  # fmt: skip
                    for name, found in procs.items():
                        row.update({f"{name}_{k}": v for k, v in _usage(found).items()})
                    samples.append(row)
                    progress(f"t={row['t']:.0f}s requests={load.ok} failures={len(load.failures)} "
                             + " ".join(f"{k}={v:.1f}" for k, v in row.items() if k != "t"))  # fmt: skip
                    next_sample += sample_every
                if now >= next_consul:
                    consul.restart()
                    counts["restarts"] += 1
                    next_consul += consul_every
                if now >= next_edit:
                    counts["edits"] += 1
                    with open(template, "a") as out:  # a line in the output: a new structure, a reload
                        out.write(f"# soak edit {counts['edits']}\n")
                    next_edit += edit_every
                running.append(web(containers, SERVICE_HTTP_HOST="soak.test"))
                counts["started"] += 1
                if len(running) > 4 and passing() >= 4:  # the oldest goes once enough others pass
                    gone = running.pop(0)
                    stoppers.submit(stop, gone, counts["stopped"] % 2 == 0)
                    counts["stopped"] += 1
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
            elapsed = time.monotonic() - started
        return SoakResult(elapsed, load.ok, list(load.failures), counts["started"], counts["stopped"],
                          counts["restarts"], counts["edits"], samples)  # fmt: skip
    finally:
        stoppers.shutdown(wait=True)
        for container in running:
            container.remove(force=True)
        templater.stop()
        registrar.stop()
