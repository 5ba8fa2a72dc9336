"""templater: watch Consul, render Jinja2 templates, validate, swap atomically, reload."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType

from sidecar import logs
from sidecar.consul_conn import warn_if_token_on_command_line
from sidecar.errors import SidecarError
from sidecar.status import StatusServer
from templater.haproxy_runtime import RuntimeHook
from templater.routes_page import RoutesPage, page_gate
from templater.runner import RELOAD_KEY, Runner
from templater.settings import SettingsError, settings_from
from templater.status import Metrics

log = logging.getLogger("templater")

FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from(argv)
    except SettingsError as err:
        print(f"templater: {err}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    metrics = Metrics()
    warn_if_token_on_command_line(argv, log)
    for note in settings.notes:
        log.info("consul-template flag %s", note)
    if settings.pid_file is not None:
        settings.pid_file.write_text(f"{os.getpid()}\n")
    hook = None
    if settings.proxy == "haproxy" and not settings.dry:
        hook = RuntimeHook(settings.templates[0].dest, settings.drain_timeout, metrics)
    try:
        runner = Runner(settings, metrics, hook, reread=(lambda: settings_from(argv)) if settings.config else None)
    except SidecarError as err:
        print(f"templater: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()
        runner.store.touch("stop")

    def on_forward(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP and settings.config:  # consul-template's reload: the files again
            runner.store.touch(RELOAD_KEY)
        elif runner.child is not None and runner.child.running():
            runner.child.signal(signum)
        else:
            runner.store.touch(f"signal:{signum}")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    for signum in FORWARDED:
        signal.signal(signum, on_forward)
    status = None
    if settings.status_addr:
        page = RoutesPage(runner, settings.register_service or "ingress")
        status = StatusServer(settings.status_addr, metrics.health, metrics.prometheus, page.answer,
                              page_gate(settings.status_addr[0], settings.status_token))  # fmt: skip
        status.start()
        log.info("status on http://%s:%d/health, routes page /routes", *settings.status_addr)
    log.info("templater starting consul=%s templates=%d", settings.consul.url, len(settings.templates))
    try:
        return runner.run(stop)
    finally:
        if status is not None:
            status.stop()
        if settings.pid_file is not None:
            settings.pid_file.unlink(missing_ok=True)
        log.info("templater stopped")


if __name__ == "__main__":
    raise SystemExit(main())
