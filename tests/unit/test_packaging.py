"""The wheel holds the product only: the registrar, the templater and the shared layer; the
development tooling (devtools/), the tests and the bench stay out of it and of the image."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import ROOT


def test_the_wheel_holds_only_the_product(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
         str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("consul_sidecar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if name.endswith(".py")}
    assert packages == {"registrar", "templater", "sidecar"}, sorted(packages)
    modules = {name for name in names if name.endswith(".py")}
    for tool in ("fleet", "main_job", "demo_image", "keepalive_backend"):
        assert not any(name.endswith(f"/{tool}.py") for name in modules), tool
    for needed in ("registrar/__main__.py", "templater/__main__.py", "sidecar/healthcheck.py", "registrar/drain.py"):
        assert needed in modules, needed
