"""Command line and environment -> frozen Settings, with registrator's flag meanings."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.parse
from dataclasses import dataclass

from registrar.docker_events import default_docker_url
from registrar.spec import SpecSettings
from sidecar.consul_conn import ConsulSettings, add_consul_arguments, consul_settings_from
from sidecar.goflags import Flag, FlagError, Peer, own_options, same, translate
from sidecar.status import parse_addr
from sidecar.version import version

_NO_TTL = "with Consul it does nothing here, as in registrator: health checks come from SERVICE_CHECK_* labels"
# registrator's flags (its run documentation), as its users write them
REGISTRATOR = Peer(
    "registrator",
    {
        **same("ip", "tags", "resync", "deregister", "retry-attempts", "retry-interval"),
        **same("internal", "explicit", "cleanup", "require-label", "version", boolean=True),
        "useIpFromLabel": Flag("--use-ip-from-label"),
        "ttl": Flag("", note=_NO_TTL),
        "ttl-refresh": Flag("", note=_NO_TTL),
    },
)


@dataclass(frozen=True)
class SyncSettings:
    spec: SpecSettings
    deregister: str = "always"  # or on-success
    cleanup: bool = False  # registrator compatibility: dangling services are always removed
    retry_interval: float = 2.0
    probe_window: float = 60.0


@dataclass(frozen=True)
class Settings:
    consul: ConsulSettings
    docker_url: str | None
    sync: SyncSettings
    resync: float
    retry_attempts: int
    log_level: str
    status_addr: tuple[str, int] | None = None
    register_self: str = "registrar"
    notes: tuple[str, ...] = ()  # registrator flags accepted that mean nothing here: logged at start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="registrar",
        description="Register the containers of this Docker host in the local Consul agent.",
    )
    p.add_argument(
        "registry",
        nargs="?",
        help="registrator-style registry URI such as consul://127.0.0.1:8500 (same as --consul)",
    )
    add_consul_arguments(p)
    p.add_argument(
        "--docker",
        default=default_docker_url(dict(os.environ), os.path.exists),
        help="Docker engine URL (DOCKER_HOST; else /var/run/docker.sock, or /tmp/docker.sock as registrator mounts it)",
    )
    p.add_argument("--hostname", default=socket.gethostname(), help="first part of every service ID")
    p.add_argument("--ip", default="", help="IP address to register services with")
    p.add_argument("--internal", action="store_true", help="register container IPs and exposed ports")
    p.add_argument(
        "--network",
        default="",
        help="with --internal: a container's address on this network, where it has one (a SERVICE_NETWORK "
        "label chooses per container)",
    )
    p.add_argument("--explicit", action="store_true", help="only register containers with SERVICE_NAME")
    p.add_argument(
        "--require-label", action="store_true", help="only register containers labelled SERVICE_REGISTER=true"
    )
    p.add_argument("--tags", default="", help="comma list of tags added to every service")
    p.add_argument("--use-ip-from-label", default="", help="label holding the IP to register")
    p.add_argument("--resync", type=float, default=0, help="seconds between full resyncs (0: never)")
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="registrator compatibility: this host's dangling services are always removed",
    )
    p.add_argument(
        "--allow-script-checks",
        action="store_true",
        help="accept SERVICE_CHECK_SCRIPT (the agent runs label text as a shell command)",
    )
    p.add_argument("--deregister", choices=("always", "on-success"), default="always")
    p.add_argument(
        "--retry-attempts",
        type=int,
        default=-1,
        help="attempts to reach Consul and Docker at start before exiting (-1: forever)",
    )
    p.add_argument("--retry-interval", type=int, default=2000, help="milliseconds between attempts")
    p.add_argument("--probe-window", type=float, default=60.0, help="seconds of fast readiness probing")
    p.add_argument(
        "--register-self",
        default="registrar",
        metavar="NAME",
        help="register the registrar itself under this service name, with a check that follows the "
        "Docker engine ('' to skip)",
    )
    p.add_argument(
        "--status-addr",
        default=os.environ.get("REGISTRAR_STATUS_ADDR"),
        help="HOST:PORT for /health and /metrics (REGISTRAR_STATUS_ADDR); loopback unless a host is given",
    )
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    p.add_argument("--version", action="version", version=f"registrar {version()}")
    return p


def parse(argv: list[str] | None = None) -> Settings:
    """Our options, and registrator's command line as it is (single dashes, Go booleans, the
    registry URI first or last)."""
    p = parser()
    try:
        translated = translate(sys.argv[1:] if argv is None else argv, REGISTRATOR, own_options(p))
    except FlagError as err:
        p.error(str(err))
    args = p.parse_args(translated.argv)
    if args.registry:
        uri = urllib.parse.urlparse(args.registry)
        if uri.scheme == "consul-unix":
            p.error(f"registry {args.registry!r}: the agent's unix socket is not supported; use consul://HOST:PORT")
        if uri.scheme not in ("consul", "consul-tls") or not uri.netloc:
            p.error(f"unsupported registry {args.registry!r}: consul://HOST:PORT or consul-tls://HOST:PORT")
        args.consul = f"{'https' if uri.scheme == 'consul-tls' else 'http'}://{uri.netloc}"
    tags = tuple(t.strip() for t in args.tags.split(",") if t.strip())
    spec = SpecSettings(
        hostname=args.hostname,
        ip=args.ip,
        internal=args.internal,
        explicit=args.explicit,
        force_tags=tags,
        use_ip_from_label=args.use_ip_from_label,
        allow_script_checks=args.allow_script_checks,
        require_label=args.require_label,
        network=args.network.strip(),
    )
    interval = max(0.05, args.retry_interval / 1000)
    sync = SyncSettings(
        spec=spec,
        deregister=args.deregister,
        cleanup=args.cleanup,
        retry_interval=interval,
        probe_window=args.probe_window,
    )
    return Settings(
        consul=consul_settings_from(args),
        docker_url=args.docker,
        sync=sync,
        resync=args.resync,
        retry_attempts=args.retry_attempts,
        log_level=args.log_level,
        status_addr=_status_addr(args.status_addr) if args.status_addr else None,
        register_self=args.register_self,
        notes=tuple(translated.notes),
    )


def _status_addr(text: str) -> tuple[str, int]:
    try:
        return parse_addr(text)
    except ValueError as err:
        parser().error(str(err))
        raise
