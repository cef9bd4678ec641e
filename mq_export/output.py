"""All-or-nothing output directories: write into a hidden sibling, rename into place at the end."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import MQExportError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty directory (or any file) unless forced."""
    if out.exists() and not out.is_dir():
        raise MQExportError(f"output {out} exists and is not a directory; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MQExportError(f"output directory {out} is not empty; pass --force to replace it or choose another -o")


@contextlib.contextmanager
def staged_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out`, on failure it
    is removed, so `out` never holds half-written files."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
