"""Atomic file writes: a temp file in the target's folder, fsynced, then renamed over the target.

A crash mid-write leaves either the previous file or the complete new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

from unetcli.errors import CheckpointError, OutputError


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    The temporary name keeps the suffix of ``path`` (writers that pick a format by suffix
    still work) and is removed if the body raises.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):  # mkstemp makes 0600 files: give the usual permissions
            os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if exc.errno in WRITE_ERRNOS or exc.filename in (None, str(tmp)):
            raise write_error(path, exc) from exc
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG,
                errno.EIO, errno.ELOOP, errno.EISDIR}
"""Errors of writing an output (full disk, read-only or missing location) rather than of reading an input."""


def write_error(path: Path | str, exc: OSError) -> OutputError:
    """One clear error for an output that cannot be written (full disk, read-only folder, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"{path}: cannot write ({reason})",
                       hint=f"check the free space and permissions of {Path(path).parent}; nothing was half-written")


def _file_mode(path: Path) -> int:
    """The replaced file's permissions, or those of a newly created file (0666 minus the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path | str, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def real_path(path: Path | str) -> Path:
    """``path`` absolute with its links followed, like ``Path.resolve()``, but a looping link is
    returned as it is instead of raising (it is then refused as an input or output, clearly)."""
    return Path(os.path.realpath(path))


def ensure_writable_folder(folder: Path, what: str, hint: str) -> None:
    """Create ``folder`` (and parents) and check it can be written, or raise :class:`OutputError`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the {what} ({exc.strerror or exc})", hint=hint) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: {what} is not writable", hint=hint)


@contextlib.contextmanager
def output_folder(folder: Path, what: str, hint: str) -> Iterator[Path]:
    """Create ``folder`` for the block (see :func:`ensure_writable_folder`); if the block fails and
    the folder was created here, remove it again when nothing but empty folders is in it, so that a
    refused or failed command leaves no empty output folder behind."""
    folder = Path(folder)
    created = not folder.exists() and not folder.is_symlink()
    ensure_writable_folder(folder, what, hint)
    try:
        yield folder
    except BaseException:
        if created and folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def read_written_json(path: Path, what: str, hint: str, expect: type = dict) -> Any:
    """A JSON file this tool wrote earlier (``cv.json``, ``postprocessing.json``, ...), read back and
    checked to be a ``expect``; a damaged one (truncated, edited, not UTF-8) is one clear
    :class:`CheckpointError` naming it, never a traceback."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: {what} not found", hint=hint) from exc
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:120]
        raise CheckpointError(f"{path}: {what} is damaged or unreadable ({reason})", hint=hint) from exc
    if not isinstance(value, expect):
        raise CheckpointError(f"{path}: {what} is damaged (expected a JSON {'object' if expect is dict else expect.__name__}, "
                              f"found {type(value).__name__})", hint=hint)
    return value
