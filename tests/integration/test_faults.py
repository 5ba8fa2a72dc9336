"""Faults from outside the programs (issue 21): a disk that fills up or turns read-only."""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.test_hardening import RAW_WEIGHT, admin, register
from tests.support import TcpForwarder, free_port, health, wait_until
from tests.traffic import get

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of our own, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backends() -> Iterator[list[int]]:
    """Three HTTP backends on free ports that answer 200: the instances behind the proxy."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Ok) for _ in range(3)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [server.server_address[1] for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no room left; the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):  # unbuffered: nothing left to flush
        while True:
            out.write(b"x" * 4096)
    with pytest.raises(OSError) as err:
        (directory / "probe").write_bytes(b"x" * 8192)
    assert err.value.errno == errno.ENOSPC
    return filler


def test_a_full_then_read_only_disk_keeps_the_last_good_file_and_recovers_by_itself(
    consul, templater, tmp_path, small_disk, backends
):
    """Full: the change reaches HAProxy at runtime, the file on disk stays the last good one
    (never a partial one), /health names the path, the error is said once, and once there is
    room the file is written without any new change. Read-only: the same."""
    port, status = free_port(), free_port()
    src = tmp_path / "raw.j2"
    src.write_text(RAW_WEIGHT)
    dest = small_disk / "raw.cfg"
    register(consul, "f1", "raw", backends[0])
    proc = templater(
        "--template", f"{src}:{dest}", "--proxy", "haproxy", "--stop-proxy", "--status-addr", f"127.0.0.1:{status}",
        "--var", f"dir={tmp_path}", "--var", f"port={port}",
    )  # fmt: skip
    wait_until(lambda: get(port, "x", "/")[0] == 200, timeout=15, what="haproxy serving")
    wait_until(lambda: "server f1 " in dest.read_text(), what="first file")
    assert health(status)[0] == 200

    filler = fill(small_disk)
    good = dest.read_text()
    register(consul, "f2", "raw", backends[1])
    wait_until(lambda: health(status)[0] == 503, timeout=10, what="the write failure in /health")
    problems = health(status)[1]["problems"]
    writes = [v for k, v in problems.items() if k.startswith("write:")]
    assert writes and all(str(dest) in v and "No space left" in v for v in writes), problems
    wait_until(lambda: " f2 " in admin(tmp_path / "admin.sock", "show servers state be"), what="f2 at runtime")
    wait_until(lambda: proc.output().count("trying again") >= 1, what="the error in the log")
    assert dest.read_text() == good and get(port, "x", "/")[0] == 200
    assert [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")] == []  # no staged file left
    time.sleep(3.5)  # two retries later (1 s, then 2 s): said once, and never applied at runtime again
    assert proc.output().count("No space left") == 1 and "refused" not in proc.output()
    assert dest.read_text() == good

    filler.unlink()
    wait_until(lambda: "server f2 " in dest.read_text(), timeout=40, what="the file written once there is room")
    wait_until(lambda: health(status)[0] == 200, timeout=10, what="healthy again")
    assert "wrote " in proc.output() and " again" in proc.output()

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        register(consul, "f3", "raw", backends[2])
        wait_until(lambda: health(status)[0] == 503, timeout=10, what="read-only in /health")
        assert "Read-only file system" in " ".join(health(status)[1]["problems"].values())
        assert "server f3 " not in dest.read_text() and get(port, "x", "/")[0] == 200
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    wait_until(lambda: "server f3 " in dest.read_text(), timeout=40, what="written once it is writable")
    wait_until(lambda: health(status)[0] == 200, timeout=10, what="healthy again")
    assert proc.alive()


class FaultyConsul(TcpForwarder):
    """The agent through a forwarder that adds `delay` to every chunk of every answer and, while
    cutting, closes every open connection (blocking queries included) every `every` seconds."""

    name = "faulty-consul"

    def __init__(self, target_port: int, delay: float) -> None:
        super().__init__(target_port)
        self.delay = delay
        self.cuts = 0
        self._cutting = threading.Event()

    def seen(self, data: bytes, upstream: bool) -> None:
        if not upstream and self.delay:
            time.sleep(self.delay)

    def cut_every(self, every: float, until: threading.Event) -> threading.Thread:
        def run() -> None:
            while not until.wait(every):
                with self._lock:
                    conns, self._conns = self._conns, []
                for conn in conns:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                self.cuts += 1

        thread = threading.Thread(target=run, name="cutter", daemon=True)
        thread.start()
        return thread


LISTING = "# begin\n{% for i in service('slow') %}{{ i.id }} {{ i.port }}\n{% endfor %}# end\n"


def test_a_slow_consul_that_cuts_its_connections_never_empties_the_output(consul, templater, tmp_path):
    """300 ms added to every answer, every connection cut every 0.7 s, blocking queries
    half-way included: no crash, never an emptied or partial file, a bounded number of
    connections, every change in the end; and once it heals, a change within a retry interval."""
    for n in range(3):
        register(consul, f"slow{n}", "slow", 9600 + n)
    faulty = FaultyConsul(consul.http_port, delay=0.3)
    faulty.start()
    src, dest, status = tmp_path / "slow.j2", tmp_path / "slow.txt", free_port()
    src.write_text(LISTING)
    proc = templater("--consul", faulty.url, "--template", f"{src}:{dest}", "--status-addr", f"127.0.0.1:{status}")
    stop = threading.Event()
    bad: list[str] = []
    try:
        wait_until(lambda: dest.exists() and dest.read_text().count("\n") == 5, timeout=20, what="first file")

        def read_all_along() -> None:
            while not stop.is_set():
                text = dest.read_text()
                if not (text.startswith("# begin\n") and text.endswith("# end\n")) or text.count("\n") < 4:
                    bad.append(text)
                time.sleep(0.005)

        reader = threading.Thread(target=read_all_along, daemon=True)
        reader.start()
        faulty.cut_every(0.7, stop)
        register(consul, "slow3", "slow", 9603)
        register(consul, "slow4", "slow", 9604)
        consul.put("/v1/agent/service/deregister/slow0", None)
        want = {f"slow{n} {9600 + n}" for n in range(1, 5)}
        wait_until(lambda: set(dest.read_text().splitlines()[1:-1]) == want, timeout=30, what="every change")
        time.sleep(3.0)  # more cuts with nothing changing
        pid = proc.proc.pid
        conns = [c for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == faulty.port]
        assert faulty.cuts >= 4 and proc.alive()
        assert len(conns) <= 12, conns  # the node, its list, two check states, the read pool: not one per cut
    finally:
        stop.set()
    assert bad == [], bad[:3]
    faulty.delay = 0.0  # healed
    time.sleep(2.5)  # one retry interval (--retry-max-backoff 2s) for a watch cut last
    started = time.monotonic()
    register(consul, "slow5", "slow", 9605)
    wait_until(lambda: "slow5 9605" in dest.read_text(), timeout=10, what="a change after it healed")
    assert time.monotonic() - started < 2.5
    faulty.stop()


def test_a_registrar_killed_while_containers_come_and_go_restores_the_catalog_at_start(
    consul, containers, registrar, hostname
):
    """SIGKILL while containers start, stop and are removed about once a second; started again
    10 s later: the agent lists exactly the running containers (ours) within 2 s of its start."""
    proc = registrar("--cleanup")
    running = [containers.run(labels={"SERVICE_NAME": "churn"}) for _ in range(3)]

    def ours() -> set[str]:
        return {sid for sid, s in consul.services().items() if s["Service"] == "churn" and sid.startswith(hostname)}

    def want() -> set[str]:
        return {f"{hostname}:{c.name}:8080" for c in running}

    def churn(seconds: float) -> None:
        """A container started, and one stopped (or removed) about every second."""
        end = time.monotonic() + seconds
        step = 0
        while time.monotonic() < end:
            step += 1
            running.append(containers.run(labels={"SERVICE_NAME": "churn"}))
            gone = running.pop(0)
            if step % 2:
                gone.stop(timeout=1)
            else:
                gone.remove(force=True)
            time.sleep(0.5)

    wait_until(lambda: ours() == want(), timeout=10, what="registered")
    churn(3.0)
    proc.stop(signal.SIGKILL)
    churn(10.0)
    started = time.monotonic()
    registrar("--cleanup", ready=False)
    wait_until(lambda: ours() == want(), timeout=10, what="the catalog equal to the running containers")
    took = time.monotonic() - started
    assert took < 2.0, f"{took:.2f} s after its start"
