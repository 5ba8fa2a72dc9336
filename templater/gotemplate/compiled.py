"""A tree compiled to Python code: the executor's common paths at the speed of Jinja's.

execute.py walks the tree and is the reference (its messages are Go's, checked by the golden
tests); walking costs a dispatch on the node's type at every node, five times Jinja's time for a
listing of 10,000 services. Here, as Jinja does with its templates, each template becomes one
Python function when it is loaded: text is appended, fields and calls are expressions, if, with
and range are Python's own statements, and Go's variables are locals resolved by scope at
compile time. It runs the same semantics for what templates do; anything else, and any error,
is handed back (`Fallback`) and the caller runs the reference executor over the same data for
its result or its exact error. Only names and constants from the template reach the generated
code, as repr() literals.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from templater.gotemplate import gofmt
from templater.gotemplate.execute import BUILTINS, range_items, truth
from templater.gotemplate.gofmt import MISSING
from templater.gotemplate.parse import (
    ActionNode,
    BoolNode,
    BranchNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
    FieldNode,
    IdentifierNode,
    ListNode,
    Node,
    NumberNode,
    PipeNode,
    StringNode,
    TemplateNode,
    TextNode,
    Tree,
    VariableNode,
)  # fmt: skip

_NONE: Any = object()  # no piped value
_MAPS = (dict, MappingProxyType)
_BASIC = frozenset([str, int, float, bool, type(None), list, tuple, type(MISSING)])


class Fallback(Exception):
    """Not handled here: run the reference executor."""


_KINDS: dict[type, int] = {}  # a type -> 1: a map, 2: a basic kind or nothing, 0: an object (a struct)


def _kind(kind: type) -> int:
    found = _KINDS.get(kind)
    if found is None:
        found = _KINDS[kind] = 1 if issubclass(kind, Mapping) else 2 if kind in _BASIC else 0
    return found


def _field(strict: bool, receiver: Any, name: str) -> Any:
    """receiver.name as the reference executor takes it."""
    kind = type(receiver)
    sort = _KINDS.get(kind)
    if sort is None:
        sort = _kind(kind)
    if sort == 1:
        value = receiver.get(name, MISSING)
        if value is MISSING and strict:
            raise Fallback
        return value
    if sort == 0:
        value = getattr(receiver, name, _NONE) if name[:1].isupper() else _NONE
        if value is not _NONE:
            if callable(value) and not isinstance(value, type):
                return value()
            return value
    if receiver is MISSING and not strict:
        return MISSING  # a field of nothing is nothing, as in the reference
    raise Fallback


def _printable(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is int:
        return str(value)
    if callable(value) and not hasattr(value, "go_string"):
        raise Fallback
    return gofmt.value(value)


def _call(funcs: Mapping[str, Callable[..., Any]], name: str, *args: Any) -> Any:
    fn = funcs.get(name)
    if fn is None:
        raise Fallback
    try:
        return fn(*args)
    except Exception:
        raise Fallback from None


def _eq(a: Any, b: Any) -> bool:
    """eq of two values: Python's == for two strings or two ints, the builtin for the rest."""
    kind = type(a)
    if kind is type(b) and (kind is str or kind is int):
        return bool(a == b)
    try:
        return bool(BUILTINS["eq"](a, b))
    except Exception:
        raise Fallback from None


def _items(value: Any) -> Any:
    found = range_items(value)
    if found is None:
        raise Fallback
    return found


def _and_or(want: bool, *thunks: Callable[[], Any]) -> Any:
    value: Any = MISSING
    for thunk in thunks:
        value = thunk()
        if truth(value) == want:
            return value
    return value


class _Gen:
    """One template's function: lines of Python, Go's variables as locals by scope."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1
        self.scopes: list[dict[str, str]] = [{"$": "v_root"}]
        self.counter = itertools.count()

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def fresh(self, prefix: str) -> str:
        return f"{prefix}_{next(self.counter)}"

    def lookup(self, name: str) -> str:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise Fallback

    # -- statements

    def stmt(self, node: Node, dot: str) -> None:
        if isinstance(node, TextNode):
            self.emit(f"out({node.text!r})")
        elif isinstance(node, ListNode):
            self.sequence(node.nodes, dot)
        elif isinstance(node, ActionNode):
            value = self.pipe(node.pipe, dot)
            if not node.pipe.decl:
                self.emit(f"out(P({value}))")
        elif isinstance(node, BranchNode):
            self.branch(node, dot)
        elif isinstance(node, TemplateNode):
            arg = self.pipe(node.pipe, dot) if node.pipe is not None else "None"
            self.emit(f"T({node.name!r}, {arg})")
        elif isinstance(node, BreakNode):
            self.emit("break")
        elif isinstance(node, ContinueNode):
            self.emit("continue")
        else:
            raise Fallback

    def sequence(self, nodes: list[Node], dot: str) -> None:
        """Statements; text and printed actions next to each other are appended as one string."""
        if not nodes:
            self.emit("pass")
        pieces: list[str] = []
        for node in nodes:
            if isinstance(node, TextNode):
                pieces.append(repr(node.text))
            elif isinstance(node, ActionNode) and not node.pipe.decl:
                pieces.append(f"P({self.pipe(node.pipe, dot)})")
            else:
                if pieces:
                    self.emit(f"out({' + '.join(pieces)})")
                    pieces = []
                self.stmt(node, dot)
        if pieces:
            self.emit(f"out({' + '.join(pieces)})")

    def block(self, body: ListNode, dot: str) -> None:
        self.depth += 1
        self.scopes.append({})
        self.stmt(body, dot)
        self.scopes.pop()
        self.depth -= 1

    def branch(self, node: BranchNode, dot: str) -> None:
        self.scopes.append({})  # the pipeline's variables live until the end of the statement
        value = self.pipe(node.pipe, dot)
        if node.kind == "range":
            self.range(node, value, dot)
        else:
            inner = dot
            if node.kind == "with":
                inner = self.fresh("d")
                self.emit(f"{inner} = {value}")
                value = inner
            self.emit(f"if truth({value}):")
            self.block(node.body, inner)
            if node.else_body is not None:
                self.emit("else:")
                self.block(node.else_body, dot)
        self.scopes.pop()

    def range(self, node: BranchNode, value: str, dot: str) -> None:
        if node.pipe.is_assign:
            raise Fallback
        decl = node.pipe.decl
        elem, index, empty = self.fresh("e"), self.fresh("i"), self.fresh("empty")
        if node.else_body is not None:
            self.emit(f"{empty} = True")
        self.emit(f"for {index}, {elem} in I({value}):")
        self.depth += 1
        if node.else_body is not None:
            self.emit(f"{empty} = False")
        if decl:  # the last declared is the element, the first of two the index
            self.emit(f"{self.scopes[-1][decl[-1]]} = {elem}")
            if len(decl) > 1:
                self.emit(f"{self.scopes[-1][decl[0]]} = {index}")
        self.depth -= 1
        self.block(node.body, elem)
        if node.else_body is not None:
            self.emit(f"if {empty}:")
            self.block(node.else_body, dot)

    # -- expressions

    def pipe(self, node: PipeNode, dot: str) -> str:
        value = ""
        for cmd in node.cmds:
            value = self.command(cmd, dot, value)
        if node.decl:
            target = self.fresh("v")
            self.emit(f"{target} = {value}")
            for name in node.decl:
                if node.is_assign:
                    self.emit(f"{self.lookup(name)} = {target}")
                else:
                    self.scopes[-1][name] = self.fresh("v")
                    self.emit(f"{self.scopes[-1][name]} = {target}")
            return target
        return value

    def command(self, node: CommandNode, dot: str, final: str) -> str:
        first, rest = node.args[0], node.args[1:]
        if isinstance(first, IdentifierNode):
            args = [self.arg(a, dot) for a in rest] + ([final] if final else [])
            if first.name in ("and", "or"):
                thunks = ", ".join(f"lambda: {a}" for a in args)
                return f"AO({first.name == 'or'}, {thunks})"
            if first.name in ("eq", "ne") and len(args) == 2:
                return f"{'' if first.name == 'eq' else 'not '}EQ({args[0]}, {args[1]})"
            return f"C(funcs, {first.name!r}{''.join(', ' + a for a in args)})"
        if rest or final:
            raise Fallback  # a method with arguments, or arguments to a non-function
        return self.arg(first, dot)

    def arg(self, node: Node, dot: str) -> str:
        if isinstance(node, DotNode):
            return dot
        if isinstance(node, (StringNode, NumberNode, BoolNode)):
            return repr(node.value)
        if isinstance(node, FieldNode):
            return self.fields(dot, node.idents)
        if isinstance(node, VariableNode):
            return self.fields(self.lookup(node.idents[0]), node.idents[1:])
        if isinstance(node, PipeNode):
            return f"({self.pipe(node, dot)})"
        if isinstance(node, IdentifierNode):
            return self.command(CommandNode(node.pos, node.line, [node]), dot, "")
        if isinstance(node, ChainNode):
            return self.fields(self.arg(node.node, dot), node.fields)
        raise Fallback

    @staticmethod
    def fields(start: str, names: list[str]) -> str:
        for name in names:
            start = f"F(strict, {start}, {name!r})"
        return start


class Compiler:
    def __init__(self, trees: Mapping[str, Tree]) -> None:
        source = []
        for index, tree in enumerate(trees.values()):
            gen = _Gen()
            gen.stmt(tree.root, "v_root")
            source.append(f"def t_{index}(out, funcs, strict, T, v_root):\n" + "\n".join(gen.lines or ["    pass"]))
        namespace: dict[str, Any] = {
            "F": _field,
            "P": _printable,
            "C": _call,
            "I": _items,
            "AO": _and_or,
            "EQ": _eq,
            "truth": truth,
        }
        try:
            exec(compile("\n\n".join(source), "<go template>", "exec"), namespace)
        except SyntaxError:  # a template Python cannot nest (hundreds of levels): the reference runs it
            raise Fallback from None
        self.functions = {name: namespace[f"t_{index}"] for index, name in enumerate(trees)}

    def run(self, name: str, data: Any, funcs: Mapping[str, Callable[..., Any]], strict: bool) -> str:
        out: list[str] = []
        merged = {**BUILTINS, **funcs}
        functions = self.functions

        def template(called: str, dot: Any) -> None:
            fn = functions.get(called)
            if fn is None:
                raise Fallback
            fn(out.append, merged, strict, template, dot)

        try:
            functions[name](out.append, merged, strict, template, data)
        except Fallback:
            raise
        except Exception:  # any other error: the reference executor says it as Go does
            raise Fallback from None
        return "".join(out)
