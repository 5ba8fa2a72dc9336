"""registrar: wire settings, Docker, Consul and the sync loop; run until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
from collections.abc import Callable

from registrar import settings as settings_mod
from registrar.consul_registry import ConsulRegistry
from registrar.docker_events import DockerSource, DockerWatcher
from registrar.errors import ConsulRejected, Unavailable
from registrar.status import RegistrarStatus
from registrar.sync import Syncer
from sidecar import logs
from sidecar.backoff import sleep
from sidecar.consul_conn import warn_if_token_on_command_line
from sidecar.consul_http import ConsulHTTP
from sidecar.own_registration import OwnRegistration, OwnService
from sidecar.status import StatusServer
from sidecar.threads import Supervisor
from sidecar.version import version

log = logging.getLogger("registrar")


def wait_for(name: str, ping: Callable[[], None], attempts: int, interval: float, stop: threading.Event) -> bool:
    """registrator's --retry-attempts: give up after that many failures (-1: never)."""
    tried = 0
    while not stop.is_set():
        try:
            ping()
            return True
        except (Unavailable, ConsulRejected) as err:  # a token without agent:read waits like an agent down
            tried += 1
            if attempts >= 0 and tried > attempts:
                log.error("giving up on %s after %d attempts: %s", name, tried, err)
                return False
            if tried == 1:
                log.warning("waiting for %s: %s", name, err)
        sleep(stop, interval)
    return False


def main(argv: list[str] | None = None) -> int:
    settings = settings_mod.parse(argv)
    logs.setup(settings.log_level)
    warn_if_token_on_command_line(argv, log)
    for note in settings.notes:
        log.info("registrator flag %s", note)
    stop = threading.Event()
    registry = ConsulRegistry(settings.consul)
    source = DockerSource(settings.docker_url)
    supervisor = Supervisor()
    # the syncer registers what the watcher sees; the watcher's state is the syncer's own check
    view = RegistrarStatus(supervisor)
    own = own_service(settings, source.describe())
    own_registration = OwnRegistration(ConsulHTTP(settings.consul, 5.0))
    watcher: DockerWatcher | None = None

    def docker_state() -> tuple[bool, str]:
        return watcher.state() if watcher is not None else (False, "starting")

    syncer = Syncer(registry, settings.sync, (own, own_registration) if own else None, docker_state, view.registered)
    watcher = DockerWatcher(source, syncer.submit, syncer.mark, settings.sync.retry_interval)
    view.follow(watcher, syncer)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()
        watcher.stop()
        syncer.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    interval = settings.sync.retry_interval
    if settings.retry_attempts >= 0 and not (
        wait_for(f"consul {settings.consul.url}", registry.ping, settings.retry_attempts, interval, stop)
        and wait_for(f"docker {source.describe()}", source.ping, settings.retry_attempts, interval, stop)
    ):
        return 1
    log.info(
        "starting %s",
        logs.kv(consul=settings.consul.url, docker=source.describe(), hostname=settings.sync.spec.hostname),
    )
    status = None
    if settings.status_addr:
        status = StatusServer(settings.status_addr, view.health, view.prometheus)
        status.start()
        log.info("status on http://%s:%d/health", *settings.status_addr)
    threads = [
        supervisor.start("sync", lambda: syncer.run(stop), stop),
        supervisor.start("docker-events", lambda: watcher.run(stop), stop),
    ]
    if settings.resync > 0:
        threads.append(supervisor.start("resync", lambda: resync_loop(watcher, settings.resync, stop), stop))
    while not stop.wait(0.5):
        pass
    for thread in threads:
        thread.join(timeout=5)
    if status is not None:
        status.stop()
    return 0


def own_service(settings: settings_mod.Settings, docker: str) -> OwnService | None:
    """The registrar's own registration, shown in the Consul UI beside the containers'."""
    if not settings.register_self:
        return None
    hostname = settings.sync.spec.hostname
    return OwnService(
        id=f"{settings.register_self}:{hostname}",
        name=settings.register_self,
        port=settings.status_addr[1] if settings.status_addr else 0,
        address=settings.sync.spec.ip,
        tags=("sidecar",),
        # meta values are tokens: the templater leaves out (with a warning) one with a space
        meta=(("registrar_host", hostname), ("docker", re.sub(r"\s+", "-", docker)[:200]), ("version", version())),
        check_name="Follows the Docker engine (event stream connected)",
        check_notes=f"The registrar on {hostname}: passing while it follows the Docker engine's events",
    )


def resync_loop(watcher: DockerWatcher, every: float, stop: threading.Event) -> None:
    while not sleep(stop, every):
        if not watcher.connected.is_set():
            continue
        try:
            watcher.list_all()
        except Unavailable as err:
            log.warning("resync skipped: %s", err)


if __name__ == "__main__":
    sys.exit(main())
