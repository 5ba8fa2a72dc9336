"""registrar: wire settings, Docker, Consul and the sync loop; run until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from registrar import settings as settings_mod
from registrar.consul_registry import ConsulRegistry
from registrar.docker_events import DockerSource, DockerWatcher
from registrar.errors import BackendUnavailable
from registrar.sync import Syncer
from sidecar import logs
from sidecar.backoff import sleep

log = logging.getLogger("registrar")


def wait_for(name: str, ping: Callable[[], None], attempts: int, interval: float, stop: threading.Event) -> bool:
    """registrator's --retry-attempts: give up after that many failures (-1: never)."""
    tried = 0
    while not stop.is_set():
        try:
            ping()
            return True
        except BackendUnavailable as err:
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
    stop = threading.Event()
    registry = ConsulRegistry(settings.consul)
    source = DockerSource(settings.docker_url)
    syncer = Syncer(registry, settings.sync)
    watcher = DockerWatcher(source, syncer.submit, settings.sync.retry_interval)

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
    threads = [
        threading.Thread(target=syncer.run, args=(stop,), name="sync", daemon=True),
        threading.Thread(target=watcher.run, args=(stop,), name="docker-events", daemon=True),
    ]
    if settings.resync > 0:
        threads.append(
            threading.Thread(target=resync_loop, args=(watcher, settings.resync, stop), name="resync", daemon=True)
        )
    for thread in threads:
        thread.start()
    while not stop.wait(0.5):
        if not all(t.is_alive() for t in threads):
            log.error("a worker thread ended unexpectedly; exiting")
            return 1
    for thread in threads:
        thread.join(timeout=5)
    return 0


def resync_loop(watcher: DockerWatcher, every: float, stop: threading.Event) -> None:
    while not sleep(stop, every):
        if not watcher.connected.is_set():
            continue
        try:
            watcher.list_all()
        except BackendUnavailable as err:
            log.warning("resync skipped: %s", err)


if __name__ == "__main__":
    sys.exit(main())
