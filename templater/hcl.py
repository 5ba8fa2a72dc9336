"""HCL 1 and JSON as consul-template's configuration files are written: a small reader. Pure.

consul-template decodes its files with HashiCorp's HCL 1, which reads JSON too. Of the PyPI
parsers, python-hcl2 reads HCL 2 (`perms = 0600` becomes 600, `%{` starts a directive) and pyhcl
keeps only the last of repeated blocks (two `template {}`). This reader keeps every item in
order with its line, and reads what HCL 1 reads:
- comments `#`, `//` and `/* */`; items `key = value`, `key { ... }` and `key "label" { ... }`,
  separated by new lines or commas;
- strings with Go's escapes, where `${...}` is kept as written (quotes inside it included) and
  `%{` is plain text; heredocs `<<EOF` and `<<-EOF` (indented like their closing line);
- numbers in Go's notation (`0600` is octal, `0x1F` hex, `1.5`, `1e3`), true and false, lists;
- JSON: a file that starts with `{`, `"key": value`, null.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

from sidecar.errors import SidecarError


class HCLError(SidecarError):
    """A file that is not HCL 1 or JSON: the message names the file, line and column."""


@dataclass(frozen=True)
class Item:
    key: str
    value: Value
    line: int


@dataclass(frozen=True)
class Body:
    """An object or block: its items in order, repeated keys kept."""

    items: tuple[Item, ...]
    line: int


Value = Union[str, int, float, bool, None, list[Any], Body]  # noqa: UP007 - a runtime alias

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"-?(0[xX][0-9A-Fa-f]+|[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?)")
_HEREDOC = re.compile(r"<<(-?)([A-Za-z_][A-Za-z0-9_-]*)\r?\n")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"', "/": "/"}
_PUNCT = {"{": "{", "}": "}", "[": "[", "]": "]", "=": "=", ":": "=", ",": ","}


@dataclass(frozen=True)
class _Token:
    kind: str  # ident string number bool null { } [ ] = , eof
    value: Any
    line: int
    column: int


class _Lexer:
    def __init__(self, text: str, name: str) -> None:
        self.text = text
        self.name = name
        self.pos = 0
        self.line = 1
        self.line_start = 0

    def error(self, message: str, line: int | None = None, column: int | None = None) -> HCLError:
        line = self.line if line is None else line
        column = self.pos - self.line_start + 1 if column is None else column
        return HCLError(f"{self.name}:{line}:{column}: {message}")

    def _advance(self, to: int) -> None:
        chunk = self.text[self.pos : to]
        newlines = chunk.count("\n")
        if newlines:
            self.line += newlines
            self.line_start = self.pos + chunk.rindex("\n") + 1
        self.pos = to

    def _skip(self) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in " \t\r\n\ufeff":
                self._advance(self.pos + 1)
            elif ch == "#" or text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self._advance(len(text) if end < 0 else end)
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("comment not terminated")
                self._advance(end + 2)
            else:
                return

    def tokens(self) -> list[_Token]:
        out = []
        while True:
            self._skip()
            line, column = self.line, self.pos - self.line_start + 1
            if self.pos >= len(self.text):
                out.append(_Token("eof", None, line, column))
                return out
            out.append(self._token(line, column))

    def _token(self, line: int, column: int) -> _Token:
        text, pos = self.text, self.pos
        ch = text[pos]
        if ch in _PUNCT:
            self._advance(pos + 1)
            return _Token(_PUNCT[ch], ch, line, column)
        if ch == '"':
            return _Token("string", self._string(), line, column)
        if text.startswith("<<", pos):
            return _Token("string", self._heredoc(), line, column)
        number = _NUMBER.match(text, pos)
        if number and (ch.isdigit() or ch == "-"):
            self._advance(number.end())
            return _Token("number", self._number(number.group(0), line, column), line, column)
        ident = _IDENT.match(text, pos)
        if ident:
            self._advance(ident.end())
            word = ident.group(0)
            if word in ("true", "false"):
                return _Token("bool", word == "true", line, column)
            if word == "null":
                return _Token("null", None, line, column)
            return _Token("ident", word, line, column)
        raise self.error(f"unexpected {ch!r}")

    def _number(self, word: str, line: int, column: int) -> int | float:
        digits = word.lstrip("-")
        try:
            if digits[:2] in ("0x", "0X"):
                number: int | float = int(digits, 16)
            elif any(c in digits for c in ".eE"):
                number = float(digits)
            elif len(digits) > 1 and digits[0] == "0":
                number = int(digits, 8)  # Go's strconv.ParseInt(s, 0, 64): 0600 is octal
            else:
                number = int(digits)
        except ValueError:
            raise self.error(f"illegal number {word!r}", line, column) from None
        return -number if word.startswith("-") else number

    def _string(self) -> str:
        """A quoted string, unquoted as HCL 1 does: `${...}` as written, Go's escapes elsewhere."""
        text = self.text
        i = self.pos + 1
        out: list[str] = []
        while True:
            if i >= len(text):
                raise self.error("string not terminated")
            ch = text[i]
            if ch == '"':
                break
            if ch == "\n":
                raise self.error("string not terminated (a new line inside it)")
            if text.startswith("${", i):
                end = _closing_brace(text, i + 2)
                if end < 0:
                    raise self.error("'${' not closed in the string")
                out.append(text[i : end + 1])
                i = end + 1
                continue
            if ch == "\\":
                value, i = self._escape(i)
                out.append(value)
                continue
            out.append(ch)
            i += 1
        self._advance(i + 1)
        return "".join(out)

    def _escape(self, i: int) -> tuple[str, int]:
        text = self.text
        code = text[i + 1 : i + 2]
        if code in _ESCAPES:
            return _ESCAPES[code], i + 2
        widths = {"x": 2, "u": 4, "U": 8}
        if code in widths:
            digits = text[i + 2 : i + 2 + widths[code]]
            if len(digits) == widths[code] and all(c in "0123456789abcdefABCDEF" for c in digits):
                return chr(int(digits, 16)), i + 2 + widths[code]
        if code[:1].isdigit():
            digits = text[i + 1 : i + 4]
            if len(digits) == 3 and all(c in "01234567" for c in digits):
                return chr(int(digits, 8)), i + 4
        self._advance(i)
        raise self.error(f"unknown escape \\{code}")

    def _heredoc(self) -> str:
        head = _HEREDOC.match(self.text, self.pos)
        if head is None:
            raise self.error("a heredoc starts <<MARKER and a new line")
        indented, marker = head.group(1) == "-", head.group(2)
        start = head.end()
        lines: list[str] = []
        i = start
        while True:
            end = self.text.find("\n", i)
            line = self.text[i : len(self.text) if end < 0 else end].rstrip("\r")
            if (line.strip() if indented else line) == marker:
                break
            if end < 0:
                raise self.error(f"heredoc {marker} not terminated")
            lines.append(line)
            i = end + 1
        self._advance(len(self.text) if end < 0 else end)
        if not indented:
            return "".join(f"{line}\n" for line in lines)
        prefix = line[: len(line) - len(line.lstrip())]  # the closing line's indentation
        if all(text.startswith(prefix) for text in lines):
            lines = [text[len(prefix) :] for text in lines]
        return "".join(f"{line}\n" for line in lines)


def _closing_brace(text: str, i: int) -> int:
    """Index of the `}` closing a `${` opened before i, or -1."""
    depth = 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


class _Parser:
    def __init__(self, tokens: list[_Token], lexer: _Lexer) -> None:
        self.tokens = tokens
        self.i = 0
        self.lexer = lexer

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self, kind: str | None = None) -> _Token:
        token = self.tokens[self.i]
        if kind is not None and token.kind != kind:
            raise self.error(token, f"expected {kind!r}, found {_said(token)}")
        self.i += 1
        return token

    def error(self, token: _Token, message: str) -> HCLError:
        return self.lexer.error(message, token.line, token.column)

    def document(self) -> Body:
        first = self.peek()
        if first.kind == "{":  # JSON: the whole file is one object
            body = self.object()
            self.take("eof")
            return body
        return self.body("eof", first.line)

    def body(self, end: str, line: int) -> Body:
        items: list[Item] = []
        while self.peek().kind != end:
            items.append(self.item())
            if self.peek().kind == ",":
                self.take()
        return Body(tuple(items), line)

    def item(self) -> Item:
        first = self.peek()
        keys: list[str] = []
        while self.peek().kind in ("ident", "string"):
            keys.append(self.take().value)
        if not keys:
            raise self.error(first, f"expected a key, found {_said(first)}")
        value: Value
        if self.peek().kind == "=":
            if len(keys) > 1:
                raise self.error(first, f"{keys[0]!r}: a key with labels takes a block, not '='")
            self.take()
            value = self.value()
        elif self.peek().kind == "{":
            value = self.object()
        else:
            raise self.error(self.peek(), f"after {keys[-1]!r}: expected '=' or '{{', found {_said(self.peek())}")
        for label in reversed(keys[1:]):  # key "a" { } is key { a { } }, as HCL 1 reads it
            value = Body((Item(label, value, first.line),), first.line)
        return Item(keys[0], value, first.line)

    def object(self) -> Body:
        start = self.take("{")
        body = self.body("}", start.line)
        self.take("}")
        return body

    def value(self) -> Value:
        token = self.peek()
        if token.kind in ("string", "number", "bool", "null"):
            return self.take().value  # type: ignore[no-any-return]
        if token.kind == "{":
            return self.object()
        if token.kind == "[":
            return self.list()
        raise self.error(token, f"expected a value, found {_said(token)}")

    def list(self) -> list[Value]:
        self.take("[")
        values: list[Value] = []
        while self.peek().kind != "]":
            values.append(self.value())
            if self.peek().kind != ",":
                break
            self.take()
        self.take("]")
        return values


def _said(token: _Token) -> str:
    return "the end of the file" if token.kind == "eof" else repr(token.value)


def parse(text: str, name: str) -> Body:
    """A file's text as its top-level Body; name is what errors call the file."""
    lexer = _Lexer(text, name)
    return _Parser(lexer.tokens(), lexer).document()
