"""The output path: compare, temp file beside the destination, check, atomic rename.

Unchanged bytes mean no write and no reload. A failed check leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from templater.errors import CheckFailed, CommandFailed

CHECK_TIMEOUT = 60.0


def read_current(dest: Path) -> bytes | None:
    """What dest holds now; None when it does not exist."""
    try:
        return dest.read_bytes()
    except FileNotFoundError:
        return None


def check_argv(command: str, staged: Path) -> list[str]:
    """The check command with `{}` replaced by the staged file, run through sh -c."""
    return ["sh", "-c", command.replace("{}", shlex.quote(str(staged)))]


def run_check(command: str, staged: Path, template: str) -> None:
    try:
        proc = subprocess.run(check_argv(command, staged), capture_output=True, timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise CheckFailed(f"check for template {template} timed out after {CHECK_TIMEOUT:.0f} s: {command}") from err
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        raise CheckFailed(f"check refused template {template} (exit {proc.returncode}): {command}\n{output[-2000:]}")


def swap(
    dest: Path, content: bytes, current: bytes | None, template: str, check: str | None = None, backup: bool = False
) -> bool:
    """Write content to dest atomically if it differs from current (read_current); True when
    dest changed. The caller reads current once and may use it too (the proxy hook does).

    The staged file lives beside dest (same filesystem, so rename is atomic), gets dest's mode
    and owner, is fsynced, checked, and only then renamed over dest.
    """
    if current == content:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    staged = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            info = dest.stat()
            os.chmod(staged, info.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(staged, info.st_uid, info.st_gid)
        except FileNotFoundError:
            os.chmod(staged, 0o644)
        if check:
            run_check(check, staged, template)
        if backup and current is not None:
            shutil.copy2(dest, dest.with_name(dest.name + ".bak"))
        os.replace(staged, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        raise
    dir_fd = os.open(dest.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def run_command(command: str, timeout: float = 60.0) -> None:
    """A template's command, run once per batch through sh -c."""
    try:
        proc = subprocess.run(["sh", "-c", command], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise CommandFailed(f"command timed out after {timeout:.0f} s: {command}") from err
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        raise CommandFailed(f"command failed (exit {proc.returncode}): {command}\n{output[-2000:]}")
