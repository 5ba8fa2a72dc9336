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
from typing import Any, NamedTuple

from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser

Atom = tuple[str, str, str]  # (kind, dc or KV key, service name or "")
Effect = tuple[str, Any]  # what a read did to the render's result: ("used", key), ("warning", text), ...
Lookup = Callable[[Atom], Any]


class Frame:
    """What one block read and did while it rendered."""

    __slots__ = ("atoms", "effects", "missing")

    def __init__(self) -> None:  # one per block rendered: a first render makes thousands
        self.atoms: dict[Atom, Any] = {}
        self.effects: list[Effect] = []
        self.missing = False


class Entry(NamedTuple):  # a tuple: made once per block rendered, thousands in a first render
    text: str
    atoms: tuple[tuple[Atom, Any], ...]
    # the same atoms for the check of a kept block: a service's (dc, name, value seen), which
    # most atoms are, looked up without a call; the others through the render's lookup
    services: tuple[tuple[str, str, Any], ...]
    others: tuple[tuple[Atom, Any], ...]
    effects: tuple[Effect, ...]
    # the same effects sorted for a quick replay: the dependencies (one set shared by every
    # entry with the same ones), the query names, and the rest (warnings, missing data)
    used: frozenset[Any]
    queries: tuple[Any, ...]
    rest: tuple[Effect, ...]


class Fragments:
    """One template's kept blocks, across renders."""

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, ...], Entry] = {}
        self.shared: dict[Any, Any] = {}  # each set of dependencies and of query names once
        self.hits = 0
        self.misses = 0


class Scope:
    """One render's use of a template's Fragments: lookups, recording frames, eviction."""

    def __init__(
        self,
        fragments: Fragments,
        lookup: Lookup,
        instances: dict[str, Any],
        result: tuple[set[Any], list[tuple[str, ...]], Callable[[Effect], None]],
    ) -> None:
        """lookup: an atom's value in this render's data; instances: the render's instances by
        service name of each datacenter it has looked at (filled by lookup); result: the
        render's set of dependencies, its list of kept blocks' query names, and what applies any
        other effect."""
        self.fragments = fragments
        self._entries = fragments.entries
        self._lookup = lookup
        self._instances = instances
        self._deps, self._queries, self._apply = result
        self._last_deps: frozenset[Any] | None = None
        self.frames: list[Frame] = []
        self._used: set[tuple[Any, ...]] = set()

    def get(self, key: tuple[Any, ...]) -> str | None:
        """The kept text when everything it read is unchanged (its effects replayed), else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        instances = self._instances
        for dc, name, seen in entry.services:
            found = instances.get(dc)
            now = found.get(name) if found is not None else self._lookup(("service", dc, name))
            if now is not seen and now != seen:
                return None
        for atom, seen in entry.others:
            now = self._lookup(atom)
            if now is not seen and now != seen:
                return None
        self._used.add(key)
        self.fragments.hits += 1
        if self.frames:
            self._into_frames(entry)
        if entry.used is not self._last_deps:  # most blocks share theirs with the block before
            self._deps |= entry.used
            self._last_deps = entry.used
        if entry.queries:
            self._queries.append(entry.queries)
        if entry.rest:
            for effect in entry.rest:
                self._apply(effect)
        return entry.text

    def _into_frames(self, entry: Entry) -> None:
        for frame in self.frames:  # an outer block being rendered read what this one read
            for atom, seen in entry.atoms:
                frame.atoms.setdefault(atom, seen)
            frame.effects.extend(entry.effects)

    def begin(self) -> None:
        """A block not kept starts rendering: what it reads from here is recorded."""
        self.frames.append(Frame())

    def end(self, key: tuple[Any, ...], text: str) -> str:
        """The block rendered as text: kept under key unless it read data not there yet. (A
        render that raises midway leaves its frames: the scope is dropped with the render.)"""
        frame = self.frames.pop()
        self.fragments.misses += 1
        self._used.add(key)
        if not frame.missing:
            self.fragments.entries[key] = self._entry(text, frame)
        for outer in self.frames:  # what an inner block read, its outer blocks read too
            outer.atoms.update(frame.atoms)
            outer.missing |= frame.missing
        return text

    def _entry(self, text: str, frame: Frame) -> Entry:
        effects = tuple(dict.fromkeys(frame.effects))  # each once: a block reads one catalog many times
        used, queries, rest = [], [], []
        for effect in effects:
            kind = effect[0]
            if kind == "used":
                used.append(effect[1])
            elif kind == "query":
                queries.append(effect[1])
            else:
                rest.append(effect)
        services, others = [], []
        for atom, seen in frame.atoms.items():
            if atom[0] == "service":
                services.append((atom[1], atom[2], seen))
            else:
                others.append((atom, seen))
        shared = self.fragments.shared
        deps, names = frozenset(used), tuple(queries)
        return Entry(
            text, tuple(frame.atoms.items()), tuple(services), tuple(others), effects,
            shared.setdefault(deps, deps), shared.setdefault(names, names), tuple(rest),
        )  # fmt: skip

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
        if len(self._used) == len(entries):
            return  # a complete render kept every block it used, so it used every block kept
        for key in [k for k in entries if k not in self._used]:
            del entries[key]


ACTIVE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("fragment_scope", default=None)


_LOOKUP = "_fragment_cache_lookup"


def _parts(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """The key as it is (names and versions), or str() of each part when one is not hashable."""
    try:
        hash(key)
    except TypeError:
        return tuple(map(str, key))
    return key


_BEGIN = "_fragment_cache_begin"
_END = "_fragment_cache_end"


class FragmentCache(Extension):
    """The `cache` tag. It compiles to: look the key up; on a hit output the kept text; on a
    miss render the block in place (`{% filter %}...{% endfilter %}`, as if it were not
    cached: no macro to build and call) between a begin and an end that record what it read
    and keep its text. Per block of a loop over thousands, every call counts: the lookup, the
    begin and the end are filters (Jinja calls those directly, a method through the sandbox's
    call), the key's parts are the lookup's arguments, and a miss is None, compared inline."""

    tags = {"cache"}  # noqa: RUF012 - Jinja's own class attribute

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        # a filter, not a method call: Jinja calls filters directly, a method through the
        # sandbox's call (per block of a loop over thousands, that was a third of a kept render)
        environment.filters[_LOOKUP] = self.lookup
        environment.filters[_BEGIN] = self.begin
        environment.filters[_END] = self.end

    def parse(self, parser: Parser) -> list[nodes.Node]:
        lineno = next(parser.stream).lineno
        args = [parser.parse_expression()]
        while parser.stream.skip_if("comma"):
            args.append(parser.parse_expression())
        body = parser.parse_statements(("name:endcache",), drop_needle=True)
        found = nodes.Name("_fragment", "store")
        lookup = nodes.Assign(found, nodes.Filter(args[0], _LOOKUP, args[1:], [], None, None)).set_lineno(lineno)
        loaded = nodes.Name("_fragment", "load")
        hit = nodes.Output([loaded]).set_lineno(lineno)
        miss = [
            # on the lookup's None, not a constant: Jinja would call a filter of a constant once, when compiling
            nodes.Output([nodes.Filter(loaded, _BEGIN, [], [], None, None)]).set_lineno(lineno),
            # {% filter end(key) %}body{% endfilter %}: the body in its own scope, its text to end()
            nodes.FilterBlock(body, nodes.Filter(None, _END, args, [], None, None)).set_lineno(lineno),
        ]
        test = nodes.Compare(loaded, [nodes.Operand("ne", nodes.Const(None))])
        return [lookup, nodes.If(test, [hit], [], miss).set_lineno(lineno)]

    def lookup(self, *key: Any) -> str | None:
        scope = ACTIVE.get()
        if scope is None:
            return None
        try:
            return scope.get(key)
        except TypeError:  # a part that is not hashable
            return scope.get(_parts(key))

    @staticmethod
    def begin(_nothing: None) -> str:
        scope = ACTIVE.get()
        if scope is not None:
            scope.begin()
        return ""

    @staticmethod
    def end(text: str, *key: Any) -> str:
        scope = ACTIVE.get()
        if scope is None:
            return text
        return scope.end(_parts(key), text)
