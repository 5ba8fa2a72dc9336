"""Go's text/template in Python: consul-template's templates as they are (issue 23).

lex (items), parse (a tree per template, `define` and `block` included), execute (Go's
semantics: truth, scoping, pipelines, ranges over maps in key order), gofmt (Go's formatting of
values and printf's verbs) and builtins (and, or, eq, index, printf, ...). consul-template's
own functions live in templater.ct_functions and are handed in as a function map.
"""

from __future__ import annotations

from templater.gotemplate.errors import GoTemplateError
from templater.gotemplate.execute import execute
from templater.gotemplate.gofmt import MISSING
from templater.gotemplate.parse import Tree, parse

__all__ = ["MISSING", "GoTemplateError", "Tree", "execute", "parse"]
