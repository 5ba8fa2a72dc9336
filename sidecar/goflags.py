"""The peers' command lines as they are: Go's flag syntax and their flag names, turned into ours.

registrator and consul-template parse flags with Go's `flag` package: one dash or two,
`-flag=value` or `-flag value`, booleans set by `-flag` alone or `-flag=true|false`. People keep
those command lines in systemd units and compose files. translate() rewrites each peer flag into
our double-dash option (values after `=`, so `-retry-attempts -1` stays one value); our own
options pass through untouched, and so does anything it does not know, for argparse to judge.
A peer flag that we accept but that does nothing here gives a note to log; one we do not support
gives an error naming it and saying what to use instead. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sidecar.errors import SidecarError


class FlagError(SidecarError):
    """A peer's flag that has no meaning here, or a value it cannot take."""


@dataclass(frozen=True)
class Flag:
    """One peer flag: the option it becomes, and how its value is carried."""

    option: str  # our option, "--ip"; "" for one that is only noted
    boolean: bool = False  # Go boolean: `-flag` alone is true
    value: Callable[[str], str] = str  # the peer's value as ours
    note: str = ""  # said once when the flag is given (accepted, with this meaning here)
    refuse_false: str = ""  # `-flag=false` is not supported: what to use instead


def same(*names: str, boolean: bool = False) -> dict[str, Flag]:
    """Peer flags that are ours under the same name (`-ip` is `--ip`)."""
    return {name: Flag(f"--{name}", boolean=boolean) for name in names}


@dataclass(frozen=True)
class Peer:
    name: str
    flags: Mapping[str, Flag]
    unsupported: Mapping[str, str] = field(default_factory=dict)  # flag -> what to use instead


@dataclass(frozen=True)
class Translated:
    argv: list[str]
    notes: list[str]  # one line per peer flag that is accepted but means something else here


_FLAG = re.compile(r"^--?([A-Za-z][A-Za-z0-9_-]*)(?:=(.*))?$", re.S)
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}  # strconv.ParseBool
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


def translate(argv: Sequence[str], peer: Peer, ours: set[str]) -> Translated:
    """ours: our own option names (`--consul`, ...), left as they are even when a peer flag has
    the same name, so that `--ip X` and `-ip X` mean the same."""
    out: list[str] = []
    notes: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        i += 1
        if arg == "--":
            out.extend(items[i - 1 :])
            break
        match = _FLAG.match(arg)
        if match is None:
            out.append(arg)
            continue
        name, inline = match.group(1), match.group(2)
        if arg.startswith("--") and f"--{name}" in ours:
            out.append(arg)
            continue
        if name in peer.unsupported:
            raise FlagError(f"{peer.name}'s -{name} is not supported: {peer.unsupported[name]}")
        flag = peer.flags.get(name)
        if flag is None:
            out.append(arg)  # ours spelled with one dash, or unknown: argparse says which
            continue
        if flag.boolean:
            if inline is None:
                state = True
            elif inline in _TRUE or inline in _FALSE:
                state = inline in _TRUE
            else:
                raise FlagError(f"{peer.name}'s -{name}: {inline!r} is not a boolean (true or false)")
            if not state and flag.refuse_false:
                raise FlagError(f"{peer.name}'s -{name}=false is not supported: {flag.refuse_false}")
            words = [flag.option] if state and flag.option else []  # false: a store_true option left out
        else:
            if inline is None:
                if i >= len(items):
                    raise FlagError(f"{peer.name}'s -{name} needs a value")
                inline = items[i]
                i += 1
            try:
                value = flag.value(inline)
            except ValueError as err:
                raise FlagError(f"{peer.name}'s -{name} {inline!r}: {err}") from err
            words = [f"{flag.option}={value}"] if flag.option else []
        out.extend(words)
        if flag.note:
            notes.append(f"-{name}: {flag.note}")
    return Translated(out, notes)


def consul_address(value: str) -> str:
    """consul-template's -consul-addr (host:port, or a URL) as our --consul URL."""
    if not value:
        raise ValueError("an address such as 127.0.0.1:8500")
    return value if "://" in value else f"http://{value}"


def own_options(parser: object) -> set[str]:
    """The long options an argparse parser knows (its _option_string_actions, public enough)."""
    return {o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")}
