"""All-or-nothing output directories: write into a hidden sibling, rename it into place at the end,
and only over what the user allowed when the run started."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import MQExportError

_PACKAGE = Path(__file__).resolve().parents[1]   # holds the bundled models and data the demo reads


@dataclass(frozen=True)
class _DirState:
    """An existing directory as it was: which inode, and every path inside it (relative)."""
    identity: tuple[int, int]
    entries: frozenset[str]


def _dir_state(directory: Path) -> _DirState:
    st = directory.stat()
    entries = set()
    for root, dirs, files in os.walk(directory):
        relative = Path(root).relative_to(directory)
        entries.update(str(relative / name) for name in dirs + files)
    return _DirState((st.st_dev, st.st_ino), frozenset(entries))


def _never_replace(target: Path, inputs: Iterable[str | Path | None]) -> str | None:
    """Why the resolved `target` must not be replaced by an output directory, or None."""
    cwd = Path.cwd().resolve()
    if target == target.parent:
        return "the filesystem root"
    if cwd == target:
        return "the working directory"
    if cwd.is_relative_to(target):
        return "an ancestor of the working directory"
    home = Path(os.path.expanduser("~")).resolve()
    if home.is_relative_to(target):
        return "your home directory" if home == target else "an ancestor of your home directory"
    for path in inputs:
        if path is not None and Path(path).resolve().is_relative_to(target):
            return f"the input {path} or a directory holding it"
    if _PACKAGE.is_relative_to(target):
        return "a directory holding the mq_export package and its bundled models"
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _new_hidden_dir(parent: Path, name: str, suffix: str) -> Path:
    """A new empty `.NAME.XXXXXXXX.suffix` in `parent`. Unlike tempfile.mkdtemp (mode 0700) it has the
    mode a plain mkdir gives, since the staging directory becomes the user's output directory."""
    while True:
        path = parent / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p `directory`; returns the directories it created, outermost first."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()][::-1]
    for path in missing:
        path.mkdir()
    return missing


@contextlib.contextmanager
def staged_output_dir(out: str | Path, force: bool = False,
                      inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a fresh hidden directory; when the block succeeds it replaces `out`, when it fails
    (errors, Ctrl-C) it is removed, so `out` never holds half-written files.

    Allowed at the start: `out` absent, an empty directory, or (with `force`) a non-empty one.
    At the end `out` must still be that (the same directory, nothing added inside) or the result
    is discarded with an error: files that appear during the run, or another run's output, are
    never deleted. Refused outright: the working directory or any ancestor of it, the filesystem
    root, the home directory or an ancestor, and any directory holding one of `inputs` (None
    entries are skipped) or this package. A symlink is followed: its target is replaced, the link
    stays. Missing parent directories are created only when the result is moved into place.
    """
    if not str(out).strip():
        raise MQExportError("the output directory is an empty string; name a new output directory")
    try:
        target = Path(out).resolve()
    except (OSError, RuntimeError) as exc:   # RuntimeError: a symlink loop
        raise MQExportError(f"cannot resolve the output path {out} ({exc}); choose another output directory") \
            from None
    reason = _never_replace(target, inputs)
    if reason is not None:
        raise MQExportError(f"refusing to replace {out}: it is {reason}; choose a new output directory")
    if target.exists() and not target.is_dir():
        raise MQExportError(f"output {out} exists and is not a directory; choose another output directory")
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise MQExportError(f"output {out} is under {parent}, which is a file, not a directory; "
                            "choose another output directory")
    allowed = _dir_state(target) if target.is_dir() else None
    if allowed is not None and allowed.entries and not force:
        raise MQExportError(f"output directory {out} is not empty; pass --force to replace it or "
                            "choose another output directory")
    try:
        staging = _new_hidden_dir(parent, target.name, ".partial")
    except OSError as exc:
        raise MQExportError(f"cannot create the output {out}: no new directory can be made in {parent} "
                            f"({exc.strerror}); choose another output directory") from None
    try:
        yield staging
        _commit(staging, target, allowed, str(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)   # gone already after a successful commit


def _commit(staging: Path, target: Path, allowed: _DirState | None, shown: str) -> None:
    """Move `staging` to `target` if `target` is still what `allowed` recorded. The old directory is
    renamed aside first (onto a fresh empty placeholder, which rename replaces), checked, and deleted
    only once the new one is in place. Renaming a directory replaces at most an empty directory, so
    anything that appears concurrently makes the rename fail instead of being deleted."""
    nothing_written = (f"nothing was written to {shown}; remove what appeared or choose another output directory, "
                       "and rerun")
    created: list[Path] = []
    aside: Path | None = None
    try:
        if allowed is not None:
            placeholder = _new_hidden_dir(target.parent, target.name, ".old")
            try:
                os.rename(target, placeholder)
                aside = placeholder
            except OSError as exc:
                placeholder.rmdir()
                if not isinstance(exc, FileNotFoundError):   # removed during the run: absent is allowed
                    raise
            change = _change(_dir_state(aside), allowed) if aside is not None else ""
            if change:
                raise MQExportError(f"output directory {shown} changed during the run ({change}); {nothing_written}")
        created = _make_parents(target.parent)
        os.rename(staging, target)
    except BaseException as exc:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        if aside is not None:
            _restore(aside, target, shown)
        if isinstance(exc, OSError):
            raise MQExportError(f"{shown} appeared or changed during the run ({exc.strerror}); {nothing_written}") \
                from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _change(now: _DirState, allowed: _DirState) -> str:
    """What appeared in the output directory since the start, for the error message; '' if nothing
    did (paths that vanished were going to be deleted anyway)."""
    if now.identity != allowed.identity:
        return "it was replaced by another directory"
    appeared = sorted(now.entries - allowed.entries)
    return f"new: {', '.join(appeared[:3])}{', ...' if len(appeared) > 3 else ''}" if appeared else ""


def _restore(aside: Path, target: Path, shown: str) -> None:
    try:
        os.rename(aside, target)
    except OSError:
        raise MQExportError(f"{shown} changed during the run and something new took its place; its earlier "
                            f"contents are in {aside}; nothing was written") from None
