"""Go text/template's parser (text/template/parse/parse.go and node.go): items to trees. Pure."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from templater.gotemplate.errors import GoTemplateError
from templater.gotemplate.lex import Item, Lexer


@dataclass
class Node:
    pos: int = 0
    line: int = 0


@dataclass
class ListNode(Node):
    nodes: list[Node] = field(default_factory=list)


@dataclass
class TextNode(Node):
    text: str = ""


@dataclass
class PipeNode(Node):
    decl: list[str] = field(default_factory=list)
    is_assign: bool = False
    cmds: list[CommandNode] = field(default_factory=list)


@dataclass
class ActionNode(Node):
    pipe: PipeNode = field(default_factory=PipeNode)


@dataclass
class CommandNode(Node):
    args: list[Node] = field(default_factory=list)


@dataclass
class FieldNode(Node):
    idents: list[str] = field(default_factory=list)


@dataclass
class VariableNode(Node):
    idents: list[str] = field(default_factory=list)  # "$x", then fields


@dataclass
class IdentifierNode(Node):
    name: str = ""


@dataclass
class DotNode(Node):
    pass


@dataclass
class NilNode(Node):
    pass


@dataclass
class BoolNode(Node):
    value: bool = False


@dataclass
class NumberNode(Node):
    text: str = ""
    value: Any = 0  # int or float (an untyped constant: an int when it is one)


@dataclass
class StringNode(Node):
    quoted: str = ""
    value: str = ""


@dataclass
class ChainNode(Node):
    node: Node = field(default_factory=Node)
    fields: list[str] = field(default_factory=list)


@dataclass
class BranchNode(Node):
    kind: str = ""  # if range with
    pipe: PipeNode = field(default_factory=PipeNode)
    body: ListNode = field(default_factory=ListNode)
    else_body: ListNode | None = None


@dataclass
class TemplateNode(Node):
    name: str = ""
    pipe: PipeNode | None = None


@dataclass
class BreakNode(Node):
    pass


@dataclass
class ContinueNode(Node):
    pass


@dataclass
class _End(Node):
    pass


@dataclass
class _Else(Node):
    pass


@dataclass
class Tree:
    name: str
    root: ListNode
    text: str  # the source, for line and column in errors


def describe(node: Node) -> str:
    """A node as Go's String() writes it, for error messages (`<.Foo>`)."""
    if isinstance(node, FieldNode):
        return "." + ".".join(node.idents)
    if isinstance(node, VariableNode):
        return ".".join(node.idents)
    if isinstance(node, IdentifierNode):
        return node.name
    if isinstance(node, DotNode):
        return "."
    if isinstance(node, NilNode):
        return "nil"
    if isinstance(node, BoolNode):
        return "true" if node.value else "false"
    if isinstance(node, NumberNode):
        return node.text
    if isinstance(node, StringNode):
        return node.quoted
    if isinstance(node, ChainNode):
        inner = describe(node.node)
        if isinstance(node.node, PipeNode):
            inner = f"({inner})"
        return inner + "".join("." + f for f in node.fields)
    if isinstance(node, TemplateNode):
        return f'{{{{template "{node.name}"' + (f" {describe(node.pipe)}" if node.pipe else "") + "}}"
    if isinstance(node, PipeNode):
        decl = ", ".join(node.decl) + (" = " if node.is_assign else " := ") if node.decl else ""
        return decl + " | ".join(describe(c) for c in node.cmds)
    if isinstance(node, CommandNode):
        return " ".join(f"({describe(a)})" if isinstance(a, PipeNode) else describe(a) for a in node.args)
    return type(node).__name__


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def unquote(text: str) -> str:
    """Go's strconv.Unquote for "..." and '...'; raises ValueError."""
    quote, body = text[0], text[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = body[i + 1 : i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code == quote:
            out.append(quote)
            i += 2
        elif code in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[code]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                raise ValueError("invalid syntax")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        elif code and code in "01234567":
            digits = body[i + 1 : i + 4]
            if not re.fullmatch(r"[0-7]{3}", digits):
                raise ValueError("invalid syntax")
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise ValueError("invalid syntax")
    return "".join(out)


def number(text: str) -> int | float:
    """A Go numeric constant as Python's int or float; raises ValueError."""
    if text.endswith("i"):
        raise ValueError("complex numbers are not supported")
    if text.startswith("'"):
        value = unquote(text)
        if len(value) != 1:
            raise ValueError("malformed character constant")
        return ord(value)
    clean = text.replace("_", "")
    sign = -1 if clean.startswith("-") else 1
    digits = clean.lstrip("+-")
    lowered = digits.lower()
    if lowered.startswith("0x"):
        if "p" in lowered or "." in lowered:
            return sign * float.fromhex(digits)
        return sign * int(digits, 16)
    if lowered.startswith("0b"):
        return sign * int(digits[2:], 2)
    if lowered.startswith("0o"):
        return sign * int(digits[2:], 8)
    if "." in digits or "e" in lowered:
        return float(digits) * sign  # Go: a constant written with a point or an exponent is a float
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits, 8)  # Go: a leading 0 is octal
    return sign * int(digits)


class _Items:
    """The lexer's items as the parser walks them, and its errors, which name the template and line."""

    def __init__(self, name: str, items: list[Item]) -> None:
        self.name = name
        self.items = items
        self.i = 0

    def next(self) -> Item:
        item = self.items[self.i]
        self.i += 1
        return item

    def backup(self, count: int = 1) -> None:
        self.i -= count

    def peek(self) -> Item:
        return self.items[self.i]

    def next_non_space(self) -> Item:
        item = self.next()
        while item.kind == "space":
            item = self.next()
        return item

    def peek_non_space(self) -> Item:
        """The next item that is not a space; spaces before it are consumed (as Go's peekNonSpace)."""
        while self.items[self.i].kind == "space":
            self.i += 1
        return self.items[self.i]

    def error(self, message: str, item: Item | None = None) -> GoTemplateError:
        line = (item or self.items[max(self.i - 1, 0)]).line
        return GoTemplateError(f"template: {self.name}:{line}: {message}", line)

    def unexpected(self, item: Item, context: str) -> GoTemplateError:
        if item.kind == "eof":
            return self.error(f"unexpected EOF in {context}", item)
        shown = "space" if item.kind == "space" else f'"{item.value}"'
        return self.error(f"unexpected {shown} in {context}", item)

    def expect(self, kind: str, context: str) -> Item:
        item = self.next_non_space()
        if item.kind != kind:
            raise self.unexpected(item, context)
        return item


class _Expressions(_Items):
    """Pipelines, commands and operands, with the variables declared so far and the functions
    known (Go's parser refuses an undeclared variable or an unknown function)."""

    def __init__(self, name: str, items: list[Item], funcs: Callable[[str], bool]) -> None:
        super().__init__(name, items)
        self.funcs = funcs
        self.vars: list[str] = ["$"]

    def string_value(self, item: Item) -> str:
        if item.kind == "rawstring":
            return item.value[1:-1]
        try:
            return unquote(item.value)
        except ValueError:
            raise self.error(f"invalid syntax: {item.value}", item) from None

    def pipeline(self, context: str, end: str) -> PipeNode:
        start = self.peek_non_space()
        pipe = PipeNode(start.pos, start.line)
        self.declarations(pipe, context)
        while True:
            item = self.next_non_space()
            if item.kind == end:
                if not pipe.cmds:
                    raise self.error(f"missing value for {context}", item)
                for i, cmd in enumerate(pipe.cmds[1:], 1):
                    if isinstance(cmd.args[0], (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                        raise self.error(f"non executable command in pipeline stage {i + 1}", item)
                return pipe
            if item.kind in ("bool", "char", "(", "field", "ident", "number", "keyword", "rawstring", "string",
                             "variable", "."):  # fmt: skip
                if item.kind == "keyword" and item.value != "nil":
                    raise self.unexpected(item, context)
                self.backup()
                pipe.cmds.append(self.command())
            else:
                raise self.unexpected(item, context)

    def declarations(self, pipe: PipeNode, context: str) -> None:
        """`$x :=`, `$x =`, or in a range `$i, $e :=`; anything else is left for the commands."""
        while True:
            mark = self.i
            first = self.next_non_space()
            if first.kind != "variable":
                self.i = mark
                return
            following = self.peek_non_space()
            if following.kind in (":=", "="):
                self.next_non_space()
                pipe.is_assign = following.kind == "="
                pipe.decl.append(first.value)
                if pipe.is_assign and first.value not in self.vars:
                    raise self.error(f'undefined variable "{first.value}"', first)
                if not pipe.is_assign:
                    self.vars.append(first.value)
                return
            if following.kind == ",":
                self.next_non_space()
                pipe.decl.append(first.value)
                self.vars.append(first.value)
                if context == "range" and len(pipe.decl) < 2 and self.peek_non_space().kind == "variable":
                    continue
                message = (
                    "range can only initialize variables"
                    if context == "range"
                    else f"too many declarations in {context}"
                )
                raise self.error(message, first)
            self.i = mark
            return

    def command(self) -> CommandNode:
        start = self.peek_non_space()
        cmd = CommandNode(start.pos, start.line)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            item = self.next()
            if item.kind == "space":
                continue
            if item.kind in ("right", ")"):
                self.backup()
            elif item.kind != "pipe":
                raise self.unexpected(item, "operand")
            break
        if not cmd.args:
            raise self.error("empty command")
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().kind == "field":
            fields = []
            last = self.peek()
            while self.peek().kind == "field":
                last = self.next()
                fields.append(last.value[1:])
            if isinstance(node, FieldNode):  # Go places a chain of fields at its last one
                return FieldNode(last.pos, last.line, node.idents + fields)
            if isinstance(node, VariableNode):
                return VariableNode(last.pos, last.line, node.idents + fields)
            if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
                raise self.error(f"unexpected . after term {describe(node)!r}")
            return ChainNode(node.pos, node.line, node, fields)
        return node

    def term(self) -> Node | None:
        item = self.next_non_space()
        kind = item.kind
        if kind == "ident":
            if not self.funcs(item.value):
                raise self.error(f'function "{item.value}" not defined', item)
            return IdentifierNode(item.pos, item.line, item.value)
        if kind == ".":
            return DotNode(item.pos, item.line)
        if kind == "keyword" and item.value == "nil":
            return NilNode(item.pos, item.line)
        if kind == "variable":
            if item.value not in self.vars:
                raise self.error(f'undefined variable "{item.value}"', item)
            return VariableNode(item.pos, item.line, [item.value])
        if kind == "field":
            return FieldNode(item.pos, item.line, [item.value[1:]])
        if kind == "bool":
            return BoolNode(item.pos, item.line, item.value == "true")
        if kind in ("char", "number"):
            try:
                return NumberNode(item.pos, item.line, item.value, number(item.value))
            except ValueError as err:
                raise self.error(f"{err}: {item.value}", item) from None
        if kind == "(":
            pipe = self.pipeline("parenthesized pipeline", ")")
            return pipe
        if kind in ("string", "rawstring"):
            return StringNode(item.pos, item.line, item.value, self.string_value(item))
        self.backup()
        return None


class _Parser(_Expressions):
    """Go's text/template grammar (text/template/parse/parse.go) over the items: the actions,
    control structures and templates; their pipelines come from _Expressions."""

    def __init__(self, name: str, text: str, items: list[Item], funcs: Callable[[str], bool]) -> None:
        super().__init__(name, items, funcs)
        self.text = text
        self.range_depth = 0
        self.trees: dict[str, Tree] = {}

    def top(self) -> ListNode:
        root = ListNode()
        while self.peek().kind != "eof":
            if self.peek().kind == "left":
                mark = self.i
                left = self.next()
                if self.peek_non_space().kind == "keyword" and self.peek_non_space().value == "define":
                    self.next_non_space()
                    self.define(left)
                    continue
                self.i = mark
            node = self.text_or_action()
            if isinstance(node, (_End, _Else)):
                raise self.error(f"unexpected {{{{{'end' if isinstance(node, _End) else 'else'}}}}}")
            root.nodes.append(node)
        return root

    def define(self, left: Item) -> None:
        name_item = self.next_non_space()
        if name_item.kind not in ("string", "rawstring"):
            raise self.unexpected(name_item, "define clause")
        name = self.string_value(name_item)
        self.expect("right", "define clause")
        body, end = self.item_list()
        if not isinstance(end, _End):
            raise self.error("unexpected {{else}} in define clause")
        self.add(name, body)

    def add(self, name: str, body: ListNode) -> None:
        existing = self.trees.get(name)
        if existing is not None and _has_content(existing.root) and _has_content(body):
            raise self.error(f"template: multiple definition of template {name!r}")
        if existing is None or _has_content(body):
            self.trees[name] = Tree(name, body, self.text)

    def item_list(self) -> tuple[ListNode, Node]:
        body = ListNode(self.peek().pos, self.peek().line)
        while self.peek_non_space().kind != "eof":
            node = self.text_or_action()
            if isinstance(node, (_End, _Else)):
                return body, node
            body.nodes.append(node)
        raise self.error("unexpected EOF")

    def text_or_action(self) -> Node:
        item = self.next_non_space()
        if item.kind == "text":
            return TextNode(item.pos, item.line, item.value)
        if item.kind == "left":
            return self.action()
        raise self.unexpected(item, "input")

    def action(self) -> Node:
        item = self.next_non_space()
        if item.kind == "keyword":
            word = item.value
            if word == "block":
                return self.block(item)
            if word in ("break", "continue"):
                if self.range_depth == 0:
                    raise self.error(f"{{{{{word}}}}} outside {{{{range}}}}", item)
                self.expect("right", word)
                return (BreakNode if word == "break" else ContinueNode)(item.pos, item.line)
            if word == "define":
                raise self.error("unexpected <define> in command", item)
            if word == "else":
                return self.else_control(item)
            if word == "end":
                self.expect("right", "end")
                return _End(item.pos, item.line)
            if word in ("if", "range", "with"):
                return self.control(word, item)
            if word == "template":
                return self.template(item)
        self.backup()
        pipe = self.pipeline("command", "right")
        return ActionNode(item.pos, item.line, pipe)

    def else_control(self, item: Item) -> Node:
        following = self.peek_non_space()
        if following.kind == "keyword" and following.value == "if":
            return _Else(item.pos, item.line)  # "else if": the if is left for the caller
        self.expect("right", "else")
        return _Else(item.pos, item.line)

    def control(self, kind: str, item: Item) -> BranchNode:
        saved = len(self.vars)
        self.range_depth += kind == "range"
        try:
            pipe = self.pipeline(kind, "right")
            body, end = self.item_list()
            else_body = None
            if isinstance(end, _Else):
                following = self.peek_non_space()
                if kind == "if" and following.kind == "keyword" and following.value == "if":
                    nested = self.next_non_space()  # {{else if x}} is {{else}}{{if x}}...{{end}}{{end}}
                    else_body = ListNode(nested.pos, nested.line, [self.control("if", nested)])
                else:
                    else_body, end = self.item_list()
                    if not isinstance(end, _End):
                        raise self.error("expected end; found {{else}}")
            return BranchNode(item.pos, item.line, kind, pipe, body, else_body)
        finally:
            self.range_depth -= kind == "range"
            del self.vars[saved:]

    def template(self, item: Item) -> TemplateNode:
        name_item = self.next_non_space()
        if name_item.kind not in ("string", "rawstring"):
            raise self.unexpected(name_item, "template clause")
        name = self.string_value(name_item)
        pipe = None
        if self.next_non_space().kind != "right":
            self.backup()
            pipe = self.pipeline("template clause", "right")
        return TemplateNode(name_item.pos, name_item.line, name, pipe)

    def block(self, item: Item) -> TemplateNode:
        node = self.template(item)
        saved = len(self.vars)
        body, end = self.item_list()
        del self.vars[saved:]
        if not isinstance(end, _End):
            raise self.error("unexpected {{else}} in block clause")
        self.add(node.name, body)
        return node


def _has_content(body: ListNode) -> bool:
    return any(not isinstance(n, TextNode) or n.text.strip() for n in body.nodes)


def parse(name: str, text: str, funcs: Callable[[str], bool], left: str = "{{", right: str = "}}") -> dict[str, Tree]:
    """The template's trees: its own under name, and each `define` and `block` under theirs.
    funcs: whether a function name is defined (Go checks it when parsing)."""
    items = Lexer(name, text, left, right).run()
    parser = _Parser(name, text, items, funcs)
    root = parser.top()
    if name not in parser.trees or _has_content(root):
        parser.trees[name] = Tree(name, root, text)
    return parser.trees
