"""One template: where it comes from and goes, and its own options. A value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TemplateSpec:
    """`--template SRC:DEST[:COMMAND]`, or a consul-template config file's `template {}`, which
    can set the rest (the command line's templates take the defaults)."""

    source: Path  # the template file; with contents, only the template's name
    dest: Path
    command: str | None = None
    contents: str | None = None  # the template's text, given in a config file
    command_timeout: float = 60.0  # 0: the command runs in the background, unwatched
    perms: int | None = None  # the file's mode; None: the existing file's (0644 for a new one)
    backup: bool | None = None  # DEST.bak of the previous file; None: --backup
    wait: tuple[float, float] | None = None  # (min, max) quiescence for this one; None: --wait
    delimiters: tuple[str, str] = ("{{", "}}")
    strict: bool = True  # a missing variable or attribute fails the render (error_on_missing_key)
    create_dest_dirs: bool = True
    user: str | None = None  # owner of the file written (a name or a number)
    group: str | None = None
    syntax: str = ""  # "go" (consul-template's), "jinja", or "": by the file name (.ctmpl, .tmpl: go)

    @property
    def go(self) -> bool:
        if self.syntax:
            return self.syntax == "go"
        return self.source.suffix in (".ctmpl", ".tmpl")

    @property
    def name(self) -> str:
        return str(self.source)
