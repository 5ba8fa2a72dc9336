"""Command line and environment -> Settings (consul-template's flag habits)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar import signals, status
from sidecar.consul_conn import ConsulSettings, add_consul_arguments, consul_settings_from
from sidecar.durations import parse_duration
from sidecar.goflags import Flag, FlagError, Peer, consul_address, own_options, same, translate
from sidecar.version import version
from templater import ct_config
from templater.dns_records import Naming, absolute, check_template, valid_domain
from templater.template_spec import TemplateSpec


@dataclass(frozen=True)
class DnsSettings:
    """External DNS (--dns-zone): RFC 2136 updates of an authoritative zone."""

    naming: Naming  # zone, environment, name template, owner, ingress service, dc
    server: tuple[str, int]
    key_file: Path | None
    ttl: int = 30
    interval: float = 30.0


@dataclass(frozen=True)
class Settings:
    consul: ConsulSettings
    templates: tuple[TemplateSpec, ...]
    variables: dict[str, str] = field(default_factory=dict)
    wait_min: float = 0.0
    wait_max: float = 0.0
    reload_interval: float = 0.0
    once: bool = False
    dry: bool = False
    check: str | None = None
    backup: bool = False
    exec_command: str | None = None
    reload_signal: int | None = None
    kill_signal: int = signal.SIGTERM
    kill_timeout: float = 30.0
    proxy: str | None = None
    proxy_pid_file: Path | None = None
    status_addr: tuple[str, int] | None = None
    status_token: str = ""  # for the routes page and its API where the status address is not loopback
    max_stale_ms: int = 2000
    retry_attempts: int = 12
    env_allow: tuple[str, ...] = ()
    retry_backoff: float = 0.25
    retry_max_backoff: float = 2.0
    empty_grace: float = 15.0
    drain_timeout: float = 30.0
    stop_proxy: bool = False
    register_service: str = ""
    register_address: str = ""
    log_level: str = "INFO"
    pid_file: Path | None = None  # consul-template's -pid-file: this process's pid, while it runs
    notes: tuple[str, ...] = ()  # consul-template flags accepted that mean something else here
    config: tuple[str, ...] = ()  # the -config paths, read again on SIGHUP
    dns: DnsSettings | None = None


class SettingsError(ValueError):
    pass


def parse_template(text: str) -> TemplateSpec:
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SettingsError(f"--template {text!r}: expected SRC:DEST[:COMMAND]")
    return TemplateSpec(
        Path(parts[0]).absolute(), Path(parts[1]).absolute(), parts[2] if len(parts) > 2 and parts[2] else None
    )


def parse_wait(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    try:
        low = parse_duration(lo)
        high = parse_duration(hi) if hi else low * 4
    except ValueError as err:
        raise SettingsError(f"--wait {text!r}: {err}") from err
    if high < low:
        raise SettingsError(f"--wait {text!r}: MAX is below MIN")
    return low, high


def parse_signal(text: str | None, flag: str) -> int | None:
    if not text:
        return None
    number = signals.parse_signal(text)
    if number is None:
        raise SettingsError(f"{flag} {text!r}: not a signal name")
    return number


def _read_token(path: str | None) -> str:
    if not path:
        return ""
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise SettingsError(f"--status-token-file {path}: {err.strerror}") from err
    if len(token) < 16:
        raise SettingsError(f"--status-token-file {path}: the token is shorter than 16 characters")
    return token


def parse_addr(text: str) -> tuple[str, int]:
    try:
        return status.parse_addr(text)
    except ValueError as err:
        raise SettingsError(f"--status-addr: {err}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="templater", description="Render Consul data into proxy configuration.")
    add_consul_arguments(parser)
    _consul_arguments(parser.add_argument_group("reading Consul", "how the data is read, and held"))
    _template_arguments(parser.add_argument_group("templates", "what is rendered where, and when"))
    _proxy_arguments(parser.add_argument_group("proxy", "the proxy the first template configures"))
    _dns_arguments(parser.add_argument_group("external DNS", "keep an authoritative zone in step (RFC 2136 + TSIG)"))
    parser.add_argument(
        "--status-addr",
        default=os.environ.get("TEMPLATER_STATUS_ADDR"),
        help="HOST:PORT for /health and /metrics (TEMPLATER_STATUS_ADDR); loopback unless a host is given",
    )
    parser.add_argument(
        "--status-token-file",
        default=os.environ.get("TEMPLATER_STATUS_TOKEN_FILE"),
        help="the token the routes page and /api/routes ask for when --status-addr is not loopback",
    )
    parser.add_argument("--log-level", default="INFO", type=_log_level)
    parser.add_argument("--pid-file", help="write this process's pid here while it runs")
    parser.add_argument("--consul-ssl", action="store_true", help=argparse.SUPPRESS)  # -consul-ssl: https
    parser.add_argument("--version", action="version", version=f"templater {version()}")
    return parser


def _log_level(text: str) -> str:
    """Ours (INFO) or consul-template's (info, warn, err, trace) as a logging level name."""
    return {"WARN": "WARNING", "ERR": "ERROR", "TRACE": "DEBUG"}.get(text.upper(), text.upper())


# consul-template's flags, as its users write them
CONSUL_TEMPLATE = Peer(
    "consul-template",
    {
        **same("template", "config", "exec", "max-stale", "wait", "log-level", "pid-file"),
        **same("once", "dry", "version", boolean=True),
        "consul-addr": Flag("--consul", value=consul_address),
        "consul-token": Flag("--token"),
        "consul-ssl": Flag("--consul-ssl", boolean=True),
        "consul-ssl-ca-cert": Flag("--ca-file"),
        "consul-ssl-cert": Flag("--cert-file"),
        "consul-ssl-key": Flag("--key-file"),
        "consul-ssl-verify": Flag("", boolean=True, refuse_false="give the agent's CA with -consul-ssl-ca-cert"),
        "consul-retry": Flag(
            "", boolean=True, refuse_false="the templater always retries; -consul-retry-attempts bounds it with -once"
        ),
        "consul-retry-attempts": Flag("--retry-attempts"),
        "consul-retry-backoff": Flag("--retry-backoff"),
        "consul-retry-max-backoff": Flag("--retry-max-backoff"),
        "exec-reload-signal": Flag("--reload-signal"),
        "exec-kill-signal": Flag("--kill-signal"),
        "exec-kill-timeout": Flag("--kill-timeout"),
        "reload-signal": Flag("", note="accepted: templates are read again whenever their files change"),
        "kill-signal": Flag("", note="accepted: the templater stops on SIGINT and SIGTERM"),
    },
    unsupported={"vault-addr": "Vault is not supported"},
)


def _consul_arguments(parser: Any) -> None:
    parser.add_argument(
        "--max-stale",
        default="2s",
        help="read from any server while its last contact with the leader is at most this old, else ask "
        "the leader (consul-template's -max-stale; default 2s; 0 sends every read to the leader)",
    )
    parser.add_argument(
        "--retry-attempts",
        type=int,
        default=12,
        help="with --once: give up (exit 1) after this many failed attempts of one query in a row (0: never); "
        "a daemon retries forever and keeps its last good output",
    )
    parser.add_argument("--retry-backoff", default="250ms", help="first delay after a failed Consul query")
    parser.add_argument("--retry-max-backoff", default="2s", help="the delay doubles up to this")
    parser.add_argument("--empty-grace", default="15s", help="hold a service whose instances all vanish at once")


def _template_arguments(parser: Any) -> None:
    parser.add_argument(
        "--env-allow",
        default=os.environ.get("TEMPLATER_ENV_ALLOW", ""),
        metavar="NAME[,NAME]",
        help="environment variables templates may read with env() (shell patterns such as APP_*; "
        "TEMPLATER_ENV_ALLOW); any other name fails the render",
    )
    parser.add_argument("--template", action="append", default=[], metavar="SRC:DEST[:COMMAND]")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE|DIR",
        help="consul-template configuration files (HCL or JSON; a directory's files in lexical order), "
        "read again on SIGHUP; the command line wins over them",
    )
    parser.add_argument("--var", action="append", default=[], metavar="KEY=VALUE", help="templates see vars.KEY")
    parser.add_argument("--wait", default="0s", metavar="MIN[:MAX]", help="quiescence before rendering")
    parser.add_argument(
        "--reload-interval",
        default=None,
        metavar="DURATION",
        help="at least this long between two writes (and reloads): a lone change goes at once, a burst "
        "costs one reload per interval (default 500ms with --proxy nginx, else 0)",
    )
    parser.add_argument("--once", action="store_true", help="render once and exit")
    parser.add_argument("--dry", action="store_true", help="print renders to stdout, touch nothing")
    parser.add_argument("--check", help="validate the staged file; {} is its path")
    parser.add_argument("--backup", action="store_true", help="keep DEST.bak of the previous file")
    parser.add_argument("--exec", dest="exec_command", help="supervise this child process")
    parser.add_argument("--reload-signal", help="signal the child gets when a template changed")
    parser.add_argument("--kill-signal", default="SIGTERM", help="signal that stops the child")
    parser.add_argument("--kill-timeout", default="30s", help="wait this long before SIGKILL")


def _proxy_arguments(parser: Any) -> None:
    parser.add_argument("--proxy", choices=("haproxy", "nginx"), help="preset for the real proxies")
    parser.add_argument("--proxy-pid-file", help="where to find (or put) the proxy's master pid")
    parser.add_argument("--drain-timeout", default="30s", help="HAProxy: remove a draining server after this long")
    parser.add_argument(
        "--stop-proxy",
        action="store_true",
        default=os.environ.get("TEMPLATER_STOP_PROXY", "").lower() in ("1", "true", "yes"),
        help="stop the proxy when the templater stops (by default it keeps serving and a new templater adopts it)",
    )
    parser.add_argument(
        "--register-service",
        default=os.environ.get("TEMPLATER_REGISTER_SERVICE", "ingress"),
        metavar="NAME",
        help="with --proxy: register the proxy in Consul under this name, with a check that follows the "
        "templater's state ('' to skip)",
    )
    parser.add_argument("--register-address", default="", help="its address (default: the agent's)")


def _dns_arguments(dns: Any) -> None:
    dns.add_argument(
        "--dns-zone",
        default=os.environ.get("TEMPLATER_DNS_ZONE", ""),
        help="the zone to update, e.g. example.com (TEMPLATER_DNS_ZONE); enables external DNS",
    )
    dns.add_argument(
        "--dns-server",
        default=os.environ.get("TEMPLATER_DNS_SERVER", "127.0.0.1:53"),
        metavar="HOST:PORT",
        help="its primary server (TEMPLATER_DNS_SERVER; default 127.0.0.1:53)",
    )
    dns.add_argument(
        "--dns-key-file",
        default=os.environ.get("TEMPLATER_DNS_KEY_FILE"),
        help="TSIG key in BIND's format, as tsig-keygen writes it (TEMPLATER_DNS_KEY_FILE)",
    )
    dns.add_argument("--dns-environment", default="", help="names are <service>.<environment>.<zone> (Rancher's)")
    dns.add_argument(
        "--dns-name",
        default="",
        metavar="TEMPLATE",
        help="name template over {service}, {environment}, {zone}, {dc} "
        "(default {service}.{environment}.{zone}, or {service}.{zone} with no environment)",
    )
    dns.add_argument(
        "--dns-owner",
        default="default",
        help="owner ID in the ownership TXT record: only names with it are changed or removed",
    )
    dns.add_argument("--dns-ttl", default="30s", help="TTL of the records written")
    dns.add_argument(
        "--dns-sync-interval", default="30s", help="read the zone this often and restore what was changed by hand"
    )
    dns.add_argument(
        "--dns-ingress-service",
        default="",
        help="the service whose passing instances are the proxies (default: --register-service)",
    )
    dns.add_argument("--dns-dc", default="", help="the datacenter whose catalog is published (default: the agent's)")


def dns_settings_from(args: argparse.Namespace) -> DnsSettings | None:
    """None without --dns-zone. Raises SettingsError naming the flag and value."""
    if not args.dns_zone:
        return None
    zone = absolute(args.dns_zone)
    if not valid_domain(zone):
        raise SettingsError(f"--dns-zone {args.dns_zone!r}: not a DNS name")
    environment = args.dns_environment.strip().lower().strip(".")
    if environment and not valid_domain(f"{environment}.{zone}"):
        raise SettingsError(f"--dns-environment {args.dns_environment!r}: not DNS labels")
    template = args.dns_name or ("{service}.{environment}.{zone}" if environment else "{service}.{zone}")
    try:
        check_template(template)
        ttl = parse_duration(args.dns_ttl)
        interval = parse_duration(args.dns_sync_interval)
    except ValueError as err:
        raise SettingsError(str(err)) from err
    if not 0 <= ttl < 2**31 or interval <= 0:
        raise SettingsError(f"--dns-ttl {args.dns_ttl!r}, --dns-sync-interval {args.dns_sync_interval!r}: out of range")
    try:
        server = status.parse_addr(args.dns_server)
    except ValueError as err:
        raise SettingsError(f"--dns-server: {err}") from err
    if not re.fullmatch(r"[A-Za-z0-9_.=-]{1,64}", args.dns_owner):
        raise SettingsError(f"--dns-owner {args.dns_owner!r}: letters, digits and _.=- only")
    ingress = args.dns_ingress_service or args.register_service or "ingress"
    return DnsSettings(
        naming=Naming(zone, environment, template, args.dns_owner, ingress, args.dns_dc),
        server=server,
        key_file=Path(args.dns_key_file) if args.dns_key_file else None,
        ttl=int(ttl),
        interval=interval,
    )


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, tuple[str, ...], list[TemplateSpec]]:
    """Our options, and consul-template's spellings turned into ours, after what the -config
    files say; the notes to log; the files' templates."""
    parser = build_parser()
    try:
        translated = translate(sys.argv[1:] if argv is None else argv, CONSUL_TEMPLATE, own_options(parser))
    except FlagError as err:
        raise SettingsError(str(err)) from err
    args = parser.parse_args(translated.argv)
    notes, templates = list(translated.notes), []
    if args.config:
        try:
            files = ct_config.load(args.config)
        except ct_config.ConfigError as err:
            raise SettingsError(str(err)) from err
        args = parser.parse_args(files.argv + translated.argv)  # the command line wins
        notes += files.notes
        templates = files.templates
    if args.consul_ssl and args.consul.startswith("http://"):
        args.consul = "https://" + args.consul.removeprefix("http://")
    return args, tuple(notes), templates


def _variables(items: list[str]) -> dict[str, str]:
    variables = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SettingsError(f"--var {item!r}: expected KEY=VALUE with KEY an identifier")
        variables[key] = value
    return variables


def settings_from(argv: list[str] | None = None) -> Settings:
    """Our options, and consul-template's command line as it is (single dashes, Go booleans)."""
    args, notes, file_templates = _parse_args(argv)
    templates = (*file_templates, *(parse_template(t) for t in args.template))
    dns = dns_settings_from(args)
    if not templates and dns is None:
        raise SettingsError("at least one --template SRC:DEST[:COMMAND] (or --dns-zone) is needed")
    if args.proxy and not templates:
        raise SettingsError("--proxy needs a --template for the proxy's configuration")
    variables = _variables(args.var)
    wait_min, wait_max = parse_wait(args.wait)
    if args.retry_attempts < 0:
        raise SettingsError(f"--retry-attempts {args.retry_attempts}: 0 (never give up) or more")
    try:
        max_stale = parse_duration(args.max_stale)
        kill_timeout = parse_duration(args.kill_timeout)
        empty_grace = parse_duration(args.empty_grace)
        drain_timeout = parse_duration(args.drain_timeout)
        retry_backoff = parse_duration(args.retry_backoff)
        default_interval = "500ms" if args.proxy == "nginx" else "0s"
        reload_interval = parse_duration(args.reload_interval or default_interval)
        retry_max_backoff = parse_duration(args.retry_max_backoff)
    except ValueError as err:
        raise SettingsError(str(err)) from err
    return Settings(
        consul=consul_settings_from(args),
        templates=templates,
        config=tuple(args.config),
        variables=variables,
        wait_min=wait_min,
        wait_max=wait_max,
        reload_interval=reload_interval,
        once=args.once,
        dry=args.dry,
        check=args.check,
        backup=args.backup,
        exec_command=args.exec_command,
        reload_signal=parse_signal(args.reload_signal, "--reload-signal"),
        kill_signal=parse_signal(args.kill_signal, "--kill-signal") or signal.SIGTERM,
        kill_timeout=kill_timeout,
        proxy=args.proxy,
        proxy_pid_file=Path(args.proxy_pid_file) if args.proxy_pid_file else None,
        status_addr=parse_addr(args.status_addr) if args.status_addr else None,
        status_token=_read_token(args.status_token_file),
        max_stale_ms=int(max_stale * 1000),
        retry_attempts=args.retry_attempts,
        env_allow=tuple(p.strip() for p in args.env_allow.split(",") if p.strip()),
        retry_backoff=retry_backoff,
        retry_max_backoff=max(retry_backoff, retry_max_backoff),
        empty_grace=empty_grace,
        drain_timeout=drain_timeout,
        stop_proxy=args.stop_proxy,
        register_service=args.register_service,
        register_address=args.register_address,
        log_level=args.log_level,
        dns=dns,
        pid_file=Path(args.pid_file) if args.pid_file else None,
        notes=notes,
    )
