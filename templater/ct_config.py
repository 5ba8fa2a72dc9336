"""consul-template's configuration files (`-config FILE|DIR`, repeatable), read as it reads them.

A directory's files are read recursively in lexical order; each file is HCL 1 or JSON (templater.hcl).
Later files win over earlier ones and the command line over every file; `template {}` blocks add
up, in the order read, before the command line's `-template`s. What a file sets for the whole
templater becomes our own options (`consul { address }` is `--consul`, so it is checked where the
flag is); each `template {}` becomes a TemplateSpec with its own options. A key we do not know is
refused naming the file, line and key; one of consul-template's that does nothing here, or that
we do not support, says so. Pure, apart from reading the files.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.durations import parse_duration
from sidecar.errors import SidecarError
from sidecar.goflags import consul_address
from templater.hcl import Body, HCLError, Item, Value, parse
from templater.template_spec import TemplateSpec


class ConfigError(SidecarError):
    """A configuration file that cannot be taken: the message names the file, line and key."""


@dataclass
class FileConfig:
    """What the files say: our options (before the command line's own), the templates, notes."""

    argv: list[str] = field(default_factory=list)
    templates: list[TemplateSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def load(paths: list[str]) -> FileConfig:
    """Every -config path in the order given. Raises ConfigError."""
    config = FileConfig()
    for given in paths:
        for path in _files(Path(given)):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"-config {path}: cannot read: {err}") from None
            try:
                body = parse(text, str(path))
            except HCLError as err:
                raise ConfigError(f"-config {err}") from None
            _Reader(path, config).top(body)
            config.files.append(path)
    return config


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = []
        for root, dirs, names in os.walk(path):  # symbolic links to directories are not followed
            dirs.sort()
            found += [Path(root, name) for name in sorted(names)]
        return sorted(found, key=lambda p: p.relative_to(path).parts)
    if not path.exists():
        raise ConfigError(f"-config {path}: no such file or directory")
    return [path]


# consul-template's keys that change nothing that matters here: accepted, with a note saying so
_NOTED = {
    "syslog": "the templater logs to stderr; the service manager collects it (journald, docker logs)",
    "log_file": "the templater logs to stderr; the service manager collects it (journald, docker logs)",
    "telemetry": "metrics are on --status-addr's /metrics (Prometheus)",
    "block_query_wait": "blocking queries wait 5m, as Consul allows",
    "transport": "the HTTP transport's defaults are used",
    "splay": "the child is signalled at once",
    "error_fatal": "a render error keeps the last good file and is retried, never fatal",
}

# consul-template's keys that this templater does not take (refused), and what to do instead
_UNSUPPORTED = {
    "vault": "Vault is not supported",
    "deduplicate": "de-duplication mode is not supported: each templater reads Consul itself",
    "nomad": "Nomad is not supported",
    "auth": "HTTP basic auth to the agent is not supported: use an ACL token",
    "namespace": "Consul Enterprise namespaces are not supported",
    "ca_path": "give one CA bundle file as ca_cert",
    "server_name": "the agent's address must match its certificate",
    "env": "the child gets the templater's environment; set it where the templater is started",
    "timeout": "not supported",
    "function_blacklist": "not supported",
    "function_denylist": "not supported",
    "sandbox_path": "not supported",
    "exec": "give the template a command",
}


# a template {} key -> the TemplateSpec field it sets (or a step of spec()), and how it is read
_TEMPLATE_KEYS = {
    "source": ("source", "text"),
    "destination": ("destination", "text"),
    "contents": ("contents", "text"),
    "command": ("command", "command"),
    "command_timeout": ("command_timeout", "duration"),
    "perms": ("perms", "perms"),
    "backup": ("backup", "flag"),
    "wait": ("wait", "wait"),
    "left_delimiter": ("left", "text"),
    "right_delimiter": ("right", "text"),
    "error_on_missing_key": ("strict", "flag"),
    "create_dest_dirs": ("create_dest_dirs", "flag"),
    "user": ("user", "text"),
    "group": ("group", "text"),
    "syntax": ("syntax", "syntax"),
    "uid": ("user", "id"),
    "gid": ("group", "id"),
}


class _Walker:
    """A config file's keys walked against handlers: each handler takes its item into the
    config (a flag's value, a switch, a note); an unknown key is an error naming file and line."""

    def __init__(self, path: Path, config: FileConfig) -> None:
        self.path = path
        self.config = config

    def error(self, item: Item, message: str) -> ConfigError:
        return ConfigError(f"-config {self.path}:{item.line}: {message}")

    def blocks(self, item: Item, where: str) -> list[Body]:
        """A block, or JSON's list of them."""
        values = item.value if isinstance(item.value, list) else [item.value]
        if not values or not all(isinstance(v, Body) for v in values):
            raise self.error(item, f"{where}{item.key}: expected a block {{ ... }}, found {_said(item.value)}")
        return values  # type: ignore[return-value]

    def walk(self, body: Body, where: str, keys: dict[str, Callable[[Item], None]]) -> None:
        for item in body.items:
            handle = keys.get(item.key)
            if handle is None and item.key in _NOTED:
                self.config.notes.append(f"{self.path}:{item.line}: {where}{item.key}: ignored: {_NOTED[item.key]}")
                continue
            if handle is None:
                if item.key in _UNSUPPORTED:
                    raise self.error(item, f"{where}{item.key} is not supported: {_UNSUPPORTED[item.key]}")
                known = ", ".join(sorted(keys))
                raise self.error(item, f"unknown key {where}{item.key} (known here: {known})")
            handle(item)

    def option(self, flag: str, convert: Callable[[Any], str] = str, kind: type = str) -> Callable[[Item], None]:
        def handle(item: Item) -> None:
            value = self.scalar(item, kind)
            try:
                self.config.argv.append(f"{flag}={convert(value)}")
            except ValueError as err:
                raise self.error(item, f"{item.key} {value!r}: {err}") from None

        return handle

    def switch(self, flag: str, false_means: str = "") -> Callable[[Item], None]:
        def handle(item: Item) -> None:
            if self.scalar(item, bool):
                if flag:
                    self.config.argv.append(flag)
            elif false_means:
                raise self.error(item, f"{item.key} = false is not supported: {false_means}")

        return handle

    def note(self, meaning: str) -> Callable[[Item], None]:
        def handle(item: Item) -> None:
            self.config.notes.append(f"{self.path}:{item.line}: {item.key}: {meaning}")

        return handle

    def scalar(self, item: Item, kind: type) -> Any:
        value = item.value
        if kind is str and isinstance(value, str):
            return value
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is bool and isinstance(value, str) and value in ("true", "false"):
            return value == "true"
        raise self.error(
            item, f"{item.key}: expected {kind.__name__ if kind is not str else 'a string'}, found {_said(value)}"
        )

    # -- the blocks

    def each(self, read: Callable[[Body, Item], None]) -> Callable[[Item], None]:
        """A top-level block's reader, for each of its blocks (a key repeated, or JSON's list)."""

        def handle(item: Item) -> None:
            for block in self.blocks(item, ""):
                read(block, item)

        return handle


class _Reader(_Walker):
    """consul-template's keys: the top level, consul {}, exec {} and template {} blocks."""

    def __init__(self, path: Path, config: FileConfig) -> None:
        super().__init__(path, config)
        self.delimiters = ("{{", "}}")

    def top(self, body: Body) -> None:
        self.walk(
            body,
            "",
            {
                "consul": self.each(self.consul),
                "template": self.each(self.template),
                "exec": self.each(self.exec),
                "wait": lambda item: self.config.argv.append(f"--wait={self.wait(item)}"),
                "max_stale": self.option("--max-stale"),
                "log_level": self.option("--log-level"),
                "pid_file": self.option("--pid-file"),
                "once": self.switch("--once"),
                "dry": self.switch("--dry"),
                "reload_signal": self.note("accepted: SIGHUP reads the configuration files again"),
                "kill_signal": self.note("accepted: the templater stops on SIGINT and SIGTERM"),
                "default_delimiters": self.default_delimiters,
            },
        )

    def consul(self, body: Body, _block: Item) -> None:
        def ssl(item: Item) -> None:
            for block in self.blocks(item, "consul."):
                self.config.argv.append("--consul-ssl")  # any ssl {} turns it on, as in consul-template
                self.walk(
                    block,
                    "consul.ssl.",
                    {
                        "enabled": self.switch("", false_means="leave the ssl block out"),
                        "verify": self.switch("", false_means="give the agent's CA as ca_cert"),
                        "cert": self.option("--cert-file"),
                        "key": self.option("--key-file"),
                        "ca_cert": self.option("--ca-file"),
                    },
                )

        def retry(item: Item) -> None:
            for block in self.blocks(item, "consul."):
                self.walk(
                    block,
                    "consul.retry.",
                    {
                        "enabled": self.switch(
                            "", false_means="the templater always retries; attempts bounds it with -once"
                        ),
                        "attempts": self.option("--retry-attempts", kind=int),
                        "backoff": self.option("--retry-backoff"),
                        "max_backoff": self.option("--retry-max-backoff"),
                    },
                )

        self.walk(
            body,
            "consul.",
            {
                "address": self.option("--consul", consul_address),
                "token": self.option("--token"),
                "ssl": ssl,
                "retry": retry,
            },
        )

    def exec(self, body: Body, _block: Item) -> None:
        self.walk(
            body,
            "exec.",
            {
                "command": lambda item: self.config.argv.append(f"--exec={self.command(item)}"),
                "reload_signal": self.option("--reload-signal"),
                "kill_signal": self.option("--kill-signal"),
                "kill_timeout": self.option("--kill-timeout"),
            },
        )

    def default_delimiters(self, item: Item) -> None:
        for block in self.blocks(item, ""):
            found = self.strings(block, "default_delimiters.", ("left", "right"))
            self.delimiters = (found.get("left", self.delimiters[0]), found.get("right", self.delimiters[1]))

    def strings(self, body: Body, where: str, names: tuple[str, ...]) -> dict[str, str]:
        """A block of string keys, such as wait's min and max."""
        found: dict[str, str] = {}
        self.walk(body, where, {name: lambda i: found.__setitem__(i.key, self.scalar(i, str)) for name in names})
        return found

    def template(self, body: Body, block: Item) -> None:
        # consul-template's templates are Go templates: syntax = "jinja" for one in Jinja2
        fields: dict[str, Any] = {"delimiters": self.delimiters, "command_timeout": 30.0, "syntax": "go"}
        readers: dict[str, Callable[[Item], Any]] = {
            "text": lambda item: self.scalar(item, str),
            "flag": lambda item: self.scalar(item, bool),
            "duration": self.duration,
            "perms": self.perms,
            "wait": self.wait_pair,
            "command": self.command,
            "id": lambda item: str(self.scalar(item, int)),
            "syntax": self.syntax,
        }

        def keep(name: str, how: str) -> Callable[[Item], None]:
            return lambda item: fields.__setitem__(name, readers[how](item))

        self.walk(body, "template.", {key: keep(name, how) for key, (name, how) in _TEMPLATE_KEYS.items()})
        self.config.templates.append(self.spec(fields, block))

    def spec(self, fields: dict[str, Any], block: Item) -> TemplateSpec:
        source, contents = fields.pop("source", None), fields.get("contents")
        destination = fields.pop("destination", None)
        number = len(self.config.templates) + 1
        if not destination:
            raise self.error(block, f"template {number}: destination is missing")
        if (source is None) == (contents is None):
            raise self.error(block, f"template {number}: give either source or contents")
        left, right = fields.pop("left", fields["delimiters"][0]), fields.pop("right", fields["delimiters"][1])
        fields["delimiters"] = (left, right)
        return TemplateSpec(  # relative paths are the working directory's, as in consul-template
            source=Path(source).absolute() if source else Path(f"{self.path}:{block.line}"),
            dest=Path(destination).absolute(),
            **fields,
        )

    # -- values

    def command(self, item: Item) -> str:
        """A command as a string (run by sh), or as a list of arguments (quoted for sh)."""
        value = item.value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return shlex.join(value)
        return self.scalar(item, str)  # type: ignore[no-any-return]

    def syntax(self, item: Item) -> str:
        value = self.scalar(item, str)
        if value not in ("go", "jinja"):
            raise self.error(item, f'syntax {value!r}: "go" (consul-template\'s) or "jinja"')
        return str(value)

    def duration(self, item: Item) -> float:
        value = self.scalar(item, str)
        try:
            return parse_duration(value)
        except ValueError as err:
            raise self.error(item, f"{item.key}: {err}") from None

    def perms(self, item: Item) -> int:
        """A file mode: HCL's 0600 (an octal number) or a string "0600"."""
        value = item.value
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise self.error(item, f"perms {value!r}: not an octal file mode such as 0644") from None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o7777:
            raise self.error(item, f"perms {_said(item.value)}: not a file mode such as 0644")
        return value

    def wait_pair(self, item: Item) -> tuple[float, float]:
        text = self.wait(item)
        low, _, high = text.partition(":")
        try:
            lo = parse_duration(low)
            hi = parse_duration(high) if high else lo * 4
        except ValueError as err:
            raise self.error(item, f"wait: {err}") from None
        if hi < lo:
            raise self.error(item, f"wait {text!r}: max is below min")
        return lo, hi

    def wait(self, item: Item) -> str:
        """`wait = "5s:10s"` or `wait { min = "5s" max = "10s" }` as MIN:MAX."""
        if isinstance(item.value, str):
            return item.value
        found: dict[str, str] = {}
        for block in self.blocks(item, ""):
            found.update(self.strings(block, "wait.", ("min", "max")))
        if "min" not in found:
            raise self.error(item, "wait: min is missing")
        return f"{found['min']}:{found['max']}" if "max" in found else found["min"]


def _said(value: Value) -> str:
    if isinstance(value, Body):
        return "a block"
    if isinstance(value, list):
        return "a list"
    return repr(value)
