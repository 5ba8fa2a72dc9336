"""sidecar-drain: a Docker authorization plugin that drains a container's services before any
client stops it (docker stop, restart, rm -f, kill, docker-compose down, an SDK).

    sidecar-drain [--consul URL] [--drain 2s] [--socket /run/docker/plugins/consul-sidecar-drain.sock]
                  [--engine-config /etc/docker/daemon.json --engine-pid /var/run/docker.pid]

An authorization plugin sits in the path of every Docker API call, and the engine fails closed
when it cannot reach one (it retries for 30 s, then refuses the call). This process is built so
that Docker does not notice it:
- the guard (this process) owns the listening socket and runs the plugin as a worker process;
  a worker that dies or stops turning its loop (killed, stopped, hung) is killed and started
  again while the socket stays open, so the engine's calls wait in its backlog for about a
  second instead of being refused;
- with --engine-config the plugin adds itself to dockerd's `authorization-plugins` once it
  listens and takes itself out before it exits (SIGHUP makes dockerd reload the file), and a
  worker whose guard is killed takes the plugin out too: a plugin stopped on purpose or lost
  leaves Docker as it was (fail open), with a log line saying so;
- the worker never refuses a call and bounds every wait (drain_plugin).
The plugin's name is the socket's file name without .sock (dockerd finds it in
/run/docker/plugins by that name).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from registrar import authz
from registrar.consul_registry import ConsulRegistry
from registrar.docker_events import DockerSource, default_docker_url
from registrar.drain_plugin import Drainer, DrainSettings, serve
from registrar.engine_config import EngineConfig
from sidecar import logs
from sidecar.consul_conn import add_consul_arguments, consul_settings_from
from sidecar.durations import parse_duration
from sidecar.errors import SidecarError
from sidecar.logs import kv
from sidecar.signals import terminate

log = logging.getLogger("registrar.drain")

DEFAULT_SOCKET = "/run/docker/plugins/consul-sidecar-drain.sock"
HUNG_AFTER = 2.0  # a worker whose loop has not turned for this long is restarted
RESTART_CAP = 2.0
RELOAD_SETTLE = 0.3  # for dockerd to apply a reload before the plugin goes away


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar-drain",
        description="Docker authorization plugin: drain a container's services in Consul before it is stopped.",
    )
    add_consul_arguments(p)
    env = os.environ.get
    p.add_argument("--socket", default=env("SIDECAR_DRAIN_SOCKET", DEFAULT_SOCKET),
                   help=f"the plugin's socket; its file name less .sock names it ({DEFAULT_SOCKET})")  # fmt: skip
    p.add_argument("--drain", default=env("SIDECAR_DRAIN", "2s"),
                   help="wait this long between the maintenance and the stop (2s)")  # fmt: skip
    p.add_argument("--consul-wait", default="3s", help="give up on the local agent's answers after this long (3s)")
    p.add_argument("--engine-config", default=env("SIDECAR_ENGINE_CONFIG"),
                   help="dockerd's --config-file: the plugin is in it while it runs, out when it stops")  # fmt: skip
    p.add_argument("--engine-pid", default=env("SIDECAR_ENGINE_PID", "/var/run/docker.pid"),
                   help="dockerd's PID, pid file, or auto (the one dockerd process; /var/run/docker.pid)")  # fmt: skip
    p.add_argument("--docker", default=default_docker_url(dict(os.environ), os.path.exists),
                   help="Docker engine URL, to learn the name of the plugin's own container")  # fmt: skip
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    p.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def plugin_name(path: str) -> str:
    name = Path(path).name
    return name[: -len(".sock")] if name.endswith(".sock") else name


def _engine(args: argparse.Namespace) -> EngineConfig | None:
    return EngineConfig(Path(args.engine_config), str(args.engine_pid)) if args.engine_config else None


def _take_out(engine: EngineConfig | None, name: str, why: str) -> None:
    if engine is None:
        return
    try:
        if engine.set_plugin(name, False):
            log.warning("plugin taken out of the engine %s", kv(plugin=name, why=why))
            time.sleep(RELOAD_SETTLE)
    except SidecarError as err:
        log.error("could not take the plugin out of the engine %s", kv(plugin=name, why=why, error=str(err)))


def wait_readable(fd: int, seconds: float) -> bool:
    ready, _, _ = select.select([fd], [], [], seconds)
    return bool(ready)


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _learn_own_container(drainer: Drainer, docker_url: str | None) -> None:
    """The plugin's own container and its name, so that a stop of it takes the plugin out of
    the engine first. The name takes one inspect, which the engine passes through this very
    plugin: it runs in its own thread once the worker serves."""
    try:
        own_id = authz.own_container_id(Path("/proc/self/mountinfo").read_text())
    except OSError:
        own_id = None
    if own_id is None:
        return
    drainer.own_id = own_id

    def learn() -> None:
        try:
            info = DockerSource(docker_url, timeout=10.0).inspect(own_id)
        except SidecarError as err:
            log.warning("own container's name unknown %s", kv(id=own_id[:12], error=str(err)))
            return
        drainer.own_name = str((info or {}).get("Name") or "").lstrip("/")
        log.info("own container %s", kv(id=own_id[:12], name=drainer.own_name))

    threading.Thread(target=learn, name="own-container", daemon=True).start()


def worker(args: argparse.Namespace, settings: DrainSettings) -> int:
    stop = threading.Event()
    _stop_on_signals(stop)
    listener = socket.socket(fileno=args.worker_fd)
    heartbeat = args.heartbeat_fd
    if heartbeat is not None:
        os.set_blocking(heartbeat, False)
    name = plugin_name(args.socket)
    drainer = Drainer(
        ConsulRegistry(consul_settings_from(args), timeout=settings.consul_wait),
        settings,
        lambda why: _take_out(_engine(args), name, why),
    )
    _learn_own_container(drainer, args.docker)
    if serve(listener, drainer, heartbeat, stop):
        _take_out(_engine(args), name, "its guard process is gone")
    deadline = time.monotonic() + settings.drain + settings.consul_wait
    while drainer.busy and time.monotonic() < deadline:  # the calls being drained get their answer
        time.sleep(0.05)
    return 0


class Guard:
    """Owns the socket, runs one worker, restarts it when it dies or hangs."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self._args = args
        self._argv = argv
        self._listener = self._listen(args.socket)
        self._beats_r, self._beats_w = os.pipe()
        os.set_blocking(self._beats_r, False)
        fcntl.fcntl(self._beats_r, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        self.worker: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @staticmethod
    def _listen(path: str) -> socket.socket:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                pass  # nothing listens: a file left by a plugin that was killed
            else:
                raise OSError(errno.EADDRINUSE, "another plugin listens on it")
        Path(path).unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)  # the engine runs as root; nobody else needs to ask
        listener.listen(128)
        return listener

    def start_worker(self) -> None:
        fd, beats = self._listener.fileno(), self._beats_w
        argv = [sys.executable, "-m", "registrar.drain_guard", *self._argv,
                "--worker-fd", str(fd), "--heartbeat-fd", str(beats)]  # fmt: skip
        self.worker = subprocess.Popen(argv, pass_fds=(fd, beats))
        log.info("worker started %s", kv(pid=self.worker.pid, socket=self._args.socket))

    def _beat(self) -> bool:
        """Whether the worker's loop turned since the last look."""
        seen = False
        try:
            while os.read(self._beats_r, 4096):
                seen = True
        except BlockingIOError:
            pass
        return seen

    def wait_ready(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if wait_readable(self._beats_r, 0.1) and self._beat():
                return True
            if self.worker is not None and self.worker.poll() is not None:
                return False
        return False

    def run(self, stop: threading.Event) -> None:
        last_beat = time.monotonic()
        delay = 0.1
        while not stop.is_set():
            wait_readable(self._beats_r, 0.2)
            now = time.monotonic()
            if self._beat():
                last_beat = now
            assert self.worker is not None
            code = self.worker.poll()
            if code is None and now - last_beat > HUNG_AFTER:
                log.warning("worker hung: restarting it %s", kv(pid=self.worker.pid, silent=f"{now - last_beat:.1f}s"))
                self.worker.kill()
                code = self.worker.wait()
            if code is None:
                if now - last_beat < 0.5:
                    delay = 0.1
                continue
            log.warning("worker exited: restarting it %s", kv(pid=self.worker.pid, code=code, after=f"{delay:.1f}s"))
            if stop.wait(delay):
                break
            delay = min(delay * 2, RESTART_CAP)
            self.restarts += 1
            self.start_worker()
            last_beat = time.monotonic()

    def close(self, grace: float) -> None:
        if self.worker is not None:
            terminate(self.worker, signal.SIGTERM, grace, "drain worker")
        self._listener.close()
        Path(self._args.socket).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(raw)
    logs.setup(args.log_level)
    try:
        settings = DrainSettings(parse_duration(args.drain), parse_duration(args.consul_wait))
    except ValueError as err:
        print(f"sidecar-drain: {err}", file=sys.stderr)
        return 2
    if args.worker_fd is not None:
        return worker(args, settings)
    name = plugin_name(args.socket)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        guard = Guard(args, raw)
    except OSError as err:
        print(f"sidecar-drain: socket {args.socket}: {err.strerror}", file=sys.stderr)
        return 1
    guard.start_worker()
    if not guard.wait_ready(10.0):
        log.error("worker did not start %s", kv(plugin=name))
    engine = _engine(args)
    if engine is not None:
        try:
            engine.set_plugin(name, True)
        except SidecarError as err:  # serving anyway: an operator may have set the engine up by hand
            log.error("could not add the plugin to the engine %s", kv(plugin=name, error=str(err)))
    config = args.engine_config or "-"
    log.info("serving %s", kv(plugin=name, socket=args.socket, drain=args.drain, engine_config=config))
    try:
        guard.run(stop)
    finally:
        _take_out(engine, name, "sidecar-drain is stopping")
        guard.close(settings.drain + settings.consul_wait + 1.0)
    log.info("stopped %s", kv(plugin=name, restarts=guard.restarts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
