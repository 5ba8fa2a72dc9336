"""The Go template engine against Go itself: tests/golden/gotemplate/golden.json was written by
Go's text/template (gen.go there, Debian's golang-go) over cases.json; the suite needs no Go."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from templater.gotemplate import GoTemplateError, execute, parse
from templater.gotemplate.execute import BUILTINS

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "gotemplate"
CASES = json.loads((GOLDEN / "cases.json").read_text())
EXPECTED = {r["name"]: r for r in json.loads((GOLDEN / "golden.json").read_text())}


def _fail() -> str:
    raise OSError(errno.ENOENT, "file does not exist")


FUNCS: dict[str, Any] = {  # the same stubs as gen.go's
    "upper": lambda s: s.upper(),
    "pair": lambda a, b: [a, b],
    "fail": _fail,
    "words": lambda s: s.split(),
}


def render(case: dict[str, Any]) -> str:
    trees = parse(case["name"], case["template"], lambda n: n in BUILTINS or n in FUNCS,
                  case.get("left") or "{{", case.get("right") or "}}")  # fmt: skip
    return execute(trees, case["name"], case["data"], FUNCS, strict=case["strict"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_renders_as_go_renders(case: dict[str, Any]):
    expected = EXPECTED[case["name"]]
    if not expected["error"]:
        assert render(case) == expected["output"]
        return
    with pytest.raises(GoTemplateError) as err:
        render(case)
    assert str(err.value) == expected["error"].replace(os.strerror(errno.ENOENT), "file does not exist")
