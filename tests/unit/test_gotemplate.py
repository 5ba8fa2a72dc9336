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
from templater.gotemplate.compiled import Compiler, Fallback
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


# the successful cases the compiled code hands to the reference executor: a nil argument (`eq .Nil
# nil`) is not compiled, and a field of the nil dot of `{{ template "row" }}` is the reference's
HANDED_BACK = {"eq", "define_template"}


def trees_of(case: dict[str, Any]) -> Any:
    return parse(case["name"], case["template"], lambda n: n in BUILTINS or n in FUNCS,
                 case.get("left") or "{{", case.get("right") or "}}")  # fmt: skip


def render(case: dict[str, Any]) -> str:
    return execute(trees_of(case), case["name"], case["data"], FUNCS, strict=case["strict"])


def compiled(case: dict[str, Any]) -> str | None:
    """The compiled closures' text, or None where they hand the case back to the executor."""
    try:
        return Compiler(trees_of(case)).run(case["name"], case["data"], {**BUILTINS, **FUNCS}, case["strict"])
    except (Fallback, GoTemplateError):  # GoTemplateError: the case does not parse
        return None


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_renders_as_go_renders(case: dict[str, Any]):
    expected = EXPECTED[case["name"]]
    if not expected["error"]:
        assert render(case) == expected["output"]
        assert compiled(case) == (None if case["name"] in HANDED_BACK else expected["output"])
        return
    assert compiled(case) is None  # an error is always the reference executor's to say
    with pytest.raises(GoTemplateError) as err:
        render(case)
    assert str(err.value) == expected["error"].replace(os.strerror(errno.ENOENT), "file does not exist")


def test_timestamps_take_gos_layouts_as_go_formats_them():
    """consul-template's `timestamp "2006-01-02"`: Go's layouts, checked against time.Time.Format
    (gen.go wrote timestamps.json for one moment)."""
    import calendar
    import time

    from templater.ct_functions import go_time_format

    moment = time.gmtime(calendar.timegm((2021, 3, 4, 17, 6, 7)))
    expected = json.loads((GOLDEN / "timestamps.json").read_text())
    assert {layout: go_time_format(moment, 0.089, layout) for layout in expected} == expected
