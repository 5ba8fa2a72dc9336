"""`{% cache key %}...{% endcache %}`: a block rendered again only when the data it read changed.

The block's output is kept per template under its key (the values after `cache`, which must
name everything else the output depends on: usually the loop variable, `s.name`). While the
block renders, every Consul read it makes (`service()`, `services()`, `nodes()`, `key()`, ...)
is recorded with the value it saw; the next render takes the kept text, without running the
block, when every one of those values is still the same (the same tuple of instances, compared
by identity first: the catalog hands out a new tuple only for a service that changed). What
the block recorded (dependencies, warnings) is replayed, so a cached block is indistinguishable
from a rendered one. A block that read data not yet fetched is not kept. Keys not used by a
render are dropped after it, so the cache holds one render's worth of blocks.

Read the data inside the block: a value read before it (`{% set xs = service(...) %}`) and only
used inside is not tracked, and its change would not reach the kept text.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser

Atom = tuple[str, str, str]  # (kind, dc or KV key, service name or "")
Effect = tuple[str, Any]  # what a read did to the render's result: ("used", key), ("warning", text), ...
Lookup = Callable[[Atom], Any]


@dataclass
class Frame:
    """What one block read and did while it rendered."""

    atoms: dict[Atom, Any] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    missing: bool = False


@dataclass(frozen=True)
class Entry:
    text: str
    atoms: tuple[tuple[Atom, Any], ...]
    effects: tuple[Effect, ...]


class Fragments:
    """One template's kept blocks, across renders."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, ...], Entry] = {}
        self.hits = 0
        self.misses = 0


class Scope:
    """One render's use of a template's Fragments: lookups, recording frames, eviction."""

    def __init__(self, fragments: Fragments, lookup: Lookup, apply_all: Callable[[tuple[Effect, ...]], None]) -> None:
        """lookup: an atom's value in this render's data; apply_all: effects on its result."""
        self.fragments = fragments
        self._lookup = lookup
        self._apply_all = apply_all
        self.frames: list[Frame] = []
        self._used: set[tuple[str, ...]] = set()

    def get(self, key: tuple[str, ...]) -> str | None:
        """The kept text when everything it read is unchanged (its effects replayed), else None."""
        entry = self.fragments.entries.get(key)
        if entry is None:
            return None
        for atom, seen in entry.atoms:
            now = self._lookup(atom)
            if now is not seen and now != seen:
                return None
        self._used.add(key)
        self.fragments.hits += 1
        for frame in self.frames:  # an outer block being rendered read what this one read
            for atom, seen in entry.atoms:
                frame.atoms.setdefault(atom, seen)
            frame.effects.extend(entry.effects)
        if entry.effects:
            self._apply_all(entry.effects)
        return entry.text

    def render(self, key: tuple[str, ...], caller: Callable[[], str]) -> str:
        frame = Frame()
        self.frames.append(frame)
        try:
            text = caller()
        finally:
            self.frames.pop()
        self.fragments.misses += 1
        self._used.add(key)
        if not frame.missing:
            # each effect once: a block reads the same catalog for every instance it lists
            self.fragments.entries[key] = Entry(text, tuple(frame.atoms.items()), tuple(dict.fromkeys(frame.effects)))
        for outer in self.frames:  # what an inner block read, its outer blocks read too
            outer.atoms.update(frame.atoms)
            outer.missing |= frame.missing
        return text

    def record(self, atom: Atom | None, value: Any, effect: Effect | None, missing: bool = False) -> None:
        for frame in self.frames:
            if atom is not None:
                frame.atoms.setdefault(atom, value)
            if effect is not None:
                frame.effects.append(effect)
            frame.missing |= missing

    def finish(self) -> None:
        """After a complete render: drop the blocks it did not use."""
        entries = self.fragments.entries
        for key in [k for k in entries if k not in self._used]:
            del entries[key]


ACTIVE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("fragment_scope", default=None)


_LOOKUP = "_fragment_cache_lookup"


class _Miss:
    __slots__ = ("key",)

    def __init__(self, key: tuple[str, ...]) -> None:
        self.key = key


class FragmentCache(Extension):
    """The `cache` tag. It compiles to: look the key up; on a hit output the kept text; on a
    miss render the block (the caller macro is built only then: building one costs more than
    the lookup)."""

    tags = {"cache"}  # noqa: RUF012 - Jinja's own class attribute

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        # a filter, not a method call: Jinja calls filters directly, a method through the
        # sandbox's call (per block of a loop over thousands, that was a third of a kept render)
        environment.filters[_LOOKUP] = self.lookup

    def parse(self, parser: Parser) -> list[nodes.Node]:
        lineno = next(parser.stream).lineno
        args = [parser.parse_expression()]
        while parser.stream.skip_if("comma"):
            args.append(parser.parse_expression())
        body = parser.parse_statements(("name:endcache",), drop_needle=True)
        found = nodes.Name("_fragment", "store")
        lookup = nodes.Assign(found, nodes.Filter(nodes.List(args), _LOOKUP, [], [], None, None)).set_lineno(lineno)
        loaded = nodes.Name("_fragment", "load")
        hit = nodes.Output([loaded]).set_lineno(lineno)
        miss = nodes.CallBlock(self.call_method("fill", [loaded]), [], [], body).set_lineno(lineno)
        test = nodes.Test(loaded, "string", [], [], None, None)
        return [lookup, nodes.If(test, [hit], [], [miss]).set_lineno(lineno)]

    def lookup(self, key: list[Any]) -> str | _Miss:
        parts = tuple(map(str, key))
        scope = ACTIVE.get()
        found = scope.get(parts) if scope is not None else None
        return _Miss(parts) if found is None else found

    def fill(self, miss: _Miss, caller: Callable[[], str]) -> str:
        scope = ACTIVE.get()
        if scope is None:
            return caller()
        return scope.render(miss.key, caller)
