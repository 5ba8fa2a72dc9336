"""Go text/template's executor (text/template/exec.go): a tree, data and functions to text.

Go's data model on Python values: a Mapping is a map (a field is a key: a missing one is
<no value>, or an error with missingkey=error), any other object a struct (a field is an
attribute; a method is called with the command's arguments, the piped value last); None is nil;
lists and tuples are slices; bool, int, float and str are Go's basic kinds.
"""

from __future__ import annotations

import inspect
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from templater.gotemplate import gofmt
from templater.gotemplate.errors import GoTemplateError
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
    NilNode,
    Node,
    NumberNode,
    PipeNode,
    StringNode,
    TemplateNode,
    TextNode,
    Tree,
    VariableNode,
    describe,
)  # fmt: skip

MAX_DEPTH = 100_000  # Go's maxExecDepth
_NO_FINAL: Any = object()  # no piped value (Go's missingVal)


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class ExecError(GoTemplateError):
    pass


def range_items(value: Any) -> Iterable[tuple[Any, Any]] | None:
    """What a range walks: (index, element) pairs, a map's in key order; None when Go cannot range
    over the value (a string or a number, in Go 1.19)."""
    if value is None or value is MISSING:
        return ()
    if isinstance(value, (list, tuple)):
        return enumerate(value)
    if isinstance(value, Mapping):
        return [(k, value[k]) for k in sorted(value, key=gofmt.sort_key)]
    return None


def truth(v: Any) -> bool:
    """Go's isTrue: the zero value of a type is false; a struct is always true."""
    if v is None or v is MISSING:
        return False
    if isinstance(v, (bool, int, float)):
        return bool(v)
    if isinstance(v, (str, bytes, list, tuple, Mapping)):
        return len(v) > 0
    return True


class _Evaluator:
    """Pipelines, commands, fields, calls and arguments evaluated against dot and the variables;
    errors that name the template, line, column and node, as Go's do."""

    def __init__(self, funcs: Mapping[str, Callable[..., Any]], strict: bool) -> None:
        self.funcs = funcs
        self.strict = strict  # missingkey=error
        self.vars: list[tuple[str, Any]] = []
        self.tree: Tree | None = None  # where an error is said to be
        self.node: Node | None = None

    def error(self, message: str) -> ExecError:
        tree, node = self.tree, self.node
        if tree is None or node is None:
            return ExecError(f"template: {message}")
        line = tree.text.count("\n", 0, node.pos) + 1
        column = node.pos - (tree.text.rfind("\n", 0, node.pos) + 1)
        return ExecError(
            f'template: {tree.name}:{line}:{column}: executing "{tree.name}" at <{describe(node)}>: {message}', line
        )

    # -- variables

    def var(self, name: str) -> Any:
        for key, value in reversed(self.vars):
            if key == name:
                return value
        raise self.error(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i] = (name, value)
                return
        raise self.error(f"undefined variable: {name}")

    def pipeline(self, dot: Any, pipe: PipeNode) -> Any:
        value = _NO_FINAL
        for cmd in pipe.cmds:
            value = self.command(dot, cmd, value)
        if value is _NO_FINAL:
            value = MISSING
        for name in pipe.decl:
            if pipe.is_assign:
                self.set_var(name, value)
            else:
                self.vars.append((name, value))
        return value

    def command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        self.node = first
        if isinstance(first, FieldNode):
            return self.field_chain(dot, dot, first, first.idents, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.function(dot, first, cmd.args, final, cmd)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.variable(dot, first, cmd.args, final)
        self.not_a_function(cmd.args, final)
        if isinstance(first, BoolNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            raise self.error("nil is not a command")
        if isinstance(first, NumberNode):
            return first.value
        if isinstance(first, StringNode):
            return first.value
        raise self.error(f"can't evaluate command {describe(first)!r}")

    def not_a_function(self, args: list[Node], final: Any) -> None:
        if len(args) > 1 or final is not _NO_FINAL:
            raise self.error(f"can't give argument to non-function {describe(args[0])}")

    def variable(self, dot: Any, node: VariableNode, args: list[Node], final: Any) -> Any:
        value = self.var(node.idents[0])
        if len(node.idents) == 1:
            self.not_a_function(args, final)
            return value
        return self.field_chain(dot, value, node, node.idents[1:], args, final)

    def chain(self, dot: Any, node: ChainNode, args: list[Node], final: Any) -> Any:
        if isinstance(node.node, NilNode):
            raise self.error(f"indirection through explicit nil in {describe(node)}")
        receiver = self.arg(dot, node.node)
        return self.field_chain(dot, receiver, node, node.fields, args, final)

    def field_chain(self, dot: Any, receiver: Any, node: Node, idents: list[str], args: list[Node], final: Any) -> Any:
        boxed = False  # the receiver came out of a map: Go's type for it is interface {}
        for name in idents[:-1]:
            was_map = isinstance(receiver, Mapping)
            receiver = self.field(dot, name, node, [], _NO_FINAL, receiver, boxed)
            boxed = was_map
        return self.field(dot, idents[-1], node, args, final, receiver, boxed)

    def field(
        self, dot: Any, name: str, node: Node, args: list[Node], final: Any, receiver: Any, boxed: bool = False
    ) -> Any:
        has_args = len(args) > 1 or final is not _NO_FINAL
        if receiver is MISSING or receiver is None:
            if self.strict and receiver is MISSING:
                raise self.error(f'nil data; no entry for key "{name}"')
            if receiver is None and not isinstance(dot, Mapping) and dot is not None:
                raise self.error(f"nil pointer evaluating interface {{}}.{name}")
            return MISSING
        if isinstance(receiver, Mapping):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            if name in receiver:
                return receiver[name]
            if self.strict:
                raise self.error(f'map has no entry for key "{name}"')
            return MISSING
        attr = getattr(receiver, name, _NO_FINAL) if name[:1].isupper() else _NO_FINAL
        if attr is _NO_FINAL:
            kind = "interface {}" if boxed else gofmt.go_type(receiver)
            raise self.error(f"can't evaluate field {name} in type {kind}")
        if callable(attr) and not isinstance(attr, type):
            return self.call(dot, attr, name, args, final, node)
        if has_args:
            raise self.error(f"{name} has arguments but cannot be invoked as function")
        return attr

    def function(self, dot: Any, node: IdentifierNode, args: list[Node], final: Any, cmd: Node | None = None) -> Any:
        name = node.name
        if name in ("and", "or"):
            value: Any = MISSING
            for arg in args[1:]:
                value = self.arg(dot, arg)
                if truth(value) == (name == "or"):
                    return value
            if final is not _NO_FINAL:
                value = final
            return value
        fn = self.funcs.get(name)
        if fn is None:
            raise self.error(f'"{name}" is not a defined function')
        return self.call(dot, fn, name, args, final, cmd or node)

    def call(self, dot: Any, fn: Callable[..., Any], name: str, args: list[Node], final: Any, node: Node) -> Any:
        """fn's result; its error is the template's, at node (Go's evalCall)."""
        values = [self.arg(dot, a) for a in args[1:]]
        if final is not _NO_FINAL:
            values.append(final)
        try:
            return fn(*values)
        except (ExecError, _Break, _Continue):
            raise
        except TypeError as err:
            self.node = node
            wanted = _arity(fn)
            if wanted is not None and wanted != len(values):
                raise self.error(f"wrong number of args for {name}: want {wanted} got {len(values)}") from None
            raise self.error(f"error calling {name}: {err}") from None
        except Exception as err:  # a function's error ends the execution, named, as in Go
            self.node = node
            said = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise self.error(f"error calling {name}: {said}") from None

    def arg(self, dot: Any, node: Node) -> Any:
        self.node = node
        if isinstance(node, DotNode):
            return dot
        if isinstance(node, NilNode):
            return None
        if isinstance(node, FieldNode):
            return self.field_chain(dot, dot, node, node.idents, [node], _NO_FINAL)
        if isinstance(node, VariableNode):
            return self.variable(dot, node, [node], _NO_FINAL)
        if isinstance(node, PipeNode):
            return self.pipeline(dot, node)
        if isinstance(node, IdentifierNode):
            return self.function(dot, node, [node], _NO_FINAL)
        if isinstance(node, ChainNode):
            return self.chain(dot, node, [node], _NO_FINAL)
        if isinstance(node, BoolNode):
            return node.value
        if isinstance(node, NumberNode):
            return node.value
        if isinstance(node, StringNode):
            return node.value
        raise self.error(f"can't handle {describe(node)} for arg")


class _State(_Evaluator):
    """Go's exec.go state: walks the tree, writing text and the values of actions."""

    def __init__(self, trees: Mapping[str, Tree], funcs: Mapping[str, Callable[..., Any]], strict: bool) -> None:
        super().__init__(funcs, strict)
        self.trees = trees
        self.out: list[str] = []
        self.depth = 0  # templates called within templates

    def walk(self, dot: Any, node: Node) -> None:
        self.node = node
        if isinstance(node, TextNode):
            self.out.append(node.text)
        elif isinstance(node, ActionNode):
            value = self.pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.node = node
                self.out.append(self.printable(value))
        elif isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, BranchNode):
            self.branch(dot, node)
        elif isinstance(node, TemplateNode):
            self.template(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        else:
            raise self.error(f"unknown node: {describe(node)}")

    def printable(self, value: Any) -> str:
        if callable(value) and not isinstance(value, type) and not hasattr(value, "go_string"):
            raise self.error(f"can't print {describe(self.node) if self.node else ''} of type func")
        return gofmt.value(value)

    def branch(self, dot: Any, node: BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.pipeline(dot, node.pipe)
            if node.kind == "range":
                self.range(dot, node, value, mark)
            elif truth(value):
                self.walk(value if node.kind == "with" else dot, node.body)
            elif node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            del self.vars[mark:]

    def range(self, dot: Any, node: BranchNode, value: Any, mark: int) -> None:
        found = range_items(value)
        if found is None:  # at the pipeline's last node, as Go says it
            raise self.error(f"range can't iterate over {gofmt.value(value)}")
        items = list(found)
        decl = node.pipe.decl
        body_mark = len(self.vars)
        for index, elem in items:
            if decl:
                if node.pipe.is_assign:
                    self.set_var(decl[-1] if len(decl) == 1 else decl[1], elem)
                    if len(decl) > 1:
                        self.set_var(decl[0], index)
                else:
                    self.vars[-1] = (self.vars[-1][0], elem)
                    if len(decl) > 1:
                        self.vars[-2] = (self.vars[-2][0], index)
            try:
                self.walk(elem, node.body)
            except _Continue:
                pass
            except _Break:
                break
            finally:
                del self.vars[body_mark:]
        if not items and node.else_body is not None:
            self.walk(dot, node.else_body)

    def template(self, dot: Any, node: TemplateNode) -> None:
        tree = self.trees.get(node.name)
        if tree is None:
            raise self.error(f'template "{node.name}" not defined')
        new_dot = self.pipeline(dot, node.pipe) if node.pipe is not None else None
        self.depth += 1
        if self.depth >= MAX_DEPTH:
            raise self.error(f"exceeded maximum template depth ({MAX_DEPTH})")
        saved = (self.tree, self.vars, self.node)
        self.tree, self.vars = tree, [("$", new_dot)]
        try:
            self.walk(new_dot, tree.root)
        finally:
            self.tree, self.vars, self.node = saved
            self.depth -= 1

    # -- pipelines and commands


def _arity(fn: Callable[..., Any]) -> int | None:
    """How many arguments fn takes, None when it takes any number (or cannot be told)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return sum(1 for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def execute(
    trees: Mapping[str, Tree], name: str, data: Any, funcs: Mapping[str, Callable[..., Any]], strict: bool = False
) -> str:
    """The text of template name with data as dot. strict: a missing map key is an error
    (missingkey=error) instead of <no value>. Raises GoTemplateError."""
    state = _State(trees, {**BUILTINS, **funcs}, strict)
    tree = trees.get(name)
    if tree is None:
        raise GoTemplateError(f'template: no template "{name}" associated with template "{name}"')
    state.tree = tree
    state.vars = [("$", data)]
    try:
        state.walk(data, tree.root)
    except RecursionError:
        raise state.error("exceeded maximum template depth") from None
    return "".join(state.out)


# -- the builtins (text/template/funcs.go)


_KINDS = {"<nil>": "invalid", "bool": "bool", "int": "int", "float64": "float", "string": "string"}


def _kind(v: Any) -> str:
    """Go's basicKind of a value: invalid (nil), bool, int, float, string, or other."""
    return _KINDS.get(gofmt.go_type(v), "other")


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise GoTemplateError("missing argument for comparison")
    k1 = _kind(first)
    for other in others:
        k2 = _kind(other)
        if k1 != k2:
            if k1 != "invalid" and k2 != "invalid":
                raise GoTemplateError("incompatible types for comparison")
            if (first is None or first is MISSING) and (other is None or other is MISSING):
                return True
            continue
        if k1 == "other":
            try:
                hash(first), hash(other)
            except TypeError:
                raise GoTemplateError(f"non-comparable type {gofmt.value(first)}: {gofmt.go_type(first)}") from None
        if first == other:
            return True
    return False


def _ordered(first: Any, second: Any) -> tuple[Any, Any]:
    k1, k2 = _kind(first), _kind(second)
    if k1 not in ("int", "float", "string") or k2 not in ("int", "float", "string"):
        raise GoTemplateError("invalid type for comparison")
    if k1 != k2:
        raise GoTemplateError("incompatible types for comparison")
    return first, second


def _index(item: Any, *indexes: Any) -> Any:
    for index in indexes:
        if item is None or item is MISSING:
            raise GoTemplateError("index of untyped nil")
        if isinstance(item, Mapping):
            # a missing key: the zero value of the map's element type, "" for a map of strings
            # (meta, KV), nil otherwise
            missing = "" if all(isinstance(v, str) for v in item.values()) else None
            item = item.get(index, missing)
        elif isinstance(item, (list, tuple, str)):
            if not isinstance(index, int) or isinstance(index, bool):
                raise GoTemplateError(f"cannot index slice/array with type {gofmt.go_type(index)}")
            if not 0 <= index < len(item):
                raise GoTemplateError(f"index out of range: {index}")
            item = item[index] if not isinstance(item, str) else ord(item[index])
        else:
            raise GoTemplateError(f"can't index item of type {gofmt.go_type(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if not isinstance(item, (list, tuple, str)):
        raise GoTemplateError(f"can't slice item of type {gofmt.go_type(item)}")
    if len(indexes) > 3 or (isinstance(item, str) and len(indexes) > 2):
        raise GoTemplateError(f"too many slice indexes: {len(indexes)}")
    bounds = [int(i) for i in indexes]
    low = bounds[0] if bounds else 0
    high = bounds[1] if len(bounds) > 1 else len(item)
    if not 0 <= low <= high <= len(item):
        raise GoTemplateError(f"index out of range: {high if high > len(item) else low}")
    return item[low:high]


def _len(item: Any) -> int:
    if isinstance(item, (str, list, tuple, Mapping, bytes)):
        return len(item.encode()) if isinstance(item, str) else len(item)
    raise GoTemplateError(f"len of type {gofmt.go_type(item)}")


def _js(*args: Any) -> str:
    """template.JSEscapeString of Sprint(args)."""
    out = []
    for ch in gofmt.sprint(args):
        if ch in "\\'\"":
            out.append("\\" + ch)
        elif ch in "<>&=" or not ch.isprintable():
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;", "'": "&#39;", '"': "&#34;", "\x00": "\ufffd"}


def _html(*args: Any) -> str:
    """template.HTMLEscapeString of Sprint(args)."""
    return "".join(_HTML.get(ch, ch) for ch in gofmt.sprint(args))


def _call(fn: Any, *args: Any) -> Any:
    if not callable(fn):
        raise GoTemplateError(f"non-function of type {gofmt.go_type(fn)}")
    return fn(*args)


BUILTINS: dict[str, Callable[..., Any]] = {
    "and": lambda *a: a[-1],  # evaluated lazily by the executor
    "or": lambda *a: a[-1],
    "not": lambda v: not truth(v),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "print": lambda *a: gofmt.sprint(a),
    "printf": lambda fmt, *a: gofmt.sprintf(fmt, a),
    "println": lambda *a: gofmt.sprintln(a),
    "html": _html,
    "js": _js,
    "urlquery": lambda *a: urllib.parse.quote_plus(gofmt.sprint(a), safe=""),
    "call": _call,
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: (lambda x, y: x < y)(*_ordered(a, b)),
    "le": lambda a, b: (lambda x, y: x <= y)(*_ordered(a, b)),
    "gt": lambda a, b: (lambda x, y: x > y)(*_ordered(a, b)),
    "ge": lambda a, b: (lambda x, y: x >= y)(*_ordered(a, b)),
}
