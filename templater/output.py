"""The output path: compare, temp file beside the destination, check, atomic rename.

Unchanged bytes mean no write and no reload. A failed check leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FileOptions:
    """How a destination is written (a consul-template config's template {}; defaults: --template)."""

    backup: bool = False  # DEST.bak of the previous file
    mode: int | None = None  # None: the existing file's mode (0644 for a new one)
    owner: tuple[int, int] | None = None  # (uid, gid), -1 for either: keep it; None: the existing file's
    make_dirs: bool = True  # create DEST's directory when it is missing


def side_dir(dest: Path) -> Path:
    """Where a template's side files (side_file()) live: `<dest>.d/`."""
    return dest.with_name(dest.name + ".d")


def write_side_files(dest: Path, files: dict[str, str], template: str, options: FileOptions) -> bool:
    """Each side file into side_dir(dest), atomically, with the destination's mode and owner
    (FileOptions, else dest's own, as swap() gives its file); True when one changed."""
    if not files:
        return False
    directory = side_dir(dest)
    directory.mkdir(parents=True, exist_ok=True)
    mode = options.mode if options.mode is not None else (dest.stat().st_mode & 0o7777 if dest.exists() else None)
    side = FileOptions(backup=False, mode=mode, owner=options.owner, make_dirs=True)
    changed = False
    for name, text in sorted(files.items()):
        path = directory / name
        changed |= swap(path, text.encode(), read_current(path), template, None, side)
    return changed


def remove_stale_side_files(dest: Path, keep: Iterable[str]) -> None:
    """Side files a render no longer makes (after its file was written). The directory is the
    templater's: anything else in it goes too."""
    directory = side_dir(dest)
    if not directory.is_dir():
        return
    kept = set(keep)
    for path in directory.iterdir():
        if path.name not in kept and path.is_file():
            path.unlink(missing_ok=True)


def swap(
    dest: Path, content: bytes, current: bytes | None, template: str, check: str | None = None,
    options: FileOptions = FileOptions(),
) -> bool:  # fmt: skip
    """Write content to dest atomically if it differs from current (read_current); True when
    dest changed. The caller reads current once and may use it too (the proxy hook does).

    The staged file lives beside dest (same filesystem, so rename is atomic), gets dest's mode
    and owner (or the options'), is fsynced, checked, and only then renamed over dest.
    """
    if current == content:
        return False
    if options.make_dirs:
        dest.parent.mkdir(parents=True, exist_ok=True)
    elif not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest.parent} does not exist (create_dest_dirs = false)")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    staged = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        _own(staged, dest, options)
        if check:
            run_check(check, staged, template)
        if options.backup and current is not None:
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


def _own(staged: Path, dest: Path, options: FileOptions) -> None:
    """The staged file gets dest's mode and owner, or those the options name."""
    try:
        info: os.stat_result | None = dest.stat()
    except FileNotFoundError:
        info = None
    mode = options.mode if options.mode is not None else (info.st_mode & 0o7777 if info else 0o644)
    os.chmod(staged, mode)
    if options.owner is not None:
        os.chown(staged, *options.owner)  # asked for: a failure is the write's (named by the caller)
    elif info is not None:
        with contextlib.suppress(PermissionError):
            os.chown(staged, info.st_uid, info.st_gid)


def owner_ids(user: str | None, group: str | None) -> tuple[int, int] | None:
    """A template's user and group (names or numbers) as ids, -1 for one not given. Raises
    LookupError naming the one that does not exist."""
    if user is None and group is None:
        return None
    uid = gid = -1
    if user is not None:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    if group is not None:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid


def run_command(command: str, timeout: float = 60.0) -> None:
    """A template's command, run once per batch through sh -c. With timeout 0 it is started in
    the background and not watched (consul-template's command_timeout = 0)."""
    if timeout <= 0:
        subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL, start_new_session=True)
        return
    try:
        proc = subprocess.run(["sh", "-c", command], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise CommandFailed(f"command timed out after {timeout:.0f} s: {command}") from err
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        raise CommandFailed(f"command failed (exit {proc.returncode}): {command}\n{output[-2000:]}")
