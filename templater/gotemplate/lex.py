"""Go text/template's lexer (text/template/parse/lex.go), item for item. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from templater.gotemplate.errors import GoTemplateError

KEYWORDS = {"block", "break", "continue", "define", "else", "end", "if", "range", "nil", "template", "with"}
_NUMBER = re.compile(
    r"[+-]?(0[xX][0-9a-fA-F_]*(\.[0-9a-fA-F_]*)?([pP][+-]?[0-9_]+)?|0[bB][01_]+|0[oO][0-7_]+"
    r"|[0-9][0-9_]*(\.[0-9_]*)?([eE][+-]?[0-9_]+)?|\.[0-9][0-9_]*([eE][+-]?[0-9_]+)?)i?"
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class Item:
    kind: str  # text left right space pipe ( ) , := = . field variable ident bool number string char keyword eof
    value: str
    pos: int
    line: int


class Lexer:
    def __init__(self, name: str, text: str, left: str = "{{", right: str = "}}") -> None:
        self.name = name
        self.text = text
        self.left = left or "{{"
        self.right = right or "}}"
        self.pos = 0
        self.items: list[Item] = []
        self.paren = 0

    def line_of(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def error(self, pos: int, message: str) -> GoTemplateError:
        return GoTemplateError(f"template: {self.name}:{self.line_of(pos)}: {message}")

    def emit(self, kind: str, start: int, end: int) -> None:
        self.items.append(Item(kind, self.text[start:end], start, self.line_of(start)))

    def run(self) -> list[Item]:
        text, left = self.text, self.left
        while self.pos <= len(text):
            at = text.find(left, self.pos)
            if at < 0:
                if self.pos < len(text):
                    self.emit("text", self.pos, len(text))
                break
            end = at
            trim_left = (
                text.startswith(left + "-", at)
                and at + len(left) + 1 < len(text)
                and text[at + len(left) + 1] in _SPACE
            )
            if trim_left:
                while end > self.pos and text[end - 1] in _SPACE:
                    end -= 1
            if end > self.pos:
                self.emit("text", self.pos, end)
            self.pos = at + len(left) + (2 if trim_left else 0)
            if text.startswith("/*", self.pos):
                self._comment(at)
                continue
            self.emit("left", at, at + len(left))
            self._action()
        self.items.append(Item("eof", "", len(text), self.line_of(len(text))))
        return self.items

    def _right_here(self) -> tuple[bool, bool]:
        """(a right delimiter is here, with a trim marker before it)."""
        text, right = self.text, self.right
        if text.startswith(right, self.pos):
            return True, False
        if self.pos > 0 and text[self.pos - 1] in _SPACE and text.startswith("-" + right, self.pos):
            return True, True
        return False, False

    def _after_right(self, trimmed: bool) -> None:
        self.pos += len(self.right) + (1 if trimmed else 0)
        if trimmed:
            while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
                self.pos += 1

    def _comment(self, start: int) -> None:
        end = self.text.find("*/", self.pos + 2)
        if end < 0:
            raise self.error(start, "unclosed comment")
        self.pos = end + 2
        here, trimmed = self._right_here()
        if not here and self.text.startswith(" -" + self.right, self.pos):
            self.pos += 1
            here, trimmed = True, True
        if not here:
            raise self.error(start, "comment ends before closing delimiter")
        self._after_right(trimmed)

    def _action(self) -> None:
        text = self.text
        while True:
            here, trimmed = self._right_here()
            if here and self.paren == 0:
                start = self.pos + (1 if trimmed else 0)
                if trimmed and self.items and self.items[-1].kind == "space":
                    self.items.pop()
                self.emit("right", start, start + len(self.right))
                self._after_right(trimmed)
                return
            if self.pos >= len(text):
                raise self.error(self.pos, "unclosed action")
            self._item(text[self.pos], self.pos)

    def _item(self, ch: str, start: int) -> None:
        """One item of an action, starting at start with ch: a space, an operator, a string, a
        variable or a field; the rest in _word."""
        text = self.text
        if ch in _SPACE:
            while self.pos < len(text) and text[self.pos] in _SPACE:
                if text.startswith("-" + self.right, self.pos + 1) and text[self.pos] in _SPACE:
                    self.pos += 1
                    break
                self.pos += 1
            self.emit("space", start, self.pos)
        elif ch == "\n":
            raise self.error(start, "unclosed action")
        elif text.startswith(":=", start):
            self.pos += 2
            self.emit(":=", start, self.pos)
        elif ch in "=|,":
            self.pos += 1
            self.emit(ch if ch != "|" else "pipe", start, self.pos)
        elif ch == '"':
            self._quoted(start, '"')
        elif ch == "`":
            end = text.find("`", start + 1)
            if end < 0:
                raise self.error(start, "unterminated raw quoted string")
            self.pos = end + 1
            self.emit("rawstring", start, self.pos)
        elif ch == "'":
            self._quoted(start, "'")
        elif ch == "$":
            match = _IDENT.match(text, start + 1)
            self.pos = match.end() if match else start + 1
            self.emit("variable", start, self.pos)
        elif ch == "." and not (start + 1 < len(text) and text[start + 1].isdigit()):
            match = _IDENT.match(text, start + 1)
            if match:
                self.pos = match.end()
                self.emit("field", start, self.pos)
            else:
                self.pos += 1
                self.emit(".", start, self.pos)
        else:
            self._word(ch, start)

    def _word(self, ch: str, start: int) -> None:
        """A number, an identifier, a keyword, a bool or a parenthesis."""
        text = self.text
        if ch.isdigit() or ch in "+-.":
            match = _NUMBER.match(text, start)
            if not match or match.end() == start:
                raise self.error(start, f"bad character {ch!r}")
            self.pos = match.end()
            if self.pos < len(text) and (text[self.pos].isalnum() or text[self.pos] == "_"):
                raise self.error(start, f"bad number syntax: {text[start : self.pos + 1]!r}")
            self.emit("number", start, self.pos)
        elif ch.isalpha() or ch == "_":
            match = _IDENT.match(text, start)
            assert match is not None
            self.pos = match.end()
            word = match.group(0)
            if word in KEYWORDS:
                self.emit("keyword", start, self.pos)
            elif word in ("true", "false"):
                self.emit("bool", start, self.pos)
            else:
                self.emit("ident", start, self.pos)
        elif ch == "(":
            self.paren += 1
            self.pos += 1
            self.emit("(", start, self.pos)
        elif ch == ")":
            self.paren -= 1
            if self.paren < 0:
                raise self.error(start, "unexpected right paren")
            self.pos += 1
            self.emit(")", start, self.pos)
        else:
            raise self.error(start, f"unrecognized character in action: {ch!r}")

    def _quoted(self, start: int, quote: str) -> None:
        text = self.text
        i = start + 1
        while True:
            if i >= len(text) or text[i] == "\n":
                raise self.error(
                    start, "unterminated quoted string" if quote == '"' else "unterminated character constant"
                )
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == quote:
                break
            i += 1
        self.pos = i + 1
        self.emit("string" if quote == '"' else "char", start, self.pos)
